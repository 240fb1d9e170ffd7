//! Imports image archives into the local blob store: OCI image layouts (a directory, or a tar
//! of one as `ctr export`, `skopeo copy oci-archive:` and `docker save` >= 25 write them) and
//! the legacy `docker save` tarball (`manifest.json` naming a config and layer tars).
//!
//! Archives are untrusted. A tar is first extracted in one pass into a private directory under
//! `blobs/.tmp/` (see [`extract`] for what it accepts), then every blob an image needs is
//! streamed into the [`BlobDir`] with its size and digest checked, so an archive can only ever
//! add correct blobs. Only the linux/amd64 image of a multi-platform index is imported.

mod extract;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::blobs::BlobDir;
use crate::oci::{
    self, Descriptor, Digest, ImageConfig, Index, Manifest, OciError, OciLayout,
    ANNOTATION_REF_NAME, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST,
};
use crate::unpack::{self, Compression};

/// Annotation containerd and Docker put on `index.json` entries: the image's full name
/// (`docker.io/library/busybox:latest`), where `org.opencontainers.image.ref.name` often
/// holds only the tag.
pub const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// The files that mark an OCI image layout.
const OCI_MARKERS: [&str; 2] = ["oci-layout", "index.json"];
/// The file that marks a legacy `docker save` tarball.
const DOCKER_MANIFEST: &str = "manifest.json";
/// Where [`BlobDir`] keeps temporary files; extraction directories go there too, so they are
/// on the store's file system and never mistaken for blobs.
const SCRATCH_PARENT: &str = "blobs/.tmp";
/// How many top-level names an unrecognised archive's error lists.
const LISTED_NAMES: usize = 10;

const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_TYPE_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "`{}` is not an image archive: expected `oci-layout` and `index.json` (an OCI image \
         layout) or `manifest.json` (a `docker save` tarball) at its top level; found {}",
        path.display(),
        list(found)
    )]
    NotRecognised { path: PathBuf, found: Vec<String> },
    #[error("`{}` holds no images: its index.json or manifest.json lists none", path.display())]
    Empty { path: PathBuf },
    #[error("reading the archive `{}`", path.display())]
    Tar {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsafe name `{name}` in the archive: {reason}")]
    UnsafeName { name: String, reason: &'static str },
    #[error("{action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {digest}, named by {referrer}, is not in the archive")]
    MissingBlob { digest: Digest, referrer: String },
    #[error("`{name}`, named by manifest.json, is not in the archive")]
    MissingFile { name: String },
    #[error("parsing `{file}` from the archive")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{file}` is {size} bytes, more than the {limit} allowed for a JSON document")]
    TooLarge { file: String, size: u64, limit: u64 },
    #[error(
        "manifest.json lists {layers} layers with config `{config}`, whose rootfs.diff_ids has \
         {diff_ids}"
    )]
    LayerCount {
        config: String,
        layers: usize,
        diff_ids: usize,
    },
    #[error("reading the OCI image layout in `{}`", path.display())]
    Layout {
        path: PathBuf,
        #[source]
        source: OciError,
    },
    #[error("importing {what}")]
    Import {
        what: String,
        #[source]
        source: OciError,
    },
    #[error(transparent)]
    Oci(#[from] OciError),
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "nothing".to_owned()
    } else {
        items.join(", ")
    }
}

/// One image taken from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// The names the archive gives the image, as written there (a full name such as
    /// `docker.io/library/busybox:latest`, a short one such as `busybox:latest`, or only a
    /// tag); empty for an untagged image. Entries naming the same manifest are merged.
    pub references: Vec<String>,
    /// The image manifest, stored in the [`BlobDir`] with its config and layers (and the index
    /// it was chosen from). It carries the platform when chosen from an index, no annotations.
    pub manifest: Descriptor,
}

/// Imports every image of an OCI image layout directory (or of an extracted `docker save`
/// tarball) into `blobs`.
pub fn import_layout_dir(dir: &Path, blobs: &BlobDir) -> Result<Vec<ImportedImage>, ArchiveError> {
    import_tree(dir, dir, blobs)
}

