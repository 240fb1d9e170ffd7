//! Reads OCI image layouts (image-spec `image-layout.md`): resolves a reference to a manifest
//! and config, verifies every blob against its descriptor, and unpacks an image's layers in
//! order with [`crate::unpack`].
//!
//! The layout directory is trusted to be where the caller put it, but its content is not: every
//! digest is validated before it becomes a path, and every blob is checked for size and sha256.

mod digest;
#[cfg(test)]
mod tests;
mod types;

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::unpack::{self, Compression, LayerStats, UnpackError, UnpackOptions};

pub use digest::{Digest, DigestError, VerifyingReader};
pub use types::*;

/// The only `imageLayoutVersion` this reader knows.
const LAYOUT_VERSION: &str = "1.0.0";
/// The platform images are resolved for: what the sandbox VMs run.
pub(crate) const TARGET_OS: &str = "linux";
pub(crate) const TARGET_ARCH: &str = "amd64";
/// Upper bound on a JSON blob (manifest, index, config) read into memory.
pub(crate) const JSON_BLOB_LIMIT: u64 = 8 << 20;
/// How deep indexes may nest before the layout is considered malformed.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("reading `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("parsing `{}`", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{}` has imageLayoutVersion `{found}`; only `{LAYOUT_VERSION}` is supported", path.display())]
    LayoutVersion { path: PathBuf, found: String },
    #[error(transparent)]
    InvalidDigest(#[from] DigestError),
    #[error("reading blob {digest}")]
    BlobRead {
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("parsing blob {digest} as {what}")]
    BlobJson {
        digest: Digest,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("blob {digest} is {size} bytes, more than the {limit} allowed for a JSON document")]
    BlobTooLarge {
        digest: Digest,
        size: u64,
        limit: u64,
    },
    #[error("blob {digest} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("no manifest matches {wanted}; available: {}", list(available))]
    NoMatch {
        wanted: String,
        available: Vec<String>,
    },
    #[error(
        "the index lists several images and no reference was given; available: {}",
        list(available)
    )]
    Ambiguous { available: Vec<String> },
    #[error("{what} {digest} has unsupported media type `{media_type}`")]
    UnsupportedMediaType {
        what: &'static str,
        digest: Digest,
        media_type: String,
    },
    #[error("indexes nest more than {MAX_INDEX_DEPTH} deep at {digest}")]
    NestingTooDeep { digest: Digest },
    #[error("image config {digest} is for {os}/{architecture}, not {TARGET_OS}/{TARGET_ARCH}")]
    WrongPlatform {
        digest: Digest,
        os: String,
        architecture: String,
    },
    #[error("applying layer {digest}")]
    Unpack {
        digest: Digest,
        #[source]
        source: UnpackError,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// The `oci-layout` marker file.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutMarker {
    image_layout_version: String,
}

/// An opened OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    dir: PathBuf,
    index: Index,
}

impl OciLayout {
    /// Checks the `oci-layout` marker and reads `index.json`.
    pub fn open(dir: &Path) -> Result<OciLayout, OciError> {
        let marker_path = dir.join("oci-layout");
        let marker: LayoutMarker = read_json_file(&marker_path)?;
        if marker.image_layout_version != LAYOUT_VERSION {
            return Err(OciError::LayoutVersion {
                path: marker_path,
                found: marker.image_layout_version,
            });
        }
        let index = read_json_file(&dir.join("index.json"))?;
        Ok(OciLayout {
            dir: dir.to_path_buf(),
            index,
        })
    }

    /// The top-level `index.json`.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Where the blob with this digest lives (`blobs/sha256/<hex>`).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Picks a manifest from `index.json` and reads it and its config.
    ///
    /// With a `reference`, only entries whose `org.opencontainers.image.ref.name` annotation
    /// equals it are considered; without one, all are. Nested indexes (OCI or Docker manifest
    /// lists) are followed, choosing the linux/amd64 entry; the first one wins if several match.
    pub fn resolve(&self, reference: Option<&str>) -> Result<(Manifest, ImageConfig), OciError> {
        let all: Vec<&Descriptor> = self.index.manifests.iter().collect();
        let candidates: Vec<&Descriptor> = match reference {
            Some(name) => {
                let named: Vec<_> = all
                    .iter()
                    .copied()
                    .filter(|d| d.ref_name() == Some(name))
                    .collect();
                if named.is_empty() {
                    return Err(OciError::NoMatch {
                        wanted: format!("reference `{name}`"),
                        available: all.iter().map(|d| describe(d)).collect(),
                    });
                }
                named
            }
            None => all,
        };
        self.image(choose(&candidates)?)
    }

