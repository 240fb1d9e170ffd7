//! Exports an image of the store as an OCI image layout: a directory, or a tar of one (what
//! `arrakis image import`, `ctr import`, `skopeo copy oci-archive:` and `docker load` read).
//!
//! ```text
//! oci-layout            {"imageLayoutVersion":"1.0.0"}
//! index.json            one manifest, annotated with the image's full reference
//!                       (org.opencontainers.image.ref.name and io.containerd.image.name)
//! blobs/sha256/<hex>    the manifest, its config and its layers
//! ```
//!
//! A pulled or imported image is copied as it is: its manifest, config and layer blobs are
//! streamed from the store, each verified against its digest, so they are byte-identical.
//!
//! A built image has no layers: its disk was made directly ([`crate::store`]'s
//! `add_disk_image`). Its disk is flattened into one layer, read without mounting anything
//! (see [`disk`]): regular files, directories, symlinks, hard links (as links), FIFOs and
//! device nodes, with numeric owners, permission bits including setuid, setgid and sticky,
//! and mtimes in whole seconds. Lost: extended attributes (file capabilities, ACLs, SELinux
//! labels), sockets, sub-second times, atimes and ctimes, and the root directory's own mode
//! and owner; the root's `lost+found` directory is left out. The config is the image's own
//! (ENV, WORKDIR, USER, CMD, ENTRYPOINT, exposed ports, labels...) with `rootfs.diff_ids` set
//! to that layer, under a new manifest. The layer is deterministic, so exporting the same
//! image twice gives the same manifest digest.
//!
//! Nothing appears at the destination until the layout is complete: it is written next to it
//! and renamed into place. The store is only read; scratch space (the dumped disk and the
//! layer) goes under the store's `blobs/.tmp/` and is removed afterwards.

mod disk;
mod layer;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

use crate::archive::ANNOTATION_IMAGE_NAME;
use crate::oci::{
    self, Descriptor, Digest, ImageConfig, Index, Manifest, OciError, OciLayout, Platform,
    ANNOTATION_REF_NAME, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
};
use crate::store::{ImageRef, ImageStore, StoreError};

/// The `oci-layout` marker of the layouts written here.
const LAYOUT_MARKER: &[u8] = b"{\"imageLayoutVersion\":\"1.0.0\"}";
/// Media type of the layer made from a built image's disk.
const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Where scratch directories go, inside the store's layout.
const SCRATCH_PARENT: &str = "blobs/.tmp";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Unknown or ambiguous reference, or a built image whose disk is gone.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "`{}` is not empty: the image is written as a new OCI image layout; name an empty or \
         new directory, or a new file ending in .tar",
        path.display()
    )]
    DestinationNotEmpty { path: PathBuf },
    #[error(
        "`{}` already exists: name a new file ending in .tar, or an empty or new directory",
        path.display()
    )]
    DestinationExists { path: PathBuf },
    #[error("reading image {digest} from the store")]
    Read {
        digest: Digest,
        #[source]
        source: OciError,
    },
    #[error("running debugfs (is e2fsprogs installed?)")]
    DebugfsSpawn {
        #[source]
        source: io::Error,
    },
    #[error("debugfs on `{}` failed ({status}): {stderr}", image.display())]
    Debugfs {
        image: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("reading the disk `{}` with debugfs: {detail}", image.display())]
    DebugfsOutput { image: PathBuf, detail: String },
    #[error("`{}` of the image's disk was not dumped{}", path.display(), said(debugfs))]
    Dump {
        path: PathBuf,
        /// What debugfs complained about while dumping.
        debugfs: String,
        #[source]
        source: io::Error,
    },
    #[error("{action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn said(complaints: &str) -> String {
    if complaints.is_empty() {
        String::new()
    } else {
        format!(" (debugfs said: {complaints})")
    }
}

/// What [`export_image`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportedImage {
    /// The reference the layout names the image by.
    pub reference: ImageRef,
    /// The manifest in the layout: the store's own for a pulled or imported image, a new one
    /// for a built image.
    pub manifest: Descriptor,
    /// For a built image, what the layer made from its disk holds.
    pub flattened: Option<FlattenStats>,
}

/// The entries of a layer made from a disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlattenStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Names of a file after its first, written as hard links to it.
    pub hardlinks: u64,
    /// Device nodes and FIFOs.
    pub devices: u64,
    /// Unix sockets, which a tar cannot hold.
    pub sockets_skipped: u64,
}

