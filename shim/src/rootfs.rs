//! The container's root file system as a microVM disk.
//!
//! containerd hands the shim its snapshot as mounts (with the overlay
//! snapshotter: one `overlay` mount whose `lowerdir`s are the image's layers
//! and whose `upperdir` is the container's own, empty, writable layer). A
//! VM cannot use a host overlay directly (no virtio-fs here), so the tree is
//! converted once into an ext4 image in the arrakis image store and booted
//! like any other image: read-only and shared, with a copy-on-write layer per
//! sandbox.
//!
//! The conversion is cached by snapshot identity: committed layers are
//! immutable, so an overlay whose upper layer is empty is identified by its
//! lower directories (path, device, inode and change time of each). Two
//! containers of one image share one conversion, and the second starts
//! without copying anything. Anything else (a non-empty upper layer, a bind
//! mount, several mounts) is converted for this container only, from the
//! mounted tree, and left for `arrakis image gc` once the container is gone.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use arrakis_image::store::{ImageRef, ImageStore};
use arrakis_runtime::Manager;
use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use sha2::{Digest, Sha256};

use crate::error::ShimError;

/// The repository conversions are tagged under (`<repo>:<key>`).
pub const REPOSITORY: &str = "arrakis.local/containerd-rootfs";

/// Where a container's root comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Read-only layers, topmost first: cacheable.
    Layers(Vec<PathBuf>),
    /// Something with container-specific content: mount it and convert it.
    Mounts(Vec<Mount>),
}

/// Classifies the mounts of `CreateTaskRequest.rootfs`.
pub fn classify(mounts: &[Mount]) -> Result<Source, ShimError> {
    if mounts.is_empty() {
        return Err(ShimError::invalid(
            "rootfs",
            "no root file system mounts (the bundle's own rootfs directory is not supported)",
        ));
    }
    if let [only] = mounts {
        if only.type_ == "overlay" {
            let mut lower = Vec::new();
            let mut upper = None;
            for option in &only.options {
                if let Some(dirs) = option.strip_prefix("lowerdir=") {
                    lower.extend(dirs.split(':').map(PathBuf::from));
                } else if let Some(dir) = option.strip_prefix("upperdir=") {
                    upper = Some(PathBuf::from(dir));
                }
            }
            let upper_empty = match &upper {
                None => true,
                Some(dir) => dir_is_empty(dir)?,
            };
            if !lower.is_empty() && upper_empty {
                return Ok(Source::Layers(lower));
            }
        }
    }
    Ok(Source::Mounts(mounts.to_vec()))
}

fn dir_is_empty(dir: &Path) -> Result<bool, ShimError> {
    let mut entries = fs::read_dir(dir).map_err(|e| ShimError::io("reading", dir, e))?;
    Ok(entries.next().is_none())
}

/// The cache key of read-only layers: their order and identity.
pub fn layers_key(layers: &[PathBuf]) -> Result<String, ShimError> {
    let mut hash = Sha256::new();
    for dir in layers {
        let meta = fs::metadata(dir).map_err(|e| ShimError::io("reading", dir, e))?;
        hash.update(dir.as_os_str().as_encoded_bytes());
        hash.update(
            format!(
                "\0{}:{}:{}.{}\n",
                meta.dev(),
                meta.ino(),
                meta.ctime(),
                meta.ctime_nsec()
            )
            .as_bytes(),
        );
    }
    let digest = hash.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}

/// A converted root file system, ready to be a sandbox's image.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What to put in the sandbox spec's `image`.
    pub reference: String,
    /// Whether this container owns the conversion (untag it on delete).
    pub private: bool,
}