/// Imports every image of a tar archive (plain, gzip or zstd, told apart by their first
/// bytes) holding an OCI image layout or a `docker save` tarball into `blobs`.
///
/// The archive is extracted into a scratch directory under the layout's `blobs/.tmp/`, which
/// needs room for the uncompressed archive while the import runs and is removed afterwards.
pub fn import_archive(path: &Path, blobs: &BlobDir) -> Result<Vec<ImportedImage>, ArchiveError> {
    let parent = blobs.layout().join(SCRATCH_PARENT);
    let scratch = tempfile::Builder::new()
        .prefix("import-")
        .tempdir_in(&parent)
        .map_err(|source| ArchiveError::Io {
            action: "creating a scratch directory in",
            path: parent,
            source,
        })?;
    extract::extract(path, scratch.path())?;
    import_tree(scratch.path(), path, blobs)
}

/// Imports the archive extracted at `root`; `source` names it in errors.
fn import_tree(
    root: &Path,
    source: &Path,
    blobs: &BlobDir,
) -> Result<Vec<ImportedImage>, ArchiveError> {
    let images = if OCI_MARKERS.iter().all(|name| root.join(name).is_file()) {
        import_oci(root, source, blobs)?
    } else if root.join(DOCKER_MANIFEST).is_file() {
        import_docker(root, blobs)?
    } else {
        return Err(ArchiveError::NotRecognised {
            path: source.to_path_buf(),
            found: top_level_names(root),
        });
    };
    if images.is_empty() {
        return Err(ArchiveError::Empty {
            path: source.to_path_buf(),
        });
    }
    Ok(images)
}

/// Adds `manifest` to `images` under `references`, merging with an earlier entry for the
/// same manifest.
fn record(
    images: &mut Vec<ImportedImage>,
    manifest: Descriptor,
    references: impl IntoIterator<Item = String>,
) {
    let at = match images
        .iter()
        .position(|image| image.manifest.digest == manifest.digest)
    {
        Some(at) => at,
        None => {
            images.push(ImportedImage {
                references: Vec::new(),
                manifest,
            });
            images.len() - 1
        }
    };
    let known = &mut images[at].references;
    for reference in references {
        if !known.contains(&reference) {
            known.push(reference);
        }
    }
}

/// The sorted top-level names of `root`, for the error about an unrecognised archive.
fn top_level_names(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.len() > LISTED_NAMES {
        names.truncate(LISTED_NAMES);
        names.push("...".to_owned());
    }
    names
}

// ---- OCI image layouts ----

fn import_oci(
    root: &Path,
    source: &Path,
    blobs: &BlobDir,
) -> Result<Vec<ImportedImage>, ArchiveError> {
    let layout = OciLayout::open(root).map_err(|source_error| ArchiveError::Layout {
        path: source.to_path_buf(),
        source: source_error,
    })?;
    let mut images = Vec::new();
    for entry in &layout.index().manifests {
        let manifest = copy_image(&layout, entry, "index.json", blobs, 0)?;
        let name = entry
            .annotations
            .get(ANNOTATION_IMAGE_NAME)
            .or_else(|| entry.annotations.get(ANNOTATION_REF_NAME));
        record(&mut images, manifest, name.cloned());
    }
    Ok(images)
}

/// Copies the image `descriptor` names into `blobs`, following indexes to their linux/amd64
/// manifest, and returns that manifest's descriptor. Blobs are stored children first.
fn copy_image(
    layout: &OciLayout,
    descriptor: &Descriptor,
    referrer: &str,
    blobs: &BlobDir,
    depth: usize,
) -> Result<Descriptor, ArchiveError> {
    match descriptor.media_type.as_str() {
        MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST => {
            if depth >= oci::MAX_INDEX_DEPTH {
                return Err(OciError::NestingTooDeep {
                    digest: descriptor.digest.clone(),
                }
                .into());
            }
            let bytes = read_json_blob(layout, descriptor, referrer)?;
            let index: Index = parse_blob(&bytes, descriptor, "an image index")?;
            let entries: Vec<&Descriptor> = index.manifests.iter().collect();
            let chosen = oci::choose(&entries)?;
            let referrer = format!("index {}", descriptor.digest);
            let manifest = copy_image(layout, chosen, &referrer, blobs, depth + 1)?;
            store_json(blobs, &bytes, descriptor)?;
            Ok(manifest)
        }
        MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {
            let bytes = read_json_blob(layout, descriptor, referrer)?;
            let manifest: Manifest = parse_blob(&bytes, descriptor, "an image manifest")?;
            let referrer = format!("manifest {}", descriptor.digest);
            copy_blob(layout, &manifest.config, &referrer, blobs)?;
            for layer in &manifest.layers {
                copy_blob(layout, layer, &referrer, blobs)?;
            }
            store_json(blobs, &bytes, descriptor)?;
            Ok(Descriptor {
                annotations: BTreeMap::new(),
                ..descriptor.clone()
            })
        }
        other => Err(OciError::UnsupportedMediaType {
            what: "manifest",
            digest: descriptor.digest.clone(),
            media_type: other.to_owned(),
        }
        .into()),
    }
}

