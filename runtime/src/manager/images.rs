//! Images as the manager sees them: which base disk a spec's `image` names, what defaults an
//! image gives the commands run in its sandboxes, and the store operations that must know
//! which images sandboxes and snapshots still boot from.
//!
//! A spec's `image` is first a local image (`<images_dir>/<name>/rootfs.ext4`, such as the
//! default Debian image), then a reference, digest or id in the image store
//! ([`arrakis_image::store`]). Store images are converted to ext4 when pulled or imported; a
//! create converts one only if that step was interrupted.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use arrakis_image::oci::ImageConfig;
use arrakis_image::registry::{self, PullOptions, PullProgress};
use arrakis_image::store::{GcReport, ImageRef, ImageStore, ImageSummary, StoreError};

use super::Manager;
use crate::error::RuntimeError;

/// What every command in a sandbox starts from unless its request says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecDefaults {
    /// The image's `ENV`, overridden by the sandbox's own environment.
    pub env: BTreeMap<String, String>,
    /// The image's `WORKDIR`.
    pub cwd: Option<String>,
    /// The image's `USER`.
    pub user: Option<String>,
}

impl ExecDefaults {
    /// Defaults from an image config (if any) and the sandbox's environment.
    pub fn new(config: Option<&ImageConfig>, sandbox_env: &BTreeMap<String, String>) -> Self {
        let run = config.and_then(|c| c.config.as_ref());
        let mut env: BTreeMap<String, String> = run
            .and_then(|r| r.env.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                (!key.is_empty()).then(|| (key.to_owned(), value.to_owned()))
            })
            .collect();
        env.extend(sandbox_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let non_empty = |value: Option<&String>| value.filter(|v| !v.is_empty()).cloned();
        ExecDefaults {
            env,
            cwd: non_empty(run.and_then(|r| r.working_dir.as_ref())),
            user: non_empty(run.and_then(|r| r.user.as_ref())),
        }
    }
}

/// An image imported or pulled into the store, converted and tagged.
#[derive(Debug, Clone)]
pub struct ImportedImage {
    pub references: Vec<ImageRef>,
    /// The manifest digest: the image's identity.
    pub digest: arrakis_image::oci::Digest,
    pub rootfs: PathBuf,
}

/// The base disk a create resolved its image to.
pub(super) struct ResolvedImage {
    /// How the image is recorded: a local name, or a store reference in its short form.
    pub name: String,
    /// The base disk, symlinks resolved.
    pub path: PathBuf,
}

impl Manager {
    /// The image store of this manager's images directory.
    pub fn image_store(&self) -> Result<ImageStore, RuntimeError> {
        Ok(ImageStore::open(&self.inner.config.images_dir)?)
    }

