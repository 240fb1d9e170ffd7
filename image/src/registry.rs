//! Pulls images from OCI/Docker registries into a [`BlobDir`].
//!
//! A pull resolves the reference to the linux/amd64 image manifest (through an index or
//! manifest list if the registry serves one), then stores the config and every layer, each
//! verified against its digest, and the manifest (and index) last. Layers already in the store
//! are skipped, the others are downloaded a few at once into resumable partial files and
//! committed only once their size and sha256 match. Nothing is tagged: the caller records the
//! returned manifest descriptor in `index.json`.
//!
//! Credentials only travel in request headers; they are never logged or put in errors.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use futures_util::stream::{self, StreamExt as _, TryStreamExt as _};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{DigestError as ClientDigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::de::IgnoredAny;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::blobs::BlobDir;
use crate::oci::{
    self, Descriptor, Digest, ImageConfig, Index, Manifest, OciError, MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_INDEX,
    MEDIA_TYPE_MANIFEST,
};

/// Manifest media types asked for, and the only ones accepted.
const ACCEPTED_MANIFESTS: [&str; 4] = [
    MEDIA_TYPE_MANIFEST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_INDEX,
    MEDIA_TYPE_DOCKER_LIST,
];
/// Media type of Docker's schema 1 manifests, which are refused.
const MEDIA_TYPE_DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Upper bound on a manifest, index or config held in memory.
const JSON_LIMIT: u64 = 8 << 20;
/// How deep indexes may nest before the image is considered malformed.
const MAX_INDEX_DEPTH: usize = 4;
/// How many times a blob download is tried before the pull fails.
const ATTEMPTS: u32 = 3;
/// Wait before the first retry; doubled for each later one.
const RETRY_DELAY: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A download that receives nothing for this long is abandoned (and retried).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The accepted reference syntax, for error messages.
const REFERENCE_FORM: &str =
    "[REGISTRY[:PORT]/]REPOSITORY[:TAG][@sha256:DIGEST], e.g. `docker.io/library/busybox:latest`";

/// How to authenticate to the registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    /// No credentials (the registry may still hand out an anonymous token).
    #[default]
    Anonymous,
    /// A user name and password (or access token used as a password).
    Basic { username: String, password: String },
    /// A bearer token sent as is.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
        }
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Talk plain HTTP instead of HTTPS (local or test registries).
    pub insecure: bool,
    pub credentials: Credentials,
    /// How many layers download at once (at least one).
    pub parallel: usize,
}

impl Default for PullOptions {
    fn default() -> PullOptions {
        PullOptions {
            insecure: false,
            credentials: Credentials::Anonymous,
            parallel: 3,
        }
    }
}

/// Receives a pull's progress, e.g. to draw it on a terminal. Calls come from the pulling
/// task, possibly for several layers interleaved.
pub trait PullProgress: Send + Sync {
    /// The reference resolved to this image manifest, whose layers are now fetched.
    fn resolved(&self, _reference: &str, _manifest: &Digest, _layers: &[Descriptor]) {}
    /// `done` of `total` bytes of a layer are stored. The first call for a download that
    /// resumes reports the bytes kept from before.
    fn layer_progress(&self, _digest: &Digest, _done: u64, _total: u64) {}
    /// The layer is stored and verified; `cached` if it was already there.
    fn layer_done(&self, _digest: &Digest, _cached: bool) {}
}

/// A [`PullProgress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl PullProgress for NoProgress {}