/// Reads a manifest or index from the layout, verified against its descriptor.
fn read_json_blob(
    layout: &OciLayout,
    descriptor: &Descriptor,
    referrer: &str,
) -> Result<Vec<u8>, ArchiveError> {
    if !layout.blob_path(&descriptor.digest).is_file() {
        return Err(missing_blob(descriptor, referrer));
    }
    layout
        .read_blob(descriptor)
        .map_err(|source| ArchiveError::Import {
            what: format!("blob {} named by {referrer}", descriptor.digest),
            source,
        })
}

fn parse_blob<T: DeserializeOwned>(
    bytes: &[u8],
    descriptor: &Descriptor,
    what: &'static str,
) -> Result<T, ArchiveError> {
    serde_json::from_slice(bytes).map_err(|source| {
        OciError::BlobJson {
            digest: descriptor.digest.clone(),
            what,
            source,
        }
        .into()
    })
}

/// Stores a manifest or index already verified against `descriptor`.
fn store_json(blobs: &BlobDir, bytes: &[u8], descriptor: &Descriptor) -> Result<(), ArchiveError> {
    blobs
        .write_bytes(bytes)
        .map(drop)
        .map_err(|source| ArchiveError::Import {
            what: format!("blob {}", descriptor.digest),
            source,
        })
}

/// Streams a config or layer blob from the layout into `blobs`, unless already there.
fn copy_blob(
    layout: &OciLayout,
    descriptor: &Descriptor,
    referrer: &str,
    blobs: &BlobDir,
) -> Result<(), ArchiveError> {
    let digest = &descriptor.digest;
    if blobs.contains(digest, descriptor.size) {
        return Ok(());
    }
    let path = layout.blob_path(digest);
    let import_error = |source| ArchiveError::Import {
        what: format!("blob {digest} named by {referrer}"),
        source,
    };
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(missing_blob(descriptor, referrer))
        }
        Err(source) => return Err(io_error("opening", &path, source)),
    };
    let actual = file
        .metadata()
        .map_err(|source| io_error("reading", &path, source))?
        .len();
    if actual != descriptor.size {
        return Err(import_error(OciError::SizeMismatch {
            digest: digest.clone(),
            expected: descriptor.size,
            actual,
        }));
    }
    blobs
        .write(&mut file, Some((digest, descriptor.size)))
        .map_err(import_error)?;
    Ok(())
}

fn missing_blob(descriptor: &Descriptor, referrer: &str) -> ArchiveError {
    ArchiveError::MissingBlob {
        digest: descriptor.digest.clone(),
        referrer: referrer.to_owned(),
    }
}

// ---- Legacy `docker save` tarballs ----

/// One image of a legacy `docker save` `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerSaveImage {
    /// The config file (`<hex>.json`, or `blobs/sha256/<hex>` since Docker 25).
    config: String,
    /// `null` for an untagged image.
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    /// The layer files, lowest first (`<id>/layer.tar`, or `blobs/sha256/<hex>`).
    layers: Vec<String>,
}