    /// Reads the image a manifest (or index) descriptor names: follows indexes to the
    /// linux/amd64 manifest and reads its config, verifying both.
    pub fn image(&self, descriptor: &Descriptor) -> Result<(Manifest, ImageConfig), OciError> {
        let manifest = self.follow(descriptor, 0)?;
        let config = self.read_config(&manifest.config)?;
        Ok((manifest, config))
    }

    /// Reads a small (JSON) blob whole, verifying its size and digest.
    pub fn read_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, OciError> {
        let digest = &descriptor.digest;
        if descriptor.size > JSON_BLOB_LIMIT {
            return Err(OciError::BlobTooLarge {
                digest: digest.clone(),
                size: descriptor.size,
                limit: JSON_BLOB_LIMIT,
            });
        }
        let mut reader = self.open_blob(descriptor)?;
        let mut data = Vec::with_capacity(descriptor.size as usize);
        if let Err(source) = reader.read_to_end(&mut data) {
            // A mismatch found at EOF is reported by `finish`, with both digests.
            reader.finish()?;
            return Err(OciError::BlobRead {
                digest: digest.clone(),
                source,
            });
        }
        reader.finish()?;
        Ok(data)
    }

    /// Opens a blob for streaming. The file size is checked now; the digest is checked as the
    /// content is read, so the caller must call [`VerifyingReader::finish`] and discard
    /// whatever it made from the content if that fails.
    pub fn open_blob(
        &self,
        descriptor: &Descriptor,
    ) -> Result<VerifyingReader<BufReader<File>>, OciError> {
        let digest = &descriptor.digest;
        let blob_error = |source| OciError::BlobRead {
            digest: digest.clone(),
            source,
        };
        let file = File::open(self.blob_path(digest)).map_err(blob_error)?;
        let actual = file.metadata().map_err(blob_error)?.len();
        if actual != descriptor.size {
            return Err(OciError::SizeMismatch {
                digest: digest.clone(),
                expected: descriptor.size,
                actual,
            });
        }
        Ok(VerifyingReader::new(
            BufReader::new(file),
            digest.clone(),
            descriptor.size,
        ))
    }

    /// Applies one layer blob on top of `root`, with the compression its media type names (or,
    /// for unknown media types, the one its first bytes suggest).
    ///
    /// The digest can only be checked once the whole blob has been read, so a layer that does
    /// not match its descriptor fails with [`OciError::DigestMismatch`] or
    /// [`OciError::SizeMismatch`] after it has been partly or fully written into `root`: the
    /// caller must then discard `root`. A mismatch takes precedence over an unpack error, since
    /// tampered content is the likelier cause of both.
    pub fn unpack_layer(
        &self,
        layer: &Descriptor,
        root: &Path,
        options: &UnpackOptions,
    ) -> Result<LayerStats, OciError> {
        let mut reader = self.open_blob(layer)?;
        let applied = match Compression::from_media_type(&layer.media_type) {
            Some(compression) => {
                unpack::apply_layer_compressed(&mut reader, compression, root, options)
            }
            None => {
                let head = read_head(&mut reader).map_err(|source| OciError::BlobRead {
                    digest: layer.digest.clone(),
                    source,
                });
                match head {
                    Ok(head) => {
                        let compression = unpack::detect(&head);
                        let stream = io::Cursor::new(head).chain(&mut reader);
                        unpack::apply_layer_compressed(stream, compression, root, options)
                    }
                    Err(err) => {
                        reader.finish()?;
                        return Err(err);
                    }
                }
            }
        };
        reader.finish()?;
        applied.map_err(|source| OciError::Unpack {
            digest: layer.digest.clone(),
            source,
        })
    }

