//! The local image store: OCI blobs and a reference index, plus the ext4 root file systems
//! made from them, all under `<images_dir>/.store/`.
//!
//! ```text
//! <images_dir>/.store/
//!   layout/                 an OCI image layout: oci-layout, index.json, blobs/sha256/...
//!                           index.json names each image by its full reference
//!                           (`org.opencontainers.image.ref.name` = docker.io/library/busybox:latest)
//!   rootfs/<hex>/           one converted image, by manifest digest:
//!     rootfs.ext4           the base disk sandboxes boot from (read-only, shared)
//!     config.json           the image's OCI config blob (ENV, WORKDIR, USER, ENTRYPOINT...)
//!   rootfs/.tmp-*/          conversions in progress (swept when nobody holds the lock)
//!   lock                    flock: index changes and garbage collection
//! ```
//!
//! The directory name starts with a dot so it can never collide with a named local image
//! (`<images_dir>/<name>/rootfs.ext4`, names start with a letter or digit).
//!
//! Conversions are all-or-nothing: a tree is unpacked and packed in a temporary directory that
//! is renamed into place only when complete, so a crash or a bad layer leaves no image behind.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::blobs::{write_atomically, BlobDir};
use crate::ext4::{self, Ext4Error};
use crate::oci::{
    self, Descriptor, Digest, ImageConfig, Index, OciError, OciLayout, ANNOTATION_REF_NAME,
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_INDEX,
};
use crate::unpack::UnpackOptions;

/// The store's directory under the images directory.
pub const STORE_DIR: &str = ".store";
/// Free space given to every converted image beyond its content, so sandboxes can write.
/// The file is sparse: unused space costs nothing on the host.
pub const DEFAULT_FREE_BYTES: u64 = 2 << 30;
/// Manifest annotation of images whose disk was made directly (builds): what it came from.
pub const ANNOTATION_DISK_ORIGIN: &str = "io.arrakis.disk.origin";
/// Shortest digest prefix accepted as an image id.
const MIN_ID_LEN: usize = 12;
/// Directories a booting guest mounts file systems on; made in every converted image.
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "run", "tmp", "root"];

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid image reference {reference:?}: {reason}; expected [REGISTRY/]NAME[:TAG][@sha256:DIGEST], e.g. python:3.12-slim or localhost:5000/team/app:1")]
    InvalidReference { reference: String, reason: String },
    #[error("no image {wanted:?} in the store; {}", hint(available))]
    NotFound {
        wanted: String,
        available: Vec<String>,
    },
    #[error("{wanted:?} matches several images: {}; use more of the id", matches.join(", "))]
    Ambiguous {
        wanted: String,
        matches: Vec<String>,
    },
    #[error("{action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the store's index")]
    Index(#[source] OciError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("building the root file system of {digest}")]
    Ext4 {
        digest: Digest,
        #[source]
        source: Ext4Error,
    },
    #[error("image {digest} has no layers and its disk is gone; build it again")]
    DiskMissing { digest: Digest },
    #[error("image {reference} is used by {}; remove them first", users.join(", "))]
    InUse {
        reference: String,
        users: Vec<String>,
    },
}

fn hint(available: &[String]) -> String {
    if available.is_empty() {
        "the store is empty: pull one with `arrakis image pull REF` or import one with `arrakis image import FILE`".to_owned()
    } else {
        format!("available: {}", available.join(", "))
    }
}

/// A normalized image reference: `busybox` is `docker.io/library/busybox:latest`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef(String);

impl ImageRef {
    /// Parses and normalizes a reference the way Docker does.
    pub fn parse(input: &str) -> Result<ImageRef, StoreError> {
        let invalid = |reason: String| StoreError::InvalidReference {
            reference: input.to_owned(),
            reason,
        };
        if input.trim() != input || input.is_empty() {
            return Err(invalid("empty or surrounded by spaces".into()));
        }
        let parsed = oci_client::Reference::from_str(input).map_err(|e| invalid(e.to_string()))?;
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository names must be lowercase".into()));
        }
        Ok(ImageRef(parsed.whole()))
    }

    /// The full form, as stored in the index.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The short form users type: without `docker.io/library/` or `docker.io/`.
    pub fn familiar(&self) -> &str {
        familiar(&self.0)
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `docker.io/library/busybox:latest` -> `busybox:latest`; other references unchanged.
pub fn familiar(full: &str) -> &str {
    full.strip_prefix("docker.io/library/")
        .or_else(|| full.strip_prefix("docker.io/"))
        .unwrap_or(full)
}

/// One tagged image, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    pub reference: ImageRef,
    /// Digest of the image's manifest (or index): its identity.
    pub digest: Digest,
    /// Whether its root file system has been built.
    pub converted: bool,
    /// Bytes its root file system occupies on disk (sparse), when converted.
    pub disk_bytes: Option<u64>,
}