/// Returns the image for `source`, converting it if needed. `bundle` is the
/// task's bundle (its `rootfs` directory is the mount point); `scratch` a
/// directory for temporary files on the same disk as the store.
pub async fn prepare(
    manager: &Manager,
    source: Source,
    bundle: &Path,
    key_hint: &str,
) -> Result<Prepared, ShimError> {
    let store = manager.image_store()?;
    let free = manager.config().image_free_bytes();
    match source {
        Source::Layers(layers) => {
            let key = layers_key(&layers)?;
            let reference = format!("{REPOSITORY}:{key}");
            if store.lookup(&reference).is_ok() {
                tracing::debug!(%reference, "root file system already converted");
                return Ok(Prepared {
                    reference,
                    private: false,
                });
            }
            let scratch = bundle.join("rootfs-layers");
            let tree_owner = Mounted::layers(&layers, &scratch)?;
            let tree = tree_owner.tree().to_path_buf();
            let store_ref = reference.clone();
            blocking(move || {
                let result = convert(&store, &tree, &store_ref, &key, free);
                drop(tree_owner);
                result
            })
            .await?;
            Ok(Prepared {
                reference,
                private: false,
            })
        }
        Source::Mounts(mounts) => {
            let target = bundle.join("rootfs");
            let mounted = Mounted::all(&mounts, &target)?;
            let key = format!("{key_hint}-{}", unique_suffix());
            let reference = format!("{REPOSITORY}:{key}");
            let store_ref = reference.clone();
            blocking(move || {
                let result = convert(&store, &target, &store_ref, &key, free);
                drop(mounted);
                result
            })
            .await?;
            Ok(Prepared {
                reference,
                private: true,
            })
        }
    }
}

/// Forgets a container's own conversion (its disk goes at the next gc).
pub fn release(manager: &Manager, prepared_reference: &str) {
    let result = manager.image_store().and_then(|store| {
        let reference = ImageRef::parse(prepared_reference)?;
        store.untag(&reference)?;
        Ok(())
    });
    if let Err(error) = result {
        tracing::warn!(reference = prepared_reference, error = %error, "could not untag the root file system");
    }
}

fn convert(
    store: &ImageStore,
    tree: &Path,
    reference: &str,
    origin: &str,
    free_bytes: u64,
) -> Result<(), ShimError> {
    let started = std::time::Instant::now();
    let _hold = store.hold()?;
    let size = arrakis_image::ext4::tree_size(tree)? + free_bytes;
    let scratch = tempfile::Builder::new()
        .prefix(".containerd-rootfs-")
        .tempdir_in(store.dir())
        .map_err(|e| ShimError::io("creating a directory in", store.dir(), e))?;
    let disk = scratch.path().join("rootfs.ext4");
    arrakis_image::ext4::make_ext4(tree, &disk, size)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    let config = serde_json::to_vec(&config).expect("a JSON value serializes");
    let reference = ImageRef::parse(reference)?;
    store.add_disk_image(&reference, &config, &disk, origin)?;
    tracing::info!(
        reference = reference.as_str(),
        ms = started.elapsed().as_millis() as u64,
        "converted the root file system to ext4"
    );
    Ok(())
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{:x}{:x}", std::process::id(), nanos)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ShimError> + Send + 'static,
) -> Result<T, ShimError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ShimError::Internal(format!("conversion task failed: {e}")))?
}

/// A tree made readable for the conversion; unmounted on drop.
struct Mounted {
    tree: PathBuf,
    mounted: Vec<PathBuf>,
}

impl Mounted {
    /// One layer is a plain directory; several are stacked in a read-only
    /// overlay (no upper layer) mounted on `scratch`.
    fn layers(layers: &[PathBuf], scratch: &Path) -> Result<Mounted, ShimError> {
        if let [only] = layers {
            return Ok(Mounted {
                tree: only.clone(),
                mounted: Vec::new(),
            });
        }
        fs::create_dir_all(scratch).map_err(|e| ShimError::io("creating", scratch, e))?;
        let lower: Vec<String> = layers.iter().map(|p| p.display().to_string()).collect();
        let options = format!("lowerdir={}", lower.join(":"));
        mount(
            Some("overlay"),
            scratch,
            Some("overlay"),
            MsFlags::MS_RDONLY,
            Some(options.as_str()),
        )
        .map_err(|e| ShimError::Mount {
            target: scratch.to_path_buf(),
            source: e,
        })?;
        Ok(Mounted {
            tree: scratch.to_path_buf(),
            mounted: vec![scratch.to_path_buf()],
        })
    }