/// Writes the image `wanted` names (a reference, digest or id, as for
/// [`ImageStore::lookup`]) to `dest` as an OCI image layout: a tar of one when `dest` ends in
/// `.tar` (it must not exist, or be empty), else a directory (created; it must be empty or
/// absent). See the module documentation.
pub fn export_image(
    store: &ImageStore,
    wanted: &str,
    dest: &Path,
) -> Result<ExportedImage, ExportError> {
    let (reference, tagged) = store.lookup(wanted)?;
    let destination = Destination::check(dest)?;
    let layout = OciLayout::open(store.blobs().layout()).map_err(|source| ExportError::Read {
        digest: tagged.digest.clone(),
        source,
    })?;
    let read_error = |source| ExportError::Read {
        digest: tagged.digest.clone(),
        source,
    };
    let (manifest_descriptor, manifest_bytes) = resolve(&layout, &tagged).map_err(read_error)?;
    let manifest: Manifest =
        parse(&manifest_bytes, &manifest_descriptor, "an image manifest").map_err(read_error)?;
    let config_bytes = layout.read_blob(&manifest.config).map_err(read_error)?;
    let config: ImageConfig =
        parse(&config_bytes, &manifest.config, "an image config").map_err(read_error)?;

    let disk = store.rootfs_path(&tagged.digest);
    if manifest.layers.is_empty() && !disk.is_file() {
        return Err(StoreError::DiskMissing {
            digest: tagged.digest.clone(),
        }
        .into());
    }

    let mut out = destination.open()?;
    out.add_file("oci-layout", LAYOUT_MARKER)?;
    let (descriptor, flattened) = if manifest.layers.is_empty() {
        let scratch_parent = store.blobs().layout().join(SCRATCH_PARENT);
        let scratch = tempfile::Builder::new()
            .prefix("export-")
            .tempdir_in(&scratch_parent)
            .map_err(io_err("creating a scratch directory in", &scratch_parent))?;
        let (descriptor, stats) = flatten(&disk, &config_bytes, &scratch, &mut out)?;
        (descriptor, Some(stats))
    } else {
        copy_blobs(&layout, &manifest, &mut out).map_err(|e| match e {
            Copy::Read(source) => read_error(source),
            Copy::Write(error) => error,
        })?;
        out.add_blob(
            &manifest_descriptor.digest,
            manifest_bytes.len() as u64,
            &mut &manifest_bytes[..],
        )?;
        let descriptor = Descriptor {
            media_type: manifest_descriptor.media_type.clone(),
            digest: manifest_descriptor.digest.clone(),
            size: manifest_descriptor.size,
            platform: None,
            annotations: BTreeMap::new(),
        };
        (descriptor, None)
    };

    let entry = Descriptor {
        platform: Some(Platform {
            architecture: config.architecture.clone(),
            os: config.os.clone(),
            variant: None,
        }),
        annotations: BTreeMap::from([
            (ANNOTATION_IMAGE_NAME.to_owned(), reference.to_string()),
            (ANNOTATION_REF_NAME.to_owned(), reference.to_string()),
        ]),
        ..descriptor.clone()
    };
    let index = Index {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
        manifests: vec![entry],
    };
    let index = serde_json::to_vec_pretty(&index).expect("an index serializes");
    out.add_file("index.json", &index)?;
    out.finish()?;
    Ok(ExportedImage {
        reference,
        manifest: descriptor,
        flattened,
    })
}

/// The manifest the store's index entry names (following an index to its linux/amd64
/// entry, should the entry be one) and its bytes, verified.
fn resolve(layout: &OciLayout, tagged: &Descriptor) -> Result<(Descriptor, Vec<u8>), OciError> {
    let mut descriptor = tagged.clone();
    for _ in 0..=oci::MAX_INDEX_DEPTH {
        let bytes = layout.read_blob(&descriptor)?;
        if !matches!(
            descriptor.media_type.as_str(),
            MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST
        ) {
            return Ok((descriptor, bytes));
        }
        let index: Index = parse(&bytes, &descriptor, "an image index")?;
        let entries: Vec<&Descriptor> = index.manifests.iter().collect();
        descriptor = oci::choose(&entries)?.clone();
    }
    Err(OciError::NestingTooDeep {
        digest: descriptor.digest,
    })
}