/// What [`pull`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledImage {
    /// The normalized reference, e.g. `docker.io/library/busybox:latest`.
    pub reference: String,
    /// The linux/amd64 image manifest; it, its config and layers are in the blob store.
    pub manifest: Descriptor,
    pub config: ImageConfig,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference `{reference}`: {reason}; expected {REFERENCE_FORM}")]
    InvalidReference { reference: String, reason: String },
    #[error("{what} not found in registry {registry}")]
    NotFound { what: String, registry: String },
    #[error("cannot reach registry {registry}")]
    Unreachable {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error(
        "registry {registry} needs credentials to pull `{reference}` \
         (or the repository does not exist)"
    )]
    CredentialsNeeded { registry: String, reference: String },
    #[error("registry {registry} refused the credentials given for `{reference}`")]
    CredentialsRefused { registry: String, reference: String },
    #[error("{what} does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what} is {actual} bytes but its descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is {size} bytes, more than the {JSON_LIMIT} allowed for a JSON document")]
    TooLarge { what: String, size: u64 },
    #[error("{what} has unsupported media type `{media_type}`")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("parsing {what}")]
    InvalidDocument {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("indexes of `{reference}` nest more than {MAX_INDEX_DEPTH} deep")]
    NestingTooDeep { reference: String },
    #[error(
        "`{reference}` has no {} image; available: {}",
        target(),
        list(available)
    )]
    NoPlatform {
        reference: String,
        available: Vec<String>,
    },
    #[error("image config {digest} is for {os}/{architecture}, not {}", target())]
    WrongPlatform {
        digest: Digest,
        os: String,
        architecture: String,
    },
    #[error("registry {registry} failed the request")]
    Registry {
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("downloading {what} from registry {registry} failed")]
    Transfer {
        registry: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("writing `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("storing a blob")]
    Store(#[source] OciError),
}

impl RegistryError {
    /// Whether trying again may help: the network or the registry failed, not the content.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. }
                | RegistryError::Registry { .. }
                | RegistryError::Transfer { .. }
        )
    }
}

fn target() -> String {
    format!("{}/{}", oci::TARGET_OS, oci::TARGET_ARCH)
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// Pulls the linux/amd64 image `reference` names into `blobs` and returns its manifest
/// descriptor and config. See the module documentation for what is stored and verified.
pub async fn pull(
    reference: &str,
    blobs: &BlobDir,
    options: &PullOptions,
    progress: &dyn PullProgress,
) -> Result<PulledImage, RegistryError> {
    let session = Session::new(parse_reference(reference)?, blobs, options, progress);
    let resolved = session.resolve().await?;
    let config = session.fetch_config(&resolved.manifest.config).await?;
    progress.resolved(
        &session.name,
        &resolved.descriptor.digest,
        &resolved.manifest.layers,
    );
    session
        .fetch_layers(&resolved.manifest.layers, options.parallel.max(1))
        .await?;
    for document in std::iter::once(&resolved.bytes).chain(resolved.indexes.iter().rev()) {
        blobs.write_bytes(document).map_err(RegistryError::Store)?;
    }
    Ok(PulledImage {
        reference: session.name,
        manifest: resolved.descriptor,
        config,
    })
}

/// Parses `reference` the way Docker does (`busybox` is `docker.io/library/busybox:latest`),
/// and returns it with the digest it pins, if any.
fn parse_reference(reference: &str) -> Result<(Reference, Option<Digest>), RegistryError> {
    let invalid = |reason: String| RegistryError::InvalidReference {
        reference: reference.to_owned(),
        reason,
    };
    let parsed: Reference = reference.parse().map_err(|e| invalid(format!("{e}")))?;
    let pinned = match parsed.digest() {
        Some(digest) => Some(
            Digest::parse(digest)
                .map_err(|_| invalid("only sha256 digests are supported".into()))?,
        ),
        None => None,
    };
    Ok((parsed, pinned))
}

/// The credentials `docker login` stored for `registry` (a host name with an optional port,
/// as in a reference) in `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
///
/// Reads the `auths` section: `auth` (base64 `user:password`), `username`/`password`,
/// `registrytoken` (a bearer token) and `identitytoken` (sent as the password, with the user
/// name `docker login` stored or `<token>`). Credential helpers (`credsStore`, `credHelpers`)
/// are not run. A missing or unreadable file, or no entry, gives `None`.
pub fn docker_config_credentials(registry: &str) -> Option<Credentials> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker/config.json"),
    };
    credentials_from_docker_config(&std::fs::read(path).ok()?, registry)
}