fn import_docker(root: &Path, blobs: &BlobDir) -> Result<Vec<ImportedImage>, ArchiveError> {
    let bytes = read_small_file(root, DOCKER_MANIFEST)?;
    let entries: Vec<DockerSaveImage> =
        serde_json::from_slice(&bytes).map_err(|source| ArchiveError::Json {
            file: DOCKER_MANIFEST.to_owned(),
            source,
        })?;
    let mut images = Vec::new();
    for entry in &entries {
        let manifest = import_docker_image(root, entry, blobs)?;
        record(
            &mut images,
            manifest,
            entry.repo_tags.iter().flatten().cloned(),
        );
    }
    Ok(images)
}

/// Stores one legacy image's config and layers and a synthesized OCI manifest for them.
fn import_docker_image(
    root: &Path,
    entry: &DockerSaveImage,
    blobs: &BlobDir,
) -> Result<Descriptor, ArchiveError> {
    let bytes = read_small_file(root, &entry.config)?;
    let config: ImageConfig =
        serde_json::from_slice(&bytes).map_err(|source| ArchiveError::Json {
            file: entry.config.clone(),
            source,
        })?;
    let diff_ids = &config.rootfs.diff_ids;
    if diff_ids.len() != entry.layers.len() {
        return Err(ArchiveError::LayerCount {
            config: entry.config.clone(),
            layers: entry.layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    let config_digest = Digest::of(&bytes);
    if let Some(named) = digest_in_name(&entry.config) {
        if named != config_digest {
            return Err(ArchiveError::Import {
                what: format!("`{}`", entry.config),
                source: OciError::DigestMismatch {
                    expected: named,
                    actual: config_digest,
                },
            });
        }
    }
    blobs
        .write_bytes(&bytes)
        .map_err(|source| ArchiveError::Import {
            what: format!("`{}`", entry.config),
            source,
        })?;
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(name, diff_id)| import_docker_layer(root, name, diff_id, blobs))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
        config: plain_descriptor(MEDIA_TYPE_CONFIG, config_digest, bytes.len() as u64),
        layers,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|source| ArchiveError::Json {
        file: "the manifest made for it".to_owned(),
        source,
    })?;
    let digest = blobs
        .write_bytes(&manifest_bytes)
        .map_err(|source| ArchiveError::Import {
            what: format!("the manifest made for `{}`", entry.config),
            source,
        })?;
    Ok(plain_descriptor(
        MEDIA_TYPE_MANIFEST,
        digest,
        manifest_bytes.len() as u64,
    ))
}

/// Streams one legacy layer file into `blobs`. An uncompressed layer must hash to its
/// `diff_id`; a compressed one to the digest in its name when it has one (`blobs/sha256/..`).
fn import_docker_layer(
    root: &Path,
    name: &str,
    diff_id: &Digest,
    blobs: &BlobDir,
) -> Result<Descriptor, ArchiveError> {
    let (path, mut file) = open_named(root, name)?;
    let read_error = |source| io_error("reading", &path, source);
    let size = file.metadata().map_err(read_error)?.len();
    let compression = sniff(&mut file).map_err(read_error)?;
    let media_type = layer_media_type(compression);
    let expected = match compression {
        Compression::None => Some(diff_id.clone()),
        Compression::Gzip | Compression::Zstd => digest_in_name(name),
    };
    if let Some(digest) = expected.as_ref().filter(|d| blobs.contains(d, size)) {
        return Ok(plain_descriptor(media_type, digest.clone(), size));
    }
    let (digest, size) = blobs
        .write(&mut file, expected.as_ref().map(|d| (d, size)))
        .map_err(|source| ArchiveError::Import {
            what: format!("layer `{name}`"),
            source,
        })?;
    Ok(plain_descriptor(media_type, digest, size))
}

/// Imports a plain root file system tarball (plain, gzip or zstd; what `mmdebstrap` or
/// `tar -C rootfs -c .` write, like `docker import`) as a one-layer image with an empty run
/// config, and returns its manifest. The tarball is stored as the layer as is; its entries are
/// checked when the image is unpacked.
pub fn import_rootfs(path: &Path, blobs: &BlobDir) -> Result<Descriptor, ArchiveError> {
    let mut file = File::open(path).map_err(|source| io_error("opening", path, source))?;
    let compression = sniff(&mut file).map_err(|source| io_error("reading", path, source))?;
    let (digest, size) = blobs
        .write(&mut file, None)
        .map_err(|source| ArchiveError::Import {
            what: format!("`{}`", path.display()),
            source,
        })?;
    let media_type = layer_media_type(compression);
    let diff_id = match compression {
        Compression::None => digest.clone(),
        _ => {
            let stored = blobs.path(&digest);
            let blob =
                File::open(&stored).map_err(|source| io_error("reading", &stored, source))?;
            uncompressed_digest(io::BufReader::new(blob), compression)
                .map_err(|source| io_error("decompressing", path, source))?
        }
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    });
    let config = serde_json::to_vec(&config).expect("a config serializes");
    let store = |bytes: &[u8], what: &str| {
        blobs
            .write_bytes(bytes)
            .map_err(|source| ArchiveError::Import {
                what: what.to_owned(),
                source,
            })
    };
    let config_digest = store(&config, "the config made for the root file system")?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
        config: plain_descriptor(MEDIA_TYPE_CONFIG, config_digest, config.len() as u64),
        layers: vec![plain_descriptor(media_type, digest, size)],
    };
    let manifest = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let manifest_digest = store(&manifest, "the manifest made for the root file system")?;
    Ok(plain_descriptor(
        MEDIA_TYPE_MANIFEST,
        manifest_digest,
        manifest.len() as u64,
    ))
}