/// A converted image, ready to boot.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub digest: Digest,
    /// `rootfs/<hex>/rootfs.ext4`.
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// Whether this call built it (false: it was already there).
    pub built: bool,
}

/// What garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub rootfs_removed: Vec<Digest>,
    /// Cached build steps removed (only when asked to).
    pub build_steps_removed: usize,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
}

/// The image store of one images directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    blobs: BlobDir,
}

impl ImageStore {
    /// Opens (creating when missing) the store under `images_dir`.
    pub fn open(images_dir: &Path) -> Result<ImageStore, StoreError> {
        let dir = images_dir.join(STORE_DIR);
        let layout = dir.join("layout");
        let blobs = BlobDir::create(&layout).map_err(io_err("creating", &layout))?;
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(io_err("creating", &rootfs))?;
        let index = layout.join("index.json");
        if !index.exists() {
            let empty = Index {
                schema_version: 2,
                media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
                manifests: Vec::new(),
            };
            write_json(&index, &empty)?;
        }
        Ok(ImageStore { dir, blobs })
    }

    /// Where blobs are written (pulls and imports write here, then [`ImageStore::tag`]).
    pub fn blobs(&self) -> &BlobDir {
        &self.blobs
    }

    /// The store's directory (`<images_dir>/.store`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Points `reference` at `manifest` (whose blobs must be in the store), replacing what it
    /// pointed at before.
    pub fn tag(&self, reference: &ImageRef, manifest: &Descriptor) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.ref_name() != Some(reference.as_str()));
        let mut entry = manifest.clone();
        entry.platform = None;
        entry.annotations = BTreeMap::from([(
            ANNOTATION_REF_NAME.to_owned(),
            reference.as_str().to_owned(),
        )]);
        index.manifests.push(entry);
        index
            .manifests
            .sort_by(|a, b| a.ref_name().cmp(&b.ref_name()));
        self.write_index(&index)
    }

    /// Finds an image by reference (`busybox`, `localhost:5000/app:1`), by digest
    /// (`sha256:<hex>`) or by a prefix of at least 12 hex digits of its digest.
    pub fn lookup(&self, wanted: &str) -> Result<(ImageRef, Descriptor), StoreError> {
        let index = self.read_index()?;
        let tagged = || {
            index
                .manifests
                .iter()
                .filter_map(|d| Some((d.ref_name()?, d)))
        };
        let not_found = || StoreError::NotFound {
            wanted: wanted.to_owned(),
            available: tagged().map(|(r, _)| familiar(r).to_owned()).collect(),
        };
        let hex = wanted.strip_prefix("sha256:").unwrap_or(wanted);
        if hex.len() >= MIN_ID_LEN && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hex = hex.to_ascii_lowercase();
            let mut matches: Vec<(&str, &Descriptor)> = tagged()
                .filter(|(_, d)| d.digest.hex().starts_with(&hex))
                .collect();
            matches.dedup_by(|a, b| a.1.digest == b.1.digest);
            return match matches.as_slice() {
                [] => Err(not_found()),
                [(reference, descriptor)] => {
                    Ok((ImageRef(reference.to_string()), (*descriptor).clone()))
                }
                many => Err(StoreError::Ambiguous {
                    wanted: wanted.to_owned(),
                    matches: many.iter().map(|(_, d)| d.digest.to_string()).collect(),
                }),
            };
        }
        let reference = ImageRef::parse(wanted)?;
        tagged()
            .find(|(r, _)| *r == reference.as_str())
            .map(|(_, d)| (reference.clone(), d.clone()))
            .ok_or_else(not_found)
    }

    /// Every tagged image, sorted by reference.
    pub fn list(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let index = self.read_index()?;
        Ok(index
            .manifests
            .iter()
            .filter_map(|d| {
                let reference = ImageRef(d.ref_name()?.to_owned());
                let rootfs = self.rootfs_path(&d.digest);
                let disk_bytes = fs::metadata(&rootfs)
                    .ok()
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
                Some(ImageSummary {
                    reference,
                    digest: d.digest.clone(),
                    converted: disk_bytes.is_some(),
                    disk_bytes,
                })
            })
            .collect())
    }

    /// Where the root file system of the image with this manifest digest is (or would be).
    pub fn rootfs_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("rootfs")
            .join(digest.hex())
            .join("rootfs.ext4")
    }

    /// Reads the config of a converted image from beside its root file system.
    pub fn converted_config(rootfs: &Path) -> Option<ImageConfig> {
        let data = fs::read(rootfs.with_file_name("config.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }

    /// Returns the image's root file system, building it first when it is missing:
    /// layers unpacked in order (whiteouts applied, digests verified), then packed into a
    /// sparse ext4 file with `free_bytes` of room beyond the content.
    pub fn prepare(
        &self,
        manifest: &Descriptor,
        free_bytes: u64,
    ) -> Result<PreparedImage, StoreError> {
        let digest = manifest.digest.clone();
        let target = self.dir.join("rootfs").join(digest.hex());
        let rootfs = target.join("rootfs.ext4");
        let layout = OciLayout::open(self.blobs.layout()).map_err(StoreError::Index)?;
        let (image_manifest, config) = layout.image(manifest)?;
        // One conversion per image at a time; a second caller waits and then finds it done.
        let lock_path = self
            .dir
            .join("rootfs")
            .join(format!("{}.lock", digest.hex()));
        let _lock = FileLock::exclusive(&lock_path)?;
        if rootfs.is_file() {
            return Ok(PreparedImage {
                digest,
                rootfs,
                config,
                built: false,
            });
        }
        let work =
            self.dir
                .join("rootfs")
                .join(format!(".tmp-{}-{}", digest.hex(), std::process::id()));
        let _ = fs::remove_dir_all(&work);
        let result = (|| {
            let tree = work.join("tree");
            fs::create_dir_all(&tree).map_err(io_err("creating", &tree))?;
            let options = UnpackOptions::for_current_user();
            oci::unpack_image(&layout, &image_manifest, &tree, &options)?;
            for dir in MOUNT_POINTS {
                let path = tree.join(dir);
                if fs::symlink_metadata(&path).is_err() {
                    fs::create_dir(&path).map_err(io_err("creating", &path))?;
                }
            }
            let size = ext4::tree_size(&tree).map_err(|source| StoreError::Ext4 {
                digest: digest.clone(),
                source,
            })? + free_bytes;
            let image = work.join("rootfs.ext4");
            ext4::make_ext4(&tree, &image, size).map_err(|source| StoreError::Ext4 {
                digest: digest.clone(),
                source,
            })?;
            fs::remove_dir_all(&tree).map_err(io_err("removing", &tree))?;
            let config_blob = layout.read_blob(&image_manifest.config)?;
            let config_path = work.join("config.json");
            write_atomically(&config_path, &config_blob)
                .map_err(io_err("writing", &config_path))?;
            File::open(&image)
                .and_then(|f| f.sync_all())
                .map_err(io_err("syncing", &image))?;
            fs::rename(&work, &target).map_err(io_err("renaming into place", &target))
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&work);
            return Err(e);
        }
        Ok(PreparedImage {
            digest,
            rootfs,
            config,
            built: true,
        })
    }

    /// Adds an image whose disk was made here (by a build) instead of unpacked from layers:
    /// `config` (an OCI image config) and a manifest with no layers, annotated with `origin`
    /// (what the disk was made from, e.g. a build's cache key, so equal builds are one image),
    /// go into the blobs; `disk` is hard-linked (or copied) into place; `reference` is tagged.
    pub fn add_disk_image(
        &self,
        reference: &ImageRef,
        config: &[u8],
        disk: &Path,
        origin: &str,
    ) -> Result<PreparedImage, StoreError> {
        let parsed: ImageConfig = serde_json::from_slice(config).map_err(|source| {
            StoreError::Index(OciError::Json {
                path: disk.to_path_buf(),
                source,
            })
        })?;
        let config_digest = self.blobs.write_bytes(config)?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_TYPE_MANIFEST,
            "config": {
                "mediaType": oci::MEDIA_TYPE_CONFIG,
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": [],
            "annotations": { ANNOTATION_DISK_ORIGIN: origin },
        });
        let manifest = serde_json::to_vec(&manifest).expect("manifest serializes");
        let digest = self.blobs.write_bytes(&manifest)?;
        let descriptor = Descriptor {
            media_type: oci::MEDIA_TYPE_MANIFEST.to_owned(),
            digest: digest.clone(),
            size: manifest.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        };
        let target = self.dir.join("rootfs").join(digest.hex());
        let rootfs = target.join("rootfs.ext4");
        let lock_path = self
            .dir
            .join("rootfs")
            .join(format!("{}.lock", digest.hex()));
        let _lock = FileLock::exclusive(&lock_path)?;
        if !rootfs.is_file() {
            let work = self.work_dir(&digest);
            let result = (|| {
                fs::create_dir_all(&work).map_err(io_err("creating", &work))?;
                let image = work.join("rootfs.ext4");
                if fs::hard_link(disk, &image).is_err() {
                    copy_sparse(disk, &image)?;
                }
                let config_path = work.join("config.json");
                write_atomically(&config_path, config).map_err(io_err("writing", &config_path))?;
                fs::rename(&work, &target).map_err(io_err("renaming into place", &target))
            })();
            if let Err(e) = result {
                let _ = fs::remove_dir_all(&work);
                return Err(e);
            }
        }
        drop(_lock);
        self.tag(reference, &descriptor)?;
        Ok(PreparedImage {
            digest,
            rootfs,
            config: parsed,
            built: true,
        })
    }

    fn work_dir(&self, digest: &Digest) -> PathBuf {
        let work =
            self.dir
                .join("rootfs")
                .join(format!(".tmp-{}-{}", digest.hex(), std::process::id()));
        let _ = fs::remove_dir_all(&work);
        work
    }

    /// Keeps [`ImageStore::gc`] away while held: taken by pulls, imports and builds from their
    /// first blob to their tag, so nothing they wrote looks unreferenced in between. Many
    /// holders may run at once; gc waits for them all (and they wait for a running gc).
    pub fn hold(&self) -> Result<StoreGuard, StoreError> {
        Ok(StoreGuard {
            _lock: FileLock::lock(&self.dir.join("gc.lock"), libc::LOCK_SH)?,
        })
    }

    /// Removes `reference` from the index and returns what it pointed at. Blobs and the root
    /// file system stay until [`ImageStore::gc`].
    pub fn untag(&self, reference: &ImageRef) -> Result<Descriptor, StoreError> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let position = index
            .manifests
            .iter()
            .position(|d| d.ref_name() == Some(reference.as_str()))
            .ok_or_else(|| StoreError::NotFound {
                wanted: reference.familiar().to_owned(),
                available: Vec::new(),
            })?;
        let removed = index.manifests.remove(position);
        self.write_index(&index)?;
        Ok(removed)
    }

    /// Removes what no tag reaches: root file systems of untagged images (unless `in_use`
    /// says a sandbox or snapshot still boots from that file), blobs no tagged image
    /// references, partial downloads and leftovers of interrupted conversions. With
    /// `build_cache`, also the cached step results of image builds (`build/`) no sandbox uses;
    /// images built from them keep their own link to the disk.
    pub fn gc(
        &self,
        in_use: &dyn Fn(&Path) -> bool,
        build_cache: bool,
    ) -> Result<GcReport, StoreError> {
        let _writers = FileLock::lock(&self.dir.join("gc.lock"), libc::LOCK_EX)?;
        let _lock = self.lock()?;
        let index = self.read_index()?;
        let layout = OciLayout::open(self.blobs.layout()).map_err(StoreError::Index)?;
        let mut report = GcReport::default();
        if build_cache {
            let cache = self.dir.join("build");
            for entry in fs::read_dir(&cache).into_iter().flatten().flatten() {
                let path = entry.path();
                if in_use(&path.join("rootfs.ext4")) {
                    continue;
                }
                report.bytes_freed += dir_bytes(&path);
                fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
                report.build_steps_removed += 1;
            }
        }

        let mut live_blobs: HashSet<String> = HashSet::new();
        let mut tagged: HashSet<String> = HashSet::new();
        for descriptor in &index.manifests {
            tagged.insert(descriptor.digest.hex().to_owned());
            reachable(&layout, descriptor, &mut live_blobs);
        }

        let rootfs_dir = self.dir.join("rootfs");
        for entry in fs::read_dir(&rootfs_dir).map_err(io_err("reading", &rootfs_dir))? {
            let entry = entry.map_err(io_err("reading", &rootfs_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if let Some(rest) = name.strip_prefix(".tmp-") {
                // A conversion in progress holds its image's lock; only dead ones go.
                let hex = rest.split('-').next().unwrap_or_default();
                let lock = rootfs_dir.join(format!("{hex}.lock"));
                if FileLock::try_exclusive(&lock)?.is_some() {
                    report.bytes_freed += dir_bytes(&path);
                    let _ = fs::remove_dir_all(&path);
                }
                continue;
            }
            if name.ends_with(".lock") {
                let hex = name.trim_end_matches(".lock");
                if !rootfs_dir.join(hex).exists() {
                    let _ = fs::remove_file(&path);
                }
                continue;
            }
            if tagged.contains(&name) || in_use(&path.join("rootfs.ext4")) {
                continue;
            }
            let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            report.bytes_freed += dir_bytes(&path);
            fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
            report.rootfs_removed.push(digest);
        }

        let blob_dir = self.blobs.layout().join("blobs/sha256");
        for entry in fs::read_dir(&blob_dir).map_err(io_err("reading", &blob_dir))? {
            let entry = entry.map_err(io_err("reading", &blob_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if live_blobs.contains(&name) {
                continue;
            }
            report.bytes_freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(entry.path()).map_err(io_err("removing", &entry.path()))?;
            report.blobs_removed += 1;
        }
        let partial = self.blobs.layout().join("blobs/.partial");
        report.bytes_freed += dir_bytes(&partial);
        let _ = fs::remove_dir_all(&partial);
        let _ = fs::create_dir_all(&partial);
        let _ = self.blobs.sweep_temporary();
        Ok(report)
    }

    fn read_index(&self) -> Result<Index, StoreError> {
        let path = self.blobs.layout().join("index.json");
        let data = fs::read(&path).map_err(io_err("reading", &path))?;
        serde_json::from_slice(&data).map_err(|source| {
            StoreError::Index(OciError::Json {
                path: path.clone(),
                source,
            })
        })
    }

    fn write_index(&self, index: &Index) -> Result<(), StoreError> {
        write_json(&self.blobs.layout().join("index.json"), index)
    }

    fn lock(&self) -> Result<FileLock, StoreError> {
        FileLock::exclusive(&self.dir.join("lock"))
    }
}

/// Adds the blobs `descriptor` reaches (itself, nested manifests, configs, layers) to `live`.
/// Blobs that cannot be read end the walk there: what they would reach is not protected, which
/// is right for a store that lost them anyway.
fn reachable(layout: &OciLayout, descriptor: &Descriptor, live: &mut HashSet<String>) {
    live.insert(descriptor.digest.hex().to_owned());
    match descriptor.media_type.as_str() {
        MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST => {
            let Ok(data) = layout.read_blob(descriptor) else {
                return;
            };
            let Ok(index) = serde_json::from_slice::<Index>(&data) else {
                return;
            };
            for entry in &index.manifests {
                reachable(layout, entry, live);
            }
        }
        _ => {
            let Ok(data) = layout.read_blob(descriptor) else {
                return;
            };
            let Ok(manifest) = serde_json::from_slice::<oci::Manifest>(&data) else {
                return;
            };
            live.insert(manifest.config.digest.hex().to_owned());
            for layer in &manifest.layers {
                live.insert(layer.digest.hex().to_owned());
            }
        }
    }
}

/// Copies a (sparse) disk image keeping its holes.
fn copy_sparse(from: &Path, to: &Path) -> Result<(), StoreError> {
    let output = std::process::Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err("running cp for", to))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io_err("copying to", to)(io::Error::other(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        )))
    }
}

fn dir_bytes(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| dir_bytes(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let data = serde_json::to_vec_pretty(value).expect("index serializes");
    write_atomically(path, &data).map_err(io_err("writing", path))
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl Fn(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A pull, import or build in progress (see [`ImageStore::hold`]).
pub struct StoreGuard {
    _lock: FileLock,
}

/// An `flock` on a file, released on drop.
struct FileLock(File);

impl FileLock {
    fn exclusive(path: &Path) -> Result<FileLock, StoreError> {
        FileLock::lock(path, libc::LOCK_EX)
    }

    fn lock(path: &Path, operation: libc::c_int) -> Result<FileLock, StoreError> {
        let file = open_lock_file(path)?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), operation) };
            if rc == 0 {
                return Ok(FileLock(file));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("locking", path)(err));
            }
        }
    }

    fn try_exclusive(path: &Path) -> Result<Option<FileLock>, StoreError> {
        let file = open_lock_file(path)?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            Ok(Some(FileLock(file)))
        } else {
            Ok(None)
        }
    }
}

fn open_lock_file(path: &Path) -> Result<File, StoreError> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests;