/// The `auths` entry of a Docker `config.json`.
#[derive(Deserialize)]
struct DockerAuth {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
    registrytoken: Option<String>,
}

fn credentials_from_docker_config(data: &[u8], registry: &str) -> Option<Credentials> {
    #[derive(Deserialize)]
    struct DockerConfig {
        #[serde(default)]
        auths: BTreeMap<String, DockerAuth>,
    }
    let config: DockerConfig = serde_json::from_slice(data).ok()?;
    let wanted = registry_host(registry);
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| registry_host(key) == wanted)?
        .1;
    let decoded = entry.auth.as_deref().and_then(|auth| {
        let engine = base64::engine::general_purpose::STANDARD;
        let bytes = engine.decode(auth.trim()).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.to_owned(), password.to_owned()))
    });
    let username = entry
        .username
        .clone()
        .or_else(|| decoded.as_ref().map(|(user, _)| user.clone()))
        .filter(|user| !user.is_empty());
    if let Some(token) = entry.identitytoken.clone().filter(|t| !t.is_empty()) {
        let username = username.unwrap_or_else(|| "<token>".to_owned());
        return Some(Credentials::Basic {
            username,
            password: token,
        });
    }
    if let Some(token) = entry.registrytoken.clone().filter(|t| !t.is_empty()) {
        return Some(Credentials::Bearer(token));
    }
    let password = entry
        .password
        .clone()
        .or_else(|| decoded.map(|(_, password)| password))?;
    Some(Credentials::Basic {
        username: username?,
        password,
    })
}

/// The host (and port) of a registry as `config.json` keys spell it, which may carry a scheme
/// and a path (`https://index.docker.io/v1/`); Docker Hub's names all become `docker.io`.
fn registry_host(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

/// The manifest a reference resolved to.
struct Resolved {
    /// Its raw bytes, stored as they are.
    bytes: Vec<u8>,
    manifest: Manifest,
    descriptor: Descriptor,
    /// The raw bytes of the indexes followed to it, outermost first.
    indexes: Vec<Vec<u8>>,
}

/// One pull's connection and context.
struct Session<'a> {
    client: Client,
    reference: Reference,
    /// The digest the reference pins the manifest to, if any.
    pinned: Option<Digest>,
    /// The normalized reference.
    name: String,
    auth: RegistryAuth,
    blobs: &'a BlobDir,
    progress: &'a dyn PullProgress,
}