/// The compression a file's first bytes show; the file is left at its start.
fn sniff(file: &mut File) -> io::Result<Compression> {
    let mut head = Vec::with_capacity(4);
    (&mut *file).take(4).read_to_end(&mut head)?;
    file.rewind()?;
    Ok(unpack::detect(&head))
}

/// The OCI layer media type of a tar with this compression.
fn layer_media_type(compression: Compression) -> &'static str {
    match compression {
        Compression::None => MEDIA_TYPE_LAYER,
        Compression::Gzip => MEDIA_TYPE_LAYER_GZIP,
        Compression::Zstd => MEDIA_TYPE_LAYER_ZSTD,
    }
}

/// The sha256 of what `reader` decompresses to.
fn uncompressed_digest(reader: impl Read, compression: Compression) -> io::Result<Digest> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut sink = crate::blobs::HashWriter(&mut hasher);
    io::copy(&mut compression.decoder(reader)?, &mut sink)?;
    Ok(Digest::from_sha256(hasher))
}

fn plain_descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// The digest a legacy file name carries: `<hex>.json` (configs before Docker 25) or
/// `blobs/sha256/<hex>`.
fn digest_in_name(name: &str) -> Option<Digest> {
    let file = name.rsplit('/').next()?;
    let hex = file.strip_suffix(".json").unwrap_or(file);
    Digest::parse(&format!("sha256:{hex}")).ok()
}

/// Opens a file `manifest.json` names, which must be a plain relative path inside `root`.
fn open_named(root: &Path, name: &str) -> Result<(PathBuf, File), ArchiveError> {
    let relative =
        extract::clean_relative(Path::new(name)).map_err(|reason| ArchiveError::UnsafeName {
            name: name.to_owned(),
            reason,
        })?;
    let path = root.join(relative);
    match File::open(&path) {
        Ok(file) if path.is_file() => Ok((path, file)),
        Ok(_) => Err(ArchiveError::MissingFile {
            name: name.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ArchiveError::MissingFile {
            name: name.to_owned(),
        }),
        Err(source) => Err(io_error("opening", &path, source)),
    }
}

/// Reads a JSON file of a legacy archive whole, refusing oversized ones.
fn read_small_file(root: &Path, name: &str) -> Result<Vec<u8>, ArchiveError> {
    let (path, file) = open_named(root, name)?;
    let size = file
        .metadata()
        .map_err(|source| io_error("reading", &path, source))?
        .len();
    if size > oci::JSON_BLOB_LIMIT {
        return Err(ArchiveError::TooLarge {
            file: name.to_owned(),
            size,
            limit: oci::JSON_BLOB_LIMIT,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(oci::JSON_BLOB_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| io_error("reading", &path, source))?;
    Ok(bytes)
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> ArchiveError {
    ArchiveError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}