    /// Finds the base disk of a spec's image: a local image by name, else a store image.
    pub(super) fn resolve_image(
        &self,
        image: &str,
        local_path: &Path,
    ) -> Result<ResolvedImage, RuntimeError> {
        if let Ok(path) = std::fs::canonicalize(local_path) {
            if path.is_file() {
                return Ok(ResolvedImage {
                    name: image.to_owned(),
                    path,
                });
            }
        }
        let store = self.image_store()?;
        let (reference, descriptor) = store.lookup(image).map_err(|err| match err {
            StoreError::NotFound { wanted, available } => {
                let mut names = self.local_images();
                names.extend(available);
                RuntimeError::InvalidArgument {
                    field: "image",
                    message: format!(
                        "no image {wanted:?}: not a local image ({}) and not in the image \
                         store; pull it with `arrakis image pull {wanted}`; available: {}",
                        local_path.display(),
                        if names.is_empty() {
                            "none".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                }
            }
            other => other.into(),
        })?;
        let prepared = store.prepare(&descriptor, self.inner.config.image_free_bytes())?;
        let path = std::fs::canonicalize(&prepared.rootfs).map_err(|source| RuntimeError::Io {
            op: "resolving",
            path: prepared.rootfs.clone(),
            source,
        })?;
        Ok(ResolvedImage {
            name: reference.familiar().to_owned(),
            path,
        })
    }

    /// Local images: `<images_dir>/<name>/rootfs.ext4`.
    pub(super) fn local_images(&self) -> Vec<String> {
        let dir = &self.inner.config.images_dir;
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| crate::spec::image_path(dir, name).is_file())
            .collect();
        names.sort();
        names
    }

    /// The environment, working directory and user commands in `name` start with.
    pub async fn exec_defaults(&self, name: &str) -> Result<ExecDefaults, RuntimeError> {
        let record = self.record(name)?;
        let config = ImageStore::converted_config(&record.image_path);
        Ok(ExecDefaults::new(config.as_ref(), &record.env))
    }

    /// Imports the images of an OCI image layout (a directory or a tar of one, as `ctr
    /// export` writes) or a `docker save` tarball, tags them with the names the archive gives
    /// them (or with `tag`, for an archive of one image) and converts each to ext4. With
    /// `rootfs`, `path` is instead a plain root file system tarball (like `docker import`),
    /// which becomes a one-layer image named `tag`. Blocking: run it off the async threads.
    pub fn import_image(
        &self,
        path: &Path,
        tag: Option<&str>,
        rootfs: bool,
    ) -> Result<Vec<ImportedImage>, RuntimeError> {
        use arrakis_image::archive;
        let store = self.image_store()?;
        let _writing = store.hold()?;
        let tag = tag.map(ImageRef::parse).transpose()?;
        let bad_archive = |source: archive::ArchiveError| RuntimeError::InvalidArgument {
            field: "archive",
            message: crate::agent::error_chain(&source),
        };
        let imported = if rootfs {
            let Some(tag) = &tag else {
                return Err(RuntimeError::InvalidArgument {
                    field: "tag",
                    message: "a root file system tarball has no name; give one with --tag".into(),
                });
            };
            let manifest = archive::import_rootfs(path, store.blobs()).map_err(bad_archive)?;
            vec![archive::ImportedImage {
                references: vec![tag.as_str().to_owned()],
                manifest,
            }]
        } else if path.is_dir() {
            archive::import_layout_dir(path, store.blobs()).map_err(bad_archive)?
        } else {
            archive::import_archive(path, store.blobs()).map_err(bad_archive)?
        };
        if tag.is_some() && imported.len() != 1 {
            return Err(RuntimeError::InvalidArgument {
                field: "tag",
                message: format!(
                    "the archive holds {} images; --tag names exactly one",
                    imported.len()
                ),
            });
        }
        let mut done = Vec::new();
        for image in imported {
            let references: Vec<ImageRef> = match &tag {
                Some(tag) => vec![tag.clone()],
                None => image
                    .references
                    .iter()
                    .map(|name| ImageRef::parse(name))
                    .collect::<Result<_, _>>()?,
            };
            if references.is_empty() {
                return Err(RuntimeError::InvalidArgument {
                    field: "tag",
                    message: format!(
                        "the archive gives image {} no name; name it with --tag",
                        image.manifest.digest
                    ),
                });
            }
            let prepared = store.prepare(&image.manifest, self.inner.config.image_free_bytes())?;
            for reference in &references {
                store.tag(reference, &image.manifest)?;
            }
            done.push(ImportedImage {
                references,
                digest: prepared.digest,
                rootfs: prepared.rootfs,
            });
        }
        Ok(done)
    }

    /// Pulls `reference` from its registry (layers already in the store are not fetched
    /// again, interrupted downloads resume), tags it and converts it to ext4.
    pub async fn pull_image(
        &self,
        reference: &str,
        options: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImportedImage, RuntimeError> {
        let store = self.image_store()?;
        let _writing = store.hold()?;
        let pulled = registry::pull(reference, store.blobs(), options, progress).await?;
        let reference = ImageRef::parse(&pulled.reference)?;
        let free = self.inner.config.image_free_bytes();
        let manifest = pulled.manifest;
        let prepared = {
            let (store, manifest) = (store.clone(), manifest.clone());
            let dir = store.dir().to_path_buf();
            tokio::task::spawn_blocking(move || store.prepare(&manifest, free))
                .await
                .map_err(|e| RuntimeError::Io {
                    op: "converting an image in",
                    path: dir,
                    source: std::io::Error::other(e.to_string()),
                })??
        };
        store.tag(&reference, &manifest)?;
        Ok(ImportedImage {
            references: vec![reference],
            digest: prepared.digest,
            rootfs: prepared.rootfs,
        })
    }

    /// Every image in the store.
    pub fn list_images(&self) -> Result<Vec<ImageSummary>, RuntimeError> {
        Ok(self.image_store()?.list()?)
    }

    /// Removes an image's tag, then whatever nothing else needs (see [`Manager::gc_images`]).
    /// An image a sandbox or snapshot boots from is refused unless `force`, which only
    /// removes the tag and keeps the disk for them. The golden snapshots kept for warm starts
    /// of the image are deleted with it.
    pub async fn remove_image(&self, wanted: &str, force: bool) -> Result<ImageRef, RuntimeError> {
        let store = self.image_store()?;
        let (reference, descriptor) = store.lookup(wanted)?;
        let rootfs = store.rootfs_path(&descriptor.digest);
        let rootfs = std::fs::canonicalize(&rootfs).unwrap_or(rootfs);
        let users = self.image_users(&rootfs)?;
        if !users.is_empty() && !force {
            return Err(StoreError::InUse {
                reference: reference.familiar().to_owned(),
                users,
            }
            .into());
        }
        let other_tags = store
            .list()?
            .into_iter()
            .any(|image| image.digest == descriptor.digest && image.reference != reference);
        if !other_tags {
            self.clear_golden_snapshots_of(Some(&rootfs)).await?;
        }
        store.untag(&reference)?;
        self.gc_images(false).await?;
        Ok(reference)
    }

    /// Removes untagged images no sandbox or snapshot boots from, unreferenced blobs and
    /// leftovers of interrupted pulls and conversions; with `build_cache`, also the cached
    /// steps of image builds.
    pub async fn gc_images(&self, build_cache: bool) -> Result<GcReport, RuntimeError> {
        let in_use = self.base_disks_in_use()?;
        let store = self.image_store()?;
        let dir = store.dir().to_path_buf();
        tokio::task::spawn_blocking(move || store.gc(&|path| in_use.contains(path), build_cache))
            .await
            .map_err(|e| RuntimeError::Io {
                op: "collecting garbage in",
                path: dir,
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(RuntimeError::from)
    }

    /// Sandboxes and user snapshots on this base disk (golden snapshots are caches).
    fn image_users(&self, rootfs: &Path) -> Result<Vec<String>, RuntimeError> {
        let store = &self.inner.store;
        let mut users: Vec<String> = store
            .list()?
            .into_iter()
            .filter(|r| r.image_path == rootfs)
            .map(|r| format!("sandbox {}", r.name))
            .collect();
        users.extend(
            store
                .list_snapshots()?
                .into_iter()
                .filter(|s| s.image_path == rootfs && s.golden_key.is_none())
                .map(|s| format!("snapshot {}", s.id)),
        );
        Ok(users)
    }

    fn base_disks_in_use(&self) -> Result<HashSet<PathBuf>, RuntimeError> {
        let store = &self.inner.store;
        let mut paths: HashSet<PathBuf> = store.list()?.into_iter().map(|r| r.image_path).collect();
        paths.extend(store.list_snapshots()?.into_iter().map(|s| s.image_path));
        Ok(paths)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrakis_image::oci::RunConfig;

    #[test]
    fn image_env_is_under_the_sandbox_env_and_workdir_user_carry_over() {
        let mut config: ImageConfig = serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .unwrap();
        config.config = Some(RunConfig {
            env: Some(vec![
                "PATH=/usr/local/bin:/bin".into(),
                "A=image".into(),
                "B=x=y".into(),
                "=ignored".into(),
                "junk".into(),
            ]),
            working_dir: Some("/srv".into()),
            user: Some("app".into()),
            ..Default::default()
        });
        let sandbox = BTreeMap::from([("A".to_owned(), "sandbox".to_owned())]);
        let defaults = ExecDefaults::new(Some(&config), &sandbox);
        assert_eq!(defaults.env["A"], "sandbox");
        assert_eq!(defaults.env["B"], "x=y");
        assert_eq!(defaults.env["PATH"], "/usr/local/bin:/bin");
        assert_eq!(defaults.env.len(), 3);
        assert_eq!(defaults.cwd.as_deref(), Some("/srv"));
        assert_eq!(defaults.user.as_deref(), Some("app"));

        let plain = ExecDefaults::new(None, &sandbox);
        assert_eq!(
            plain,
            ExecDefaults {
                env: sandbox,
                cwd: None,
                user: None
            }
        );
    }
}