fn parse<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    descriptor: &Descriptor,
    what: &'static str,
) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|source| OciError::BlobJson {
        digest: descriptor.digest.clone(),
        what,
        source,
    })
}

/// Why copying a blob failed: reading (and verifying) it from the store, or writing it out.
enum Copy {
    Read(OciError),
    Write(ExportError),
}

/// Streams the config and layers of `manifest` into `out`, each verified as it is read.
fn copy_blobs(layout: &OciLayout, manifest: &Manifest, out: &mut Output) -> Result<(), Copy> {
    for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
        let mut reader = layout.open_blob(descriptor).map_err(Copy::Read)?;
        let written = out.add_blob(&descriptor.digest, descriptor.size, &mut reader);
        // A digest mismatch explains a failed write better than the write error does.
        reader.finish().map_err(Copy::Read)?;
        written.map_err(Copy::Write)?;
    }
    Ok(())
}

/// Makes the one layer of a built image from its disk, and the config and manifest naming
/// it; returns the manifest's descriptor.
fn flatten(
    disk: &Path,
    config_bytes: &[u8],
    scratch: &TempDir,
    out: &mut Output,
) -> Result<(Descriptor, FlattenStats), ExportError> {
    let tree = disk::read_disk(disk, scratch.path())?;
    let layer = layer::write_layer(&tree, &scratch.path().join("layer.tar.gz"))?;
    // The dump is no longer needed; free its space before the layer is copied out.
    let _ = fs::remove_dir_all(&tree.root);
    let mut file = File::open(&layer.path).map_err(io_err("opening", &layer.path))?;
    out.add_blob(&layer.digest, layer.size, &mut file)?;

    let mut config: serde_json::Value =
        serde_json::from_slice(config_bytes).expect("the config was parsed before");
    config["rootfs"] = serde_json::json!({
        "type": "layers",
        "diff_ids": [layer.diff_id.to_string()],
    });
    let config = serde_json::to_vec(&config).expect("a config serializes");
    let config_digest = Digest::of(&config);
    out.add_blob(&config_digest, config.len() as u64, &mut &config[..])?;

    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
        config: plain(MEDIA_TYPE_CONFIG, config_digest, config.len() as u64),
        layers: vec![plain(MEDIA_TYPE_LAYER_GZIP, layer.digest, layer.size)],
    };
    let manifest = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let digest = Digest::of(&manifest);
    out.add_blob(&digest, manifest.len() as u64, &mut &manifest[..])?;
    Ok((
        plain(MEDIA_TYPE_MANIFEST, digest, manifest.len() as u64),
        layer.stats,
    ))
}