    /// Mounts containerd's mounts on `target`, in order.
    fn all(mounts: &[Mount], target: &Path) -> Result<Mounted, ShimError> {
        fs::create_dir_all(target).map_err(|e| ShimError::io("creating", target, e))?;
        let mut guard = Mounted {
            tree: target.to_path_buf(),
            mounted: Vec::new(),
        };
        for m in mounts {
            let (flags, data) = mount_options(&m.options);
            let fstype = if m.type_.is_empty() {
                None
            } else {
                Some(m.type_.as_str())
            };
            let source = if m.source.is_empty() {
                None
            } else {
                Some(m.source.as_str())
            };
            mount(source, target, fstype, flags, Some(data.as_str())).map_err(|e| {
                ShimError::Mount {
                    target: target.to_path_buf(),
                    source: e,
                }
            })?;
            guard.mounted.push(target.to_path_buf());
            if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
                // A read-only bind needs a remount to take effect.
                let _ = mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                );
            }
        }
        Ok(guard)
    }

    fn tree(&self) -> &Path {
        &self.tree
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for target in self.mounted.iter().rev() {
            unmount(target);
        }
    }
}

/// Lazily unmounts `target` if something is mounted there.
pub fn unmount(target: &Path) {
    loop {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return,
            Err(error) => {
                tracing::warn!(target = %target.display(), %error, "could not unmount");
                return;
            }
        }
    }
}

/// Splits mount(8)-style options into flags and file-system data.
fn mount_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        match option.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            other => data.push(other),
        }
    }
    (flags, data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(options: &[&str]) -> Mount {
        Mount {
            type_: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_overlay_with_an_empty_upper_layer_is_cacheable_layers() {
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        fs::create_dir(&upper).unwrap();
        let mounts = [overlay(&[
            "index=off",
            "workdir=/w",
            &format!("upperdir={}", upper.display()),
            "lowerdir=/a:/b",
        ])];
        assert_eq!(
            classify(&mounts).unwrap(),
            Source::Layers(vec![PathBuf::from("/a"), PathBuf::from("/b")])
        );
        fs::write(upper.join("file"), b"x").unwrap();
        assert!(matches!(classify(&mounts).unwrap(), Source::Mounts(_)));
    }

    #[test]
    fn bind_mounts_and_no_mounts() {
        let bind = Mount {
            type_: "bind".into(),
            source: "/snap/1/fs".into(),
            options: vec!["rbind".into(), "ro".into()],
            ..Default::default()
        };
        assert!(matches!(classify(&[bind]).unwrap(), Source::Mounts(_)));
        let err = classify(&[]).unwrap_err().to_string();
        assert!(err.contains("rootfs"), "{err}");
    }

    #[test]
    fn the_key_follows_layer_identity_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let ab = layers_key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(ab, layers_key(&[a.clone(), b.clone()]).unwrap());
        assert_ne!(ab, layers_key(&[b.clone(), a.clone()]).unwrap());
        let c = dir.path().join("c");
        fs::create_dir(&c).unwrap();
        assert_ne!(ab, layers_key(&[a, c]).unwrap());
        assert_eq!(ab.len(), 32);
    }

    #[test]
    fn mount_options_split_flags_from_data() {
        let (flags, data) = mount_options(&[
            "ro".into(),
            "nosuid".into(),
            "lowerdir=/a".into(),
            "index=off".into(),
        ]);
        assert!(flags.contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID));
        assert_eq!(data, "lowerdir=/a,index=off");
    }
}