impl<'a> Session<'a> {
    fn new(
        (reference, pinned): (Reference, Option<Digest>),
        blobs: &'a BlobDir,
        options: &PullOptions,
        progress: &'a dyn PullProgress,
    ) -> Session<'a> {
        let config = ClientConfig {
            protocol: if options.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        let auth = match &options.credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Bearer(token) => RegistryAuth::Bearer(token.clone()),
        };
        Session {
            client: Client::new(config),
            name: reference.whole(),
            reference,
            pinned,
            auth,
            blobs,
            progress,
        }
    }

    fn registry(&self) -> String {
        self.reference.registry().to_owned()
    }

    /// Fetches the manifest the reference names and follows indexes down to the linux/amd64
    /// image manifest, verifying each document against the digest that named it.
    async fn resolve(&self) -> Result<Resolved, RegistryError> {
        let what = format!("image `{}`", self.name);
        let mut bytes = self.fetch_manifest(&self.reference, &what).await?;
        if let Some(pinned) = &self.pinned {
            verify(&what, &bytes, pinned)?;
        }
        let mut pointer: Option<Descriptor> = None;
        let mut indexes = Vec::new();
        loop {
            let digest = Digest::of(&bytes);
            let what = format!("manifest {digest} of `{}`", self.name);
            let media_type = media_type_of(&bytes, pointer.as_ref(), &what)?;
            match media_type.as_str() {
                MEDIA_TYPE_INDEX | MEDIA_TYPE_DOCKER_LIST => {
                    if indexes.len() >= MAX_INDEX_DEPTH {
                        return Err(RegistryError::NestingTooDeep {
                            reference: self.name.clone(),
                        });
                    }
                    let index: Index = parse_json(&bytes, &what)?;
                    let entries: Vec<&Descriptor> = index.manifests.iter().collect();
                    let chosen = oci::choose(&entries).map_err(|e| self.no_platform(e))?;
                    let next = self.fetch_manifest_for(chosen).await?;
                    pointer = Some(chosen.clone());
                    indexes.push(std::mem::replace(&mut bytes, next));
                }
                MEDIA_TYPE_MANIFEST | MEDIA_TYPE_DOCKER_MANIFEST => {
                    let manifest: Manifest = parse_json(&bytes, &what)?;
                    let descriptor = Descriptor {
                        media_type,
                        size: bytes.len() as u64,
                        digest,
                        platform: pointer.and_then(|p| p.platform),
                        annotations: BTreeMap::new(),
                    };
                    return Ok(Resolved {
                        bytes,
                        manifest,
                        descriptor,
                        indexes,
                    });
                }
                _ => {
                    return Err(RegistryError::UnsupportedMediaType { what, media_type });
                }
            }
        }
    }

    /// Fetches the manifest an index entry points at and checks it against the entry.
    async fn fetch_manifest_for(&self, descriptor: &Descriptor) -> Result<Vec<u8>, RegistryError> {
        let what = format!("manifest {} of `{}`", descriptor.digest, self.name);
        if !ACCEPTED_MANIFESTS.contains(&descriptor.media_type.as_str()) {
            return Err(RegistryError::UnsupportedMediaType {
                what,
                media_type: descriptor.media_type.clone(),
            });
        }
        check_json_size(descriptor.size, &what)?;
        let by_digest = self
            .reference
            .clone_with_digest(descriptor.digest.to_string());
        let bytes = self.fetch_manifest(&by_digest, &what).await?;
        if bytes.len() as u64 != descriptor.size {
            return Err(RegistryError::SizeMismatch {
                what,
                expected: descriptor.size,
                actual: bytes.len() as u64,
            });
        }
        verify(&what, &bytes, &descriptor.digest)?;
        Ok(bytes)
    }

    async fn fetch_manifest(
        &self,
        reference: &Reference,
        what: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        let (bytes, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, &ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.classify(e, what))?;
        check_json_size(bytes.len() as u64, what)?;
        Ok(bytes)
    }

    /// Stores the config blob and checks that it is a linux/amd64 image config.
    async fn fetch_config(&self, descriptor: &Descriptor) -> Result<ImageConfig, RegistryError> {
        let what = format!("config {} of `{}`", descriptor.digest, self.name);
        if !matches!(
            descriptor.media_type.as_str(),
            MEDIA_TYPE_CONFIG | MEDIA_TYPE_DOCKER_CONFIG
        ) {
            return Err(RegistryError::UnsupportedMediaType {
                what,
                media_type: descriptor.media_type.clone(),
            });
        }
        check_json_size(descriptor.size, &what)?;
        if !self.blobs.contains(&descriptor.digest, descriptor.size) {
            self.fetch_blob(descriptor, false).await?;
        }
        let path = self.blobs.path(&descriptor.digest);
        let bytes = std::fs::read(&path).map_err(|source| {
            RegistryError::Store(OciError::Read {
                path: path.clone(),
                source,
            })
        })?;
        let config: ImageConfig = parse_json(&bytes, &what)?;
        if config.os != oci::TARGET_OS || config.architecture != oci::TARGET_ARCH {
            return Err(RegistryError::WrongPlatform {
                digest: descriptor.digest.clone(),
                os: config.os,
                architecture: config.architecture,
            });
        }
        Ok(config)
    }

    /// Stores every layer not already present, `parallel` at a time. The first failure
    /// cancels the other downloads; their partial files stay for the next pull to resume.
    async fn fetch_layers(
        &self,
        layers: &[Descriptor],
        parallel: usize,
    ) -> Result<(), RegistryError> {
        let mut seen = HashSet::new();
        let unique = layers.iter().filter(|layer| seen.insert(&layer.digest));
        stream::iter(unique.map(Ok))
            .try_for_each_concurrent(parallel, |layer| async move {
                let cached = self.blobs.contains(&layer.digest, layer.size);
                if !cached {
                    self.fetch_blob(layer, true).await?;
                }
                self.progress.layer_done(&layer.digest, cached);
                Ok(())
            })
            .await
    }

    /// Downloads a blob into the store, retrying failures of the network or registry and
    /// resuming from the bytes already received.
    async fn fetch_blob(&self, blob: &Descriptor, report: bool) -> Result<(), RegistryError> {
        let mut attempt = 1;
        loop {
            let (result, resumed) = self.fetch_blob_once(blob, report).await;
            let error = match result {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            // A mismatch after resuming may come from stale partial bytes, which the failed
            // commit deleted: the next attempt starts from zero.
            let stale = resumed
                && matches!(
                    error,
                    RegistryError::DigestMismatch { .. } | RegistryError::SizeMismatch { .. }
                );
            if attempt >= ATTEMPTS || !(error.is_transient() || stale) {
                return Err(error);
            }
            tokio::time::sleep(RETRY_DELAY * 2u32.pow(attempt - 1)).await;
            attempt += 1;
        }
    }

    /// One download attempt: appends what the partial file lacks, then verifies and commits
    /// it. Also says whether the attempt continued from bytes already in the partial file.
    async fn fetch_blob_once(
        &self,
        blob: &Descriptor,
        report: bool,
    ) -> (Result<(), RegistryError>, bool) {
        let digest = &blob.digest;
        let write_error = |source| RegistryError::Write {
            path: self.blobs.partial_path(digest),
            source,
        };
        let (file, kept) = match self.blobs.open_partial(digest) {
            Ok(opened) => opened,
            Err(source) => return (Err(write_error(source)), false),
        };
        let resumed = kept > 0 && kept <= blob.size;
        let downloaded = if kept == blob.size {
            Ok(())
        } else {
            self.download(blob, file, kept, report).await
        };
        let result = match downloaded {
            Ok(()) => self.commit(blob).await,
            Err(error) => Err(error),
        };
        (result, resumed)
    }

    /// Appends the blob's bytes from `kept` on to its partial file `file`, asking the
    /// registry for a range; if it sends the whole blob instead, starts over.
    async fn download(
        &self,
        blob: &Descriptor,
        file: std::fs::File,
        mut kept: u64,
        report: bool,
    ) -> Result<(), RegistryError> {
        let digest = &blob.digest;
        let what = format!("blob {digest}");
        let write_error = |source| RegistryError::Write {
            path: self.blobs.partial_path(digest),
            source,
        };
        if kept > blob.size {
            file.set_len(0).map_err(write_error)?;
            kept = 0;
        }
        let digest_text = digest.to_string();
        let stream: SizedStream = if kept == 0 {
            self.client
                .pull_blob_stream(&self.reference, digest_text.as_str())
                .await
                .map_err(|e| self.classify(e, &what))?
        } else {
            let response = self
                .client
                .pull_blob_stream_partial(&self.reference, digest_text.as_str(), kept, None)
                .await
                .map_err(|e| self.classify(e, &what))?;
            match response {
                BlobResponse::Partial(stream) => {
                    if stream
                        .content_length
                        .is_some_and(|length| kept + length != blob.size)
                    {
                        // Not the range asked for: keep nothing, so the retry starts over.
                        file.set_len(0).map_err(write_error)?;
                        return Err(
                            self.transfer_error(&what, "the range response has the wrong length")
                        );
                    }
                    stream
                }
                BlobResponse::Full(stream) => {
                    file.set_len(0).map_err(write_error)?;
                    kept = 0;
                    stream
                }
            }
        };
        let mut file = tokio::fs::File::from_std(file);
        let copied = self.copy(blob, stream, &mut file, kept, report).await;
        let flushed = file.flush().await.map_err(write_error);
        let done = copied?;
        flushed?;
        if done < blob.size {
            return Err(self.transfer_error(
                &what,
                &format!("the registry sent {done} of {} bytes", blob.size),
            ));
        }
        Ok(())
    }

    /// Appends the stream to the partial file and returns how many bytes the file then
    /// holds. Stops with an error past the blob's size, before writing more than it.
    async fn copy(
        &self,
        blob: &Descriptor,
        mut stream: SizedStream,
        file: &mut tokio::fs::File,
        mut done: u64,
        report: bool,
    ) -> Result<u64, RegistryError> {
        let digest = &blob.digest;
        let what = format!("blob {digest}");
        if report {
            self.progress.layer_progress(digest, done, blob.size);
        }
        while let Some(chunk) = stream.next().await {
            let bytes = match chunk {
                Ok(bytes) => bytes,
                // The client's own check of a whole blob; the commit reports the mismatch
                // with both digests.
                Err(e) if is_digest_check(&e) => break,
                Err(source) => {
                    return Err(RegistryError::Transfer {
                        registry: self.registry(),
                        what,
                        source,
                    })
                }
            };
            let received = done + bytes.len() as u64;
            if received > blob.size {
                let _ = std::fs::remove_file(self.blobs.partial_path(digest));
                return Err(RegistryError::SizeMismatch {
                    what,
                    expected: blob.size,
                    actual: received,
                });
            }
            file.write_all(&bytes)
                .await
                .map_err(|source| RegistryError::Write {
                    path: self.blobs.partial_path(digest),
                    source,
                })?;
            done = received;
            if report {
                self.progress.layer_progress(digest, done, blob.size);
            }
        }
        Ok(done)
    }

    /// Hashes the complete partial file and moves it under its digest, off the async
    /// threads. A mismatch deletes the partial file.
    async fn commit(&self, blob: &Descriptor) -> Result<(), RegistryError> {
        let blobs = self.blobs.clone();
        let (digest, size) = (blob.digest.clone(), blob.size);
        let joined = tokio::task::spawn_blocking(move || blobs.commit_partial(&digest, size)).await;
        let committed = match joined {
            Ok(committed) => committed,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let what = format!("blob {}", blob.digest);
        committed.map_err(|e| match e {
            OciError::DigestMismatch { expected, actual } => RegistryError::DigestMismatch {
                what,
                expected,
                actual,
            },
            OciError::SizeMismatch {
                expected, actual, ..
            } => RegistryError::SizeMismatch {
                what,
                expected,
                actual,
            },
            other => RegistryError::Store(other),
        })
    }

    fn transfer_error(&self, what: &str, reason: &str) -> RegistryError {
        RegistryError::Transfer {
            registry: self.registry(),
            what: what.to_owned(),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, reason.to_owned()),
        }
    }

    fn no_platform(&self, error: OciError) -> RegistryError {
        match error {
            OciError::NoMatch { available, .. } | OciError::Ambiguous { available } => {
                RegistryError::NoPlatform {
                    reference: self.name.clone(),
                    available,
                }
            }
            other => RegistryError::Store(other),
        }
    }

    /// Sorts a client error into what the user can act on.
    fn classify(&self, source: OciDistributionError, what: &str) -> RegistryError {
        use OciDistributionError as E;
        let status = match &source {
            E::RequestError(e) if e.is_connect() || e.is_timeout() => {
                return RegistryError::Unreachable {
                    registry: self.registry(),
                    source,
                }
            }
            E::RequestError(e) => e.status().map(|s| s.as_u16()),
            E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Some(401),
            E::ServerError { code, .. } => Some(*code),
            E::RegistryError { envelope, .. } => {
                let has = |codes: &[OciErrorCode]| {
                    envelope.errors.iter().any(|e| codes.contains(&e.code))
                };
                if has(&[
                    OciErrorCode::ManifestUnknown,
                    OciErrorCode::NameUnknown,
                    OciErrorCode::BlobUnknown,
                    OciErrorCode::NotFound,
                ]) {
                    Some(404)
                } else if has(&[OciErrorCode::Unauthorized, OciErrorCode::Denied]) {
                    Some(401)
                } else {
                    None
                }
            }
            E::DigestError(ClientDigestError::VerificationError { expected, actual }) => {
                if let (Ok(expected), Ok(actual)) = (Digest::parse(expected), Digest::parse(actual))
                {
                    return RegistryError::DigestMismatch {
                        what: what.to_owned(),
                        expected,
                        actual,
                    };
                }
                None
            }
            _ => None,
        };
        match status {
            Some(404) => RegistryError::NotFound {
                what: what.to_owned(),
                registry: self.registry(),
            },
            Some(401 | 403) if self.auth == RegistryAuth::Anonymous => {
                RegistryError::CredentialsNeeded {
                    registry: self.registry(),
                    reference: self.name.clone(),
                }
            }
            Some(401 | 403) => RegistryError::CredentialsRefused {
                registry: self.registry(),
                reference: self.name.clone(),
            },
            _ => RegistryError::Registry {
                registry: self.registry(),
                source,
            },
        }
    }
}