    /// Follows `descriptor` through nested indexes down to a manifest.
    fn follow(&self, descriptor: &Descriptor, depth: usize) -> Result<Manifest, OciError> {
        match descriptor.media_type.as_str() {
            MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST => {
                if depth >= MAX_INDEX_DEPTH {
                    return Err(OciError::NestingTooDeep {
                        digest: descriptor.digest.clone(),
                    });
                }
                let index: Index = self.read_json_blob(descriptor, "an image index")?;
                let entries: Vec<&Descriptor> = index.manifests.iter().collect();
                self.follow(choose(&entries)?, depth + 1)
            }
            MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {
                self.read_json_blob(descriptor, "an image manifest")
            }
            other => Err(OciError::UnsupportedMediaType {
                what: "manifest",
                digest: descriptor.digest.clone(),
                media_type: other.to_owned(),
            }),
        }
    }

    fn read_config(&self, descriptor: &Descriptor) -> Result<ImageConfig, OciError> {
        if !matches!(
            descriptor.media_type.as_str(),
            MEDIA_TYPE_CONFIG | MEDIA_TYPE_DOCKER_CONFIG
        ) {
            return Err(OciError::UnsupportedMediaType {
                what: "config",
                digest: descriptor.digest.clone(),
                media_type: descriptor.media_type.clone(),
            });
        }
        let config: ImageConfig = self.read_json_blob(descriptor, "an image config")?;
        if config.os != TARGET_OS || config.architecture != TARGET_ARCH {
            return Err(OciError::WrongPlatform {
                digest: descriptor.digest.clone(),
                os: config.os,
                architecture: config.architecture,
            });
        }
        Ok(config)
    }

    fn read_json_blob<T: DeserializeOwned>(
        &self,
        descriptor: &Descriptor,
        what: &'static str,
    ) -> Result<T, OciError> {
        let data = self.read_blob(descriptor)?;
        serde_json::from_slice(&data).map_err(|source| OciError::BlobJson {
            digest: descriptor.digest.clone(),
            what,
            source,
        })
    }
}

/// Applies the manifest's layers onto `root` in order, verifying each (see
/// [`OciLayout::unpack_layer`]; on error `root` is partly written and must be discarded).
pub fn unpack_image(
    layout: &OciLayout,
    manifest: &Manifest,
    root: &Path,
    options: &UnpackOptions,
) -> Result<Vec<LayerStats>, OciError> {
    manifest
        .layers
        .iter()
        .map(|layer| layout.unpack_layer(layer, root, options))
        .collect()
}

/// Chooses among index entries: an entry for the target platform, else the only entry without
/// a platform; otherwise an error listing them.
pub(crate) fn choose<'a>(candidates: &[&'a Descriptor]) -> Result<&'a Descriptor, OciError> {
    let available = || candidates.iter().map(|d| describe(d)).collect();
    let on_target = candidates.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == TARGET_OS && p.architecture == TARGET_ARCH)
    });
    if let Some(found) = on_target {
        return Ok(found);
    }
    let unplatformed: Vec<&Descriptor> = candidates
        .iter()
        .copied()
        .filter(|d| d.platform.is_none())
        .collect();
    match unplatformed.as_slice() {
        [only] => Ok(only),
        [] => Err(OciError::NoMatch {
            wanted: format!("platform {TARGET_OS}/{TARGET_ARCH}"),
            available: available(),
        }),
        _ => Err(OciError::Ambiguous {
            available: available(),
        }),
    }
}

/// One line naming an index entry in errors: its reference, platform and digest.
fn describe(descriptor: &Descriptor) -> String {
    let mut parts = Vec::new();
    if let Some(name) = descriptor.ref_name() {
        parts.push(format!("`{name}`"));
    }
    if let Some(platform) = &descriptor.platform {
        parts.push(platform.to_string());
    }
    parts.push(descriptor.digest.to_string());
    parts.join(" ")
}

/// Reads up to the first four bytes (enough for [`unpack::detect`]).
fn read_head(reader: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(4);
    reader.take(4).read_to_end(&mut head)?;
    Ok(head)
}

fn read_json_file<T: DeserializeOwned>(path: &Path) -> Result<T, OciError> {
    let data = fs::read(path).map_err(|source| OciError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| OciError::Json {
        path: path.to_path_buf(),
        source,
    })
}