fn plain(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// Where the layout goes, checked before any work is done.
enum Destination {
    Dir(PathBuf),
    Tar(PathBuf),
}

impl Destination {
    fn check(path: &Path) -> Result<Destination, ExportError> {
        let meta = match fs::symlink_metadata(path) {
            Ok(meta) => Some(meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(io_err("inspecting", path)(source)),
        };
        let is_tar = path.extension().is_some_and(|ext| ext == "tar");
        let exists = || ExportError::DestinationExists {
            path: path.to_path_buf(),
        };
        match meta {
            // An empty file (from `mktemp`, say) may be replaced.
            Some(meta) if is_tar && meta.is_file() && meta.len() == 0 => {}
            Some(_) if is_tar => return Err(exists()),
            Some(meta) if !meta.is_dir() => return Err(exists()),
            Some(_) => {
                let mut entries = fs::read_dir(path).map_err(io_err("reading", path))?;
                if entries.next().is_some() {
                    return Err(ExportError::DestinationNotEmpty {
                        path: path.to_path_buf(),
                    });
                }
            }
            None => {}
        }
        Ok(if is_tar {
            Destination::Tar(path.to_path_buf())
        } else {
            Destination::Dir(path.to_path_buf())
        })
    }

    /// Starts writing: into a hidden directory or file beside the destination.
    fn open(self) -> Result<Output, ExportError> {
        let (Destination::Dir(dest) | Destination::Tar(dest)) = &self;
        let parent = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
        let prefix = format!(
            ".{}.export-",
            dest.file_name().unwrap_or_default().to_string_lossy()
        );
        let mut temp = tempfile::Builder::new();
        temp.prefix(&prefix);
        match self {
            Destination::Dir(dest) => {
                let staging = temp
                    .tempdir_in(&parent)
                    .map_err(io_err("creating a directory in", &parent))?;
                let blobs = staging.path().join("blobs/sha256");
                fs::create_dir_all(&blobs).map_err(io_err("creating", &blobs))?;
                Ok(Output::Dir {
                    staging,
                    dest,
                    written: HashSet::new(),
                })
            }
            Destination::Tar(dest) => {
                let file = temp
                    .tempfile_in(&parent)
                    .map_err(io_err("creating a file in", &parent))?;
                let mut builder = tar::Builder::new(BufWriter::new(file));
                for dir in ["blobs/", "blobs/sha256/"] {
                    let mut header = tar_header(tar::EntryType::Directory, 0o755, 0);
                    builder
                        .append_data(&mut header, dir, io::empty())
                        .map_err(io_err("writing", &dest))?;
                }
                Ok(Output::Tar {
                    builder,
                    dest,
                    written: HashSet::new(),
                })
            }
        }
    }
}

/// A layout being written.
enum Output {
    Dir {
        staging: TempDir,
        dest: PathBuf,
        written: HashSet<Digest>,
    },
    Tar {
        builder: tar::Builder<BufWriter<NamedTempFile>>,
        dest: PathBuf,
        written: HashSet<Digest>,
    },
}

impl Output {
    /// Adds `blobs/sha256/<hex>` with `size` bytes from `reader` (once per digest).
    fn add_blob(
        &mut self,
        digest: &Digest,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), ExportError> {
        let name = format!("blobs/{}/{}", digest.algorithm(), digest.hex());
        match self {
            Output::Dir {
                staging, written, ..
            } => {
                if !written.insert(digest.clone()) {
                    return Ok(());
                }
                let path = staging.path().join(&name);
                let mut file = File::create(&path).map_err(io_err("creating", &path))?;
                io::copy(reader, &mut file).map_err(io_err("writing", &path))?;
                file.sync_all().map_err(io_err("syncing", &path))
            }
            Output::Tar {
                builder,
                dest,
                written,
            } => {
                if !written.insert(digest.clone()) {
                    return Ok(());
                }
                let mut header = tar_header(tar::EntryType::Regular, 0o644, size);
                builder
                    .append_data(&mut header, &name, reader.take(size))
                    .map_err(io_err("writing", dest))
            }
        }
    }

    /// Adds a top-level file (`oci-layout`, `index.json`).
    fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<(), ExportError> {
        match self {
            Output::Dir { staging, .. } => {
                let path = staging.path().join(name);
                fs::write(&path, bytes).map_err(io_err("writing", &path))
            }
            Output::Tar { builder, dest, .. } => {
                let mut header = tar_header(tar::EntryType::Regular, 0o644, bytes.len() as u64);
                builder
                    .append_data(&mut header, name, bytes)
                    .map_err(io_err("writing", dest))
            }
        }
    }

    /// Moves the finished layout into place.
    fn finish(self) -> Result<(), ExportError> {
        match self {
            Output::Dir { staging, dest, .. } => {
                let path = staging.path();
                for file in ["oci-layout", "index.json"] {
                    let file = path.join(file);
                    File::open(&file)
                        .and_then(|f| f.sync_all())
                        .map_err(io_err("syncing", &file))?;
                }
                fs::set_permissions(path, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("setting the mode of", path))?;
                // rename(2) replaces an empty directory.
                fs::rename(path, &dest).map_err(io_err("renaming into place", &dest))?;
                // The staging directory is gone; nothing is left for the guard to remove.
                let _ = staging.keep();
                Ok(())
            }
            Output::Tar { builder, dest, .. } => {
                let file = builder
                    .into_inner()
                    .map_err(io_err("writing", &dest))?
                    .into_inner()
                    .map_err(|e| io_err("writing", &dest)(e.into_error()))?;
                file.as_file()
                    .set_permissions(fs::Permissions::from_mode(0o644))
                    .map_err(io_err("setting the mode of", file.path()))?;
                file.as_file()
                    .sync_all()
                    .map_err(io_err("syncing", file.path()))?;
                file.persist(&dest)
                    .map_err(|e| io_err("renaming into place", &dest)(e.error))?;
                Ok(())
            }
        }
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl Fn(io::Error) -> ExportError + 'a {
    move |source| ExportError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