/// Whether a stream error is oci-client's digest check of a whole blob.
fn is_digest_check(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<ClientDigestError>().is_some())
}

fn check_json_size(size: u64, what: &str) -> Result<(), RegistryError> {
    if size > JSON_LIMIT {
        return Err(RegistryError::TooLarge {
            what: what.to_owned(),
            size,
        });
    }
    Ok(())
}

fn verify(what: &str, bytes: &[u8], expected: &Digest) -> Result<(), RegistryError> {
    let actual = Digest::of(bytes);
    if &actual != expected {
        return Err(RegistryError::DigestMismatch {
            what: what.to_owned(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

fn parse_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, RegistryError> {
    serde_json::from_slice(bytes).map_err(|source| RegistryError::InvalidDocument {
        what: what.to_owned(),
        source,
    })
}

/// The media type of a manifest document: its `mediaType` field, else the one of the index
/// entry that pointed at it, else what its shape says (OCI lets both omit it).
fn media_type_of(
    bytes: &[u8],
    pointer: Option<&Descriptor>,
    what: &str,
) -> Result<String, RegistryError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        schema_version: Option<u32>,
        media_type: Option<String>,
        manifests: Option<IgnoredAny>,
        config: Option<IgnoredAny>,
    }
    let probe: Probe = parse_json(bytes, what)?;
    if probe.schema_version == Some(1) {
        return Ok(MEDIA_TYPE_DOCKER_SCHEMA1.to_owned());
    }
    let by_shape = || match (&probe.manifests, &probe.config) {
        (Some(_), None) => Some(MEDIA_TYPE_INDEX.to_owned()),
        (None, Some(_)) => Some(MEDIA_TYPE_MANIFEST.to_owned()),
        _ => None,
    };
    Ok(probe
        .media_type
        .clone()
        .or_else(|| pointer.map(|p| p.media_type.clone()))
        .or_else(by_shape)
        .unwrap_or_else(|| "(none)".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docker_config(entry: &str) -> Vec<u8> {
        format!(r#"{{"auths": {{"https://index.docker.io/v1/": {entry}, "ghcr.io": {{"auth": "eDp5"}}}}}}"#)
            .into_bytes()
    }

    #[test]
    fn references_are_normalized_like_docker_does() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("user/app:1", "docker.io/user/app:1"),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
            ("localhost/a/b:t", "localhost/a/b:t"),
        ];
        for (given, normalized) in cases {
            assert_eq!(parse_reference(given).unwrap().0.whole(), normalized);
        }
    }

    #[test]
    fn malformed_references_name_the_accepted_form() {
        for bad in ["", "Upper/Case", "a b", "x@sha256:abc", "x@sha512:00"] {
            let err = parse_reference(bad).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, RegistryError::InvalidReference { .. }),
                "{message}"
            );
            assert!(message.contains(&format!("`{bad}`")), "{message}");
            assert!(
                message.contains("[REGISTRY[:PORT]/]REPOSITORY"),
                "{message}"
            );
        }
        let sha512 = format!("x@sha512:{}", "0".repeat(128));
        let message = parse_reference(&sha512).unwrap_err().to_string();
        assert!(message.contains("only sha256"), "{message}");
    }

    #[test]
    fn docker_config_auth_is_decoded_per_registry() {
        // "alice:s3:cret"
        let config = docker_config(r#"{"auth": "YWxpY2U6czM6Y3JldA=="}"#);
        let basic = |u: &str, p: &str| {
            Some(Credentials::Basic {
                username: u.into(),
                password: p.into(),
            })
        };
        assert_eq!(
            credentials_from_docker_config(&config, "docker.io"),
            basic("alice", "s3:cret")
        );
        assert_eq!(
            credentials_from_docker_config(&config, "ghcr.io"),
            basic("x", "y")
        );
        assert_eq!(credentials_from_docker_config(&config, "quay.io"), None);
        assert_eq!(credentials_from_docker_config(b"not json", "ghcr.io"), None);
    }

    #[test]
    fn docker_config_tokens() {
        let config = docker_config(r#"{"registrytoken": "tok"}"#);
        assert_eq!(
            credentials_from_docker_config(&config, "docker.io"),
            Some(Credentials::Bearer("tok".into()))
        );
        // "bob:"
        let config = docker_config(r#"{"auth": "Ym9iOg==", "identitytoken": "refresh"}"#);
        assert_eq!(
            credentials_from_docker_config(&config, "index.docker.io"),
            Some(Credentials::Basic {
                username: "bob".into(),
                password: "refresh".into()
            })
        );
        let config = docker_config(r#"{}"#);
        assert_eq!(credentials_from_docker_config(&config, "docker.io"), None);
    }

    #[test]
    fn credentials_never_show_in_debug_output() {
        let options = PullOptions {
            credentials: Credentials::Basic {
                username: "alice".into(),
                password: "hunter2".into(),
            },
            ..PullOptions::default()
        };
        let shown = format!("{options:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
        let shown = format!("{:?}", Credentials::Bearer("secret-token".into()));
        assert!(!shown.contains("secret-token"), "{shown}");
    }

    #[test]
    fn media_types_come_from_the_document_or_its_shape() {
        let of = |json: &str| media_type_of(json.as_bytes(), None, "m").unwrap();
        assert_eq!(
            of(r#"{"schemaVersion":2,"mediaType":"application/x"}"#),
            "application/x"
        );
        assert_eq!(
            of(r#"{"schemaVersion":2,"manifests":[]}"#),
            MEDIA_TYPE_INDEX
        );
        assert_eq!(
            of(r#"{"schemaVersion":2,"config":{}}"#),
            MEDIA_TYPE_MANIFEST
        );
        assert_eq!(of(r#"{"schemaVersion":1}"#), MEDIA_TYPE_DOCKER_SCHEMA1);
    }
}
