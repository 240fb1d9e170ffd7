//! Checkpoints: a snapshot as a self-contained, portable directory, for the
//! containerd shim's checkpoint and restore (containerd tars the directory
//! into its content store and later untars it, maybe on another host, into
//! another directory).
//!
//! # Format (version 1)
//! - `checkpoint.json`: the format name and version, what a restore needs
//!   of the snapshot record (vCPUs, memory, accelerator, image name,
//!   environment, NIC mode, egress policy and forwarded guest ports, how
//!   the device state was saved, lineage), facts about the exporting host
//!   (QEMU version), and the size and SHA-256 of each file below;
//! - `state.bin`: the device state, as the snapshot holds it;
//! - `memory.pack`: the guest RAM without its holes and zero pages
//!   ([`memfile::pack`]): tar does not keep sparse holes, so the sparse
//!   `memory.ram` would otherwise cost its full size;
//! - `disk.qcow2`: the snapshot's frozen layer with its whole backing chain,
//!   base image included, flattened into one standalone qcow2 (only
//!   allocated clusters, zstd-compressed): a restore depends on nothing of
//!   the exporting host.
//!
//! An export takes the snapshot's shared lock while it reads it, writes
//! `checkpoint.json` last (atomically) and `fsync`s everything; on failure
//! it removes what it wrote.
//!
//! # Import
//! The directory is untrusted input (anyone can craft a tar). Before
//! anything is recorded: the format and version, the bounds of every field
//! (vCPUs and memory within this runtime's maximums, the same accelerator),
//! and that each file is a regular file (not a link) of the recorded size.
//! Then, as for a snapshot being taken, the record goes first (`creating`,
//! under the snapshot's exclusive lock, with its disk as a layer with no
//! parent), then the files: `state.bin` copied, `memory.ram` rebuilt
//! sparse from the pack (extents sorted, apart, page-aligned and inside
//! the RAM), the disk copied into `layers/` and checked to have no backing
//! file or external data file (either could point anywhere on this host)
//! by its header and by `qemu-img info` and `check`. Every file's SHA-256
//! is compared to `checkpoint.json` while it is read. Only then is the
//! snapshot `ready`: an ordinary user snapshot that [`Manager::restore`]
//! restores like one taken here. A failure removes the record and every
//! file; a manager that dies half-way leaves a `creating` record that
//! reconciliation discards (its sandbox never existed).
//!
//! An imported snapshot's "base image" (`image_path`) is its own layer:
//! its disk chain ends there.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::Instrument;

use super::lifecycle::new_id;
use super::{create_private_dir, remove_file_if_exists, Manager, SnapshotInfo};
use crate::accel::AccelKind;
use crate::config::{RuntimeConfig, MIN_MEMORY_MB};
use crate::error::RuntimeError;
use crate::lock::{LockError, SandboxLock};
use crate::memfile;
use crate::network::{validate_description, SnapshotNet, MAX_FORWARDS};
use crate::spec;
use crate::store::{SnapshotRecord, SnapshotState, StoreError};
use crate::vmm::StateFormat;

const FORMAT: &str = "arrakis-checkpoint";

/// The version [`Manager::export_snapshot`] writes and the only one
/// [`Manager::import_snapshot`] reads.
pub const CHECKPOINT_VERSION: u32 = 1;

const MANIFEST: &str = "checkpoint.json";
const MANIFEST_TEMP: &str = ".checkpoint.json.tmp";
const STATE: &str = "state.bin";
const MEMORY: &str = "memory.pack";
const DISK: &str = "disk.qcow2";

/// Largest `checkpoint.json` read.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Largest device state accepted (a real one is tens of KiB).
const MAX_STATE_BYTES: u64 = 64 << 20;

/// Largest virtual disk accepted.
const MAX_DISK_BYTES: u64 = 1 << 40;

/// How long `qemu-img info` or `check` of an imported disk may take.
const DISK_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Bytes read or written at a time.
const CHUNK: usize = 1 << 20;

/// What [`Manager::export_snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedCheckpoint {
    /// The snapshot exported.
    pub snapshot: String,
    pub dir: PathBuf,
    /// Every file written, `checkpoint.json` last.
    pub files: Vec<CheckpointFile>,
    /// Their total size.
    pub bytes: u64,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `checkpoint.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    version: u32,
    snapshot: SnapshotMeta,
    host: HostMeta,
    files: Files,
}

/// What a restore needs of the snapshot record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotMeta {
    id: String,
    sandbox: String,
    created_at: u64,
    vcpus: u32,
    memory_mb: u32,
    image: String,
    env: BTreeMap<String, String>,
    accel: AccelKind,
    /// How `state.bin` was saved (`devices` or `migration`).
    state_format: String,
    parent_snapshot: Option<String>,
    /// The NIC, whose mode a restore recreates; `None` if it had none.
    network: Option<SnapshotNet>,
}

/// Facts about the exporting host, for diagnosing a restore that fails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostMeta {
    /// First line of `qemu-system-* --version` (empty if unknown).
    qemu_version: String,
    arrakis_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Files {
    #[serde(rename = "state.bin")]
    state: FileDigest,
    #[serde(rename = "memory.pack")]
    memory: FileDigest,
    #[serde(rename = "disk.qcow2")]
    disk: FileDigest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDigest {
    size: u64,
    /// Lowercase hex.
    sha256: String,
}

/// The fields read before the rest, so that another version is refused as
/// such rather than as unknown fields.
#[derive(Deserialize)]
struct Head {
    format: Option<serde_json::Value>,
    version: Option<serde_json::Value>,
}

impl Manager {
    /// Writes snapshot `id` into `dir`, an existing empty directory, as a
    /// self-contained checkpoint (see the module documentation); every
    /// file is on stable storage when this returns. On failure `dir` is
    /// left empty.
    pub async fn export_snapshot(
        &self,
        id: &str,
        dir: &Path,
    ) -> Result<ExportedCheckpoint, RuntimeError> {
        self.export_inner(id, dir)
            .instrument(tracing::info_span!("snapshot", id = %id))
            .await
    }

    /// Imports the checkpoint in `dir` (untrusted) as a new ready user
    /// snapshot with a new id (`snap-<random hex>`), which
    /// [`Manager::restore`] restores like one taken here. Bad input is
    /// `InvalidArgument` naming the file and what is wrong; a checkpoint
    /// this host cannot run (another accelerator, over the configured
    /// maximums) is `SnapshotIncompatible`. On failure nothing is left.
    pub async fn import_snapshot(&self, dir: &Path) -> Result<SnapshotInfo, RuntimeError> {
        self.import_inner(dir)
            .instrument(tracing::info_span!("import", dir = %dir.display()))
            .await
    }

    async fn export_inner(&self, id: &str, dir: &Path) -> Result<ExportedCheckpoint, RuntimeError> {
        require_empty_dir(dir)?;
        let snap = self.ready_snapshot(id)?;
        let started = Instant::now();
        let (lock, snap) = self.share_snapshot(snap).await?;
        let result = self.write_checkpoint(&snap, dir).await;
        drop(lock);
        match result {
            Ok(exported) => {
                tracing::info!(
                    bytes = exported.bytes,
                    total_ms = started.elapsed().as_millis() as u64,
                    "snapshot exported"
                );
                Ok(exported)
            }
            Err(error) => {
                tracing::warn!(error = %error.chain(), "export failed; removing what it wrote");
                for name in [STATE, MEMORY, DISK, MANIFEST_TEMP, MANIFEST] {
                    remove_file_if_exists(&dir.join(name));
                }
                Err(error)
            }
        }
    }

    /// Takes the shared lock of `snap` (as just read) and returns it with
    /// the record as of then.
    async fn share_snapshot(
        &self,
        snap: SnapshotRecord,
    ) -> Result<(SandboxLock, SnapshotRecord), RuntimeError> {
        let path = self.inner.layout.snapshot_lock(&snap.dir);
        let lock = SandboxLock::acquire_shared(&path, self.lock_timeout())
            .await
            .map_err(|e| lock_err(&snap.id, e))?;
        let current = self.inner.store.get_snapshot(&snap.id)?.filter(|s| {
            s.state == SnapshotState::Ready && s.dir == snap.dir && s.golden_key.is_none()
        });
        match current {
            Some(current) => Ok((lock, current)),
            None => {
                // Deleted while we waited: our open re-created its lock file.
                remove_file_if_exists(&path);
                Err(RuntimeError::SnapshotNotFound { id: snap.id })
            }
        }
    }

    /// The data files at once (the disk's conversion runs in `qemu-img`),
    /// then `checkpoint.json`.
    async fn write_checkpoint(
        &self,
        snap: &SnapshotRecord,
        dir: &Path,
    ) -> Result<ExportedCheckpoint, RuntimeError> {
        let layout = &self.inner.layout;
        let snap_dir = layout.snapshot_dir(&snap.dir);
        let (state_src, memory_src) = (snap_dir.state_file(), snap_dir.memory_file());
        let (state_dst, memory_dst) = (dir.join(STATE), dir.join(MEMORY));
        let memory_size = u64::from(snap.memory_mb) << 20;
        let copies = blocking(move || {
            let state = File::open(&state_src)
                .and_then(|input| copy_hashed(input, &state_dst))
                .map_err(io_err("copy", &state_src))?;
            let memory = pack_memory(&memory_src, memory_size, &memory_dst)?;
            Ok((state, memory))
        });
        let disk_dst = dir.join(DISK);
        let disk = async {
            let layer = layout.layer_file(&snap.layer);
            flatten(&self.inner.config.qemu_img_binary, &layer, &disk_dst).await?;
            let disk_dst = disk_dst.clone();
            blocking(move || hash_and_sync(&disk_dst).map_err(io_err("sync", &disk_dst))).await
        };
        // Both finish before either error counts: a blocking task cannot be
        // cancelled, and must not write after the clean-up.
        let (copies, disk) = tokio::join!(copies, disk);
        let ((state, memory), disk) = (copies?, disk?);
        let manifest = Manifest {
            format: FORMAT.to_string(),
            version: CHECKPOINT_VERSION,
            snapshot: SnapshotMeta {
                id: snap.id.clone(),
                sandbox: snap.sandbox.clone(),
                created_at: snap.created_at,
                vcpus: snap.vcpus,
                memory_mb: snap.memory_mb,
                image: snap.image.clone(),
                env: snap.env.clone(),
                accel: snap.accel,
                state_format: snap.state_format.as_str().to_string(),
                parent_snapshot: snap.parent_snapshot.clone(),
                network: snap.network.clone(),
            },
            host: HostMeta {
                qemu_version: qemu_version(&self.inner.config.qemu_binary).await,
                arrakis_version: env!("CARGO_PKG_VERSION").to_string(),
            },
            files: Files {
                state,
                memory,
                disk,
            },
        };
        let dir = dir.to_path_buf();
        let snapshot = snap.id.clone();
        blocking(move || {
            let written = write_manifest(&dir, &manifest)?;
            let files = &manifest.files;
            let files: Vec<CheckpointFile> = [
                (STATE, &files.state),
                (MEMORY, &files.memory),
                (DISK, &files.disk),
                (MANIFEST, &written),
            ]
            .into_iter()
            .map(|(name, digest)| CheckpointFile {
                name: name.to_string(),
                size: digest.size,
                sha256: digest.sha256.clone(),
            })
            .collect();
            Ok(ExportedCheckpoint {
                snapshot,
                bytes: files.iter().map(|f| f.size).sum(),
                files,
                dir,
            })
        })
        .await
    }

    async fn import_inner(&self, dir: &Path) -> Result<SnapshotInfo, RuntimeError> {
        let started = Instant::now();
        let owned = dir.to_path_buf();
        let manifest = blocking(move || read_manifest(&owned)).await?;
        let meta = &manifest.snapshot;
        let state_format = check_meta(meta, &self.inner.config, self.inner.accel.kind())?;
        check_files(&manifest.files)?;
        let inputs = Inputs::open(dir, &manifest.files)?;
        let here = qemu_version(&self.inner.config.qemu_binary).await;
        if here != manifest.host.qemu_version {
            tracing::warn!(
                theirs = %manifest.host.qemu_version,
                ours = %here,
                "the checkpoint was taken under another QEMU version; its device state may not load"
            );
        }
        let layer = new_id()?;
        let snap = SnapshotRecord {
            id: format!("snap-{}", new_id()?),
            dir: new_id()?,
            state: SnapshotState::Creating,
            sandbox: meta.sandbox.clone(),
            // No sandbox here has it: reconciliation of an interrupted
            // import finds none to repair and discards the record.
            sandbox_id: new_id()?,
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            image: meta.image.clone(),
            image_path: self.inner.layout.layer_file(&layer),
            env: meta.env.clone(),
            accel: meta.accel,
            layer,
            next_layer: None,
            created_at: meta.created_at,
            parent_snapshot: meta.parent_snapshot.clone(),
            state_format,
            golden_key: None,
            network: meta.network.clone(),
        };
        let lock_path = self.inner.layout.snapshot_lock(&snap.dir);
        let lock = SandboxLock::try_acquire(&lock_path)
            .map_err(|e| lock_err(&snap.id, e))?
            .ok_or_else(|| RuntimeError::SnapshotBusy {
                id: snap.id.clone(),
            })?;
        if let Err(error) = self.inner.store.import_snapshot(&snap) {
            remove_file_if_exists(&lock_path);
            return Err(match error {
                StoreError::DuplicateSnapshot { id } => RuntimeError::SnapshotExists { id },
                other => other.into(),
            });
        }
        let result: Result<(), RuntimeError> = async {
            self.fill_imported(&snap, inputs, &manifest.files).await?;
            Ok(self.inner.store.finish_snapshot(&snap.id)?)
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(id = %snap.id, error = %error.chain(), "import failed; removing it");
            self.discard_import(&snap);
            drop(lock);
            remove_file_if_exists(&lock_path);
            return Err(error);
        }
        drop(lock);
        tracing::info!(
            id = %snap.id,
            from = %meta.id,
            total_ms = started.elapsed().as_millis() as u64,
            "snapshot imported"
        );
        Ok(self.snapshot_info(&snap))
    }

    /// Writes the files of the recorded, `creating` import `snap` from
    /// `inputs`, checking each against `files`.
    async fn fill_imported(
        &self,
        snap: &SnapshotRecord,
        inputs: Inputs,
        files: &Files,
    ) -> Result<(), RuntimeError> {
        let layout = &self.inner.layout;
        let snap_dir = layout.snapshot_dir(&snap.dir);
        create_private_dir(snap_dir.path())?;
        let Inputs {
            state,
            memory,
            disk,
        } = inputs;
        let (state_dst, memory_dst) = (snap_dir.state_file(), snap_dir.memory_file());
        let (state_want, memory_want) = (files.state.clone(), files.memory.clone());
        let size = u64::from(snap.memory_mb) << 20;
        let copies = blocking(move || {
            let got = copy_hashed(state.bounded(&state_want), &state_dst)
                .map_err(io_err("write", &state_dst))?;
            same_digest(STATE, &got, &state_want)?;
            unpack_memory(memory, &memory_want, size, &memory_dst)
        });
        let layer = layout.layer_file(&snap.layer);
        let disk_want = files.disk.clone();
        let disk = async {
            let dst = layer.clone();
            blocking(move || {
                let got =
                    copy_hashed(disk.bounded(&disk_want), &dst).map_err(io_err("write", &dst))?;
                same_digest(DISK, &got, &disk_want)
            })
            .await?;
            check_disk(&self.inner.config.qemu_img_binary, &layer).await
        };
        // Both finish before either error counts (see `write_checkpoint`).
        let (copies, disk) = tokio::join!(copies, disk);
        copies.and(disk)?;
        let dirs = [
            snap_dir.path().to_path_buf(),
            layout.layers_dir(),
            layout.snapshots_dir(),
        ];
        blocking(move || {
            for dir in &dirs {
                memfile::sync_dir(dir).map_err(io_err("sync", dir))?;
            }
            Ok(())
        })
        .await
    }

    /// Removes a failed import's record, layer, files and directory. The
    /// caller holds its lock.
    fn discard_import(&self, snap: &SnapshotRecord) {
        match self.inner.store.delete_snapshot(&snap.id, &snap.dir) {
            Ok(dead) => self.remove_layers(&dead),
            Err(error) => {
                // Left `creating`: reconciliation removes it.
                tracing::error!(id = %snap.id, error = %crate::agent::error_chain(&error), "cannot delete the import's record");
                return;
            }
        }
        let dir = self.inner.layout.snapshot_dir(&snap.dir);
        if let Err(error) = std::fs::remove_dir_all(dir.path()) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %dir.path().display(), %error, "cannot remove the import's directory");
            }
        }
    }
}

/// The data files of a checkpoint, opened, of their recorded sizes.
struct Inputs {
    state: Input,
    memory: Input,
    disk: Input,
}

struct Input {
    file: File,
    path: PathBuf,
}

impl Input {
    /// The file, read up to one byte past its recorded size (a file that
    /// grew since it was opened shows as too long, and is not read on).
    fn bounded(self, want: &FileDigest) -> io::Take<File> {
        self.file.take(want.size.saturating_add(1))
    }
}

impl Inputs {
    fn open(dir: &Path, files: &Files) -> Result<Inputs, RuntimeError> {
        let open = |name: &'static str, want: &FileDigest| {
            let (file, path, size) = open_input(dir, name)?;
            if size != want.size {
                return Err(bad(
                    name,
                    format!("it is {size} bytes; {MANIFEST} says {}", want.size),
                ));
            }
            Ok(Input { file, path })
        };
        Ok(Inputs {
            state: open(STATE, &files.state)?,
            memory: open(MEMORY, &files.memory)?,
            disk: open(DISK, &files.disk)?,
        })
    }
}

/// The error for a checkpoint file that is not what it should be.
fn bad(file: &'static str, message: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidArgument {
        field: file,
        message: message.into(),
    }
}

fn lock_err(id: &str, error: LockError) -> RuntimeError {
    match error {
        LockError::Timeout { .. } => RuntimeError::SnapshotBusy { id: id.to_string() },
        LockError::Io { path, source } => RuntimeError::Io {
            op: "lock",
            path,
            source,
        },
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { op, path, source }
}

/// Runs blocking file work off the async threads.
async fn blocking<T, F>(work: F) -> Result<T, RuntimeError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RuntimeError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|join| {
            Err(RuntimeError::Io {
                op: "run a checkpoint task for",
                path: PathBuf::new(),
                source: io::Error::other(join.to_string()),
            })
        })
}

fn require_empty_dir(dir: &Path) -> Result<(), RuntimeError> {
    let not_usable = |message: String| RuntimeError::InvalidArgument {
        field: "dir",
        message: format!(
            "{}: {message}; accepted: an existing empty directory",
            dir.display()
        ),
    };
    let mut entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(not_usable("it does not exist".into()))
        }
        Err(error) if error.kind() == io::ErrorKind::NotADirectory => {
            return Err(not_usable("it is not a directory".into()))
        }
        Err(source) => return Err(io_err("read", dir)(source)),
    };
    match entries.next() {
        None => Ok(()),
        Some(Ok(entry)) => Err(not_usable(format!(
            "it is not empty (it holds {:?})",
            entry.file_name()
        ))),
        Some(Err(source)) => Err(io_err("read", dir)(source)),
    }
}

/// A reader or writer that hashes and counts what passes through.
struct Hashing<T> {
    inner: T,
    hasher: Sha256,
    bytes: u64,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    fn finish(self) -> (T, FileDigest) {
        let digest = FileDigest {
            size: self.bytes,
            sha256: hex(&self.hasher.finalize()),
        };
        (self.inner, digest)
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates `path` (mode 0600); it must not exist.
fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Copies all of `input` into the new file `dst`, synced; returns what
/// was copied.
fn copy_hashed(mut input: impl Read, dst: &Path) -> io::Result<FileDigest> {
    let mut out = Hashing::new(create_new(dst)?);
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        out.write_all(&buf[..n])?;
    }
    let (file, digest) = out.finish();
    file.sync_all()?;
    Ok(digest)
}

/// Packs the snapshot's RAM file `src` (of `size` bytes) into `dst`.
fn pack_memory(src: &Path, size: u64, dst: &Path) -> Result<FileDigest, RuntimeError> {
    let found = std::fs::metadata(src).map_err(io_err("read", src))?.len();
    if found != size {
        return Err(RuntimeError::Io {
            op: "pack",
            path: src.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("it is {found} bytes; the snapshot has {size} bytes of RAM"),
            ),
        });
    }
    let file = create_new(dst).map_err(io_err("create", dst))?;
    let mut out = Hashing::new(io::BufWriter::with_capacity(CHUNK, file));
    let packed = memfile::pack(src, &mut out).map_err(io_err("pack", src))?;
    let (writer, digest) = out.finish();
    let file = writer
        .into_inner()
        .map_err(|e| io_err("write", dst)(e.into_error()))?;
    file.sync_all().map_err(io_err("sync", dst))?;
    tracing::debug!(
        extents = packed.extents,
        data_bytes = packed.data_bytes,
        "memory packed"
    );
    Ok(digest)
}

/// Rebuilds `dst` from the pack `input`, which must match `want`. A pack
/// whose digest differs is reported as such, before what is wrong in it.
fn unpack_memory(
    input: Input,
    want: &FileDigest,
    size: u64,
    dst: &Path,
) -> Result<(), RuntimeError> {
    let path = input.path.clone();
    let mut reader = Hashing::new(BufReader::with_capacity(CHUNK, input.bounded(want)));
    let unpacked = memfile::unpack(&mut reader, want.size, size, dst);
    // The rest of the file counts for its digest.
    io::copy(&mut reader, &mut io::sink()).map_err(io_err("read", &path))?;
    same_digest(MEMORY, &reader.finish().1, want)?;
    match unpacked {
        Ok(_) => File::open(dst)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", dst)),
        Err(error) if error.kind() == io::ErrorKind::InvalidData => {
            Err(bad(MEMORY, error.to_string()))
        }
        Err(source) => Err(io_err("unpack the memory into", dst)(source)),
    }
}

fn same_digest(
    file: &'static str,
    got: &FileDigest,
    want: &FileDigest,
) -> Result<(), RuntimeError> {
    if got.size != want.size {
        return Err(bad(
            file,
            format!("it is {} bytes; {MANIFEST} says {}", got.size, want.size),
        ));
    }
    if got.sha256 != want.sha256 {
        return Err(bad(
            file,
            format!(
                "its sha256 is {}; {MANIFEST} says {} (the file is damaged or was changed)",
                got.sha256, want.sha256
            ),
        ));
    }
    Ok(())
}

/// Fsyncs `path` and returns its digest.
fn hash_and_sync(path: &Path) -> io::Result<FileDigest> {
    let file = File::open(path)?;
    file.sync_all()?;
    let mut reader = Hashing::new(file);
    io::copy(&mut reader, &mut io::sink())?;
    Ok(reader.finish().1)
}

/// Opens checkpoint file `name` of `dir` for reading: a regular file, not
/// a link to one. Returns it, its path and its size.
fn open_input(dir: &Path, name: &'static str) -> Result<(File, PathBuf, u64), RuntimeError> {
    let path = dir.join(name);
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(bad(name, format!("{} is missing", path.display())))
        }
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(bad(
                name,
                format!(
                    "{} is a symbolic link; accepted: a regular file",
                    path.display()
                ),
            ))
        }
        Err(source) => return Err(io_err("open", &path)(source)),
    };
    let meta = file.metadata().map_err(io_err("stat", &path))?;
    if !meta.is_file() {
        return Err(bad(
            name,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok((file, path, meta.len()))
}

/// Reads `checkpoint.json` of `dir`: this format, this version.
fn read_manifest(dir: &Path) -> Result<Manifest, RuntimeError> {
    let (file, path, _) = open_input(dir, MANIFEST)?;
    let mut text = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(io_err("read", &path))?;
    parse_manifest(&text)
}

fn parse_manifest(text: &[u8]) -> Result<Manifest, RuntimeError> {
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(bad(
            MANIFEST,
            format!("it is over {MAX_MANIFEST_BYTES} bytes"),
        ));
    }
    let head: Head =
        serde_json::from_slice(text).map_err(|e| bad(MANIFEST, format!("unreadable: {e}")))?;
    if head.format.as_ref().and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(bad(
            MANIFEST,
            format!(
                "its format is {}; accepted: {FORMAT:?}",
                head.format.map_or("missing".to_string(), |f| f.to_string())
            ),
        ));
    }
    let version = head.version.unwrap_or(serde_json::Value::Null);
    if version != CHECKPOINT_VERSION {
        return Err(bad(
            MANIFEST,
            format!("unknown version {version}; this build reads version {CHECKPOINT_VERSION}"),
        ));
    }
    serde_json::from_slice(text).map_err(|e| bad(MANIFEST, e.to_string()))
}

/// Checks the snapshot's fields; returns its state format.
fn check_meta(
    meta: &SnapshotMeta,
    config: &RuntimeConfig,
    accel: AccelKind,
) -> Result<StateFormat, RuntimeError> {
    let field = |name: &str, result: Result<(), String>| {
        result.map_err(|message| bad(MANIFEST, format!("snapshot.{name}: {message}")))
    };
    field("id", spec::validate_snapshot_id(&meta.id))?;
    field("sandbox", spec::validate_name(&meta.sandbox))?;
    field("env", spec::validate_env(&meta.env))?;
    if let Some(parent) = &meta.parent_snapshot {
        field("parent_snapshot", spec::validate_snapshot_id(parent))?;
    }
    field(
        "image",
        spec::validate_image_name(&meta.image).or_else(|local| {
            arrakis_image::store::ImageRef::parse(&meta.image)
                .map(drop)
                .map_err(|e| format!("{local}; nor is it an image reference: {e}"))
        }),
    )?;
    if i64::try_from(meta.created_at).is_err() {
        field("created_at", Err("out of range".into()))?;
    }
    let state_format = StateFormat::parse(&meta.state_format).ok_or_else(|| {
        bad(
            MANIFEST,
            format!(
                "snapshot.state_format: {:?}; accepted: \"devices\" or \"migration\"",
                meta.state_format
            ),
        )
    })?;
    if let Some(net) = &meta.network {
        field("network.egress", net.egress.validate())?;
        if net.forwards.len() > MAX_FORWARDS {
            field("network.forwards", Err(format!("over {MAX_FORWARDS}")))?;
        }
        for forward in &net.forwards {
            if forward.guest_port == 0 {
                field("network.forwards", Err("guest_port 0".into()))?;
            }
            field(
                "network.forwards",
                validate_description(&forward.description),
            )?;
        }
    }
    if meta.vcpus == 0 || meta.memory_mb < MIN_MEMORY_MB {
        return Err(bad(
            MANIFEST,
            format!(
                "snapshot: {} vCPUs and {} MiB; accepted: at least 1 vCPU and {MIN_MEMORY_MB} MiB",
                meta.vcpus, meta.memory_mb
            ),
        ));
    }
    let incompatible = |reason: String| RuntimeError::SnapshotIncompatible {
        id: meta.id.clone(),
        reason,
    };
    // As a restore of a snapshot taken here would say.
    if meta.accel != accel {
        return Err(incompatible(format!(
            "it was taken under {}, and VMs here run under {}",
            meta.accel.as_str(),
            accel.as_str()
        )));
    }
    if meta.vcpus > config.max_vcpus || meta.memory_mb > config.max_memory_mb {
        return Err(incompatible(format!(
            "it has {} vCPUs and {} MiB; this runtime allows at most {} and {} MiB",
            meta.vcpus, meta.memory_mb, config.max_vcpus, config.max_memory_mb
        )));
    }
    Ok(state_format)
}

/// Checks the recorded sizes and digests' form.
fn check_files(files: &Files) -> Result<(), RuntimeError> {
    for (name, digest) in [
        (STATE, &files.state),
        (MEMORY, &files.memory),
        (DISK, &files.disk),
    ] {
        let hex_digest = digest.sha256.len() == 64
            && digest
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_digest {
            return Err(bad(
                MANIFEST,
                format!(
                    "files.{name}.sha256 {:?} is not 64 lowercase hex digits",
                    digest.sha256
                ),
            ));
        }
    }
    if files.state.size > MAX_STATE_BYTES {
        return Err(bad(
            MANIFEST,
            format!(
                "files.{STATE}.size {} is over the {MAX_STATE_BYTES} bytes accepted",
                files.state.size
            ),
        ));
    }
    Ok(())
}

/// Writes `checkpoint.json` atomically (temporary file, fsync, rename,
/// fsync of `dir`); returns its digest.
fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<FileDigest, RuntimeError> {
    let mut text = serde_json::to_vec_pretty(manifest).map_err(|e| RuntimeError::Io {
        op: "serialize",
        path: dir.join(MANIFEST),
        source: io::Error::other(e),
    })?;
    text.push(b'\n');
    let temp = dir.join(MANIFEST_TEMP);
    let mut file = create_new(&temp).map_err(io_err("create", &temp))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", &temp))?;
    let path = dir.join(MANIFEST);
    std::fs::rename(&temp, &path).map_err(io_err("rename", &temp))?;
    memfile::sync_dir(dir).map_err(io_err("sync", dir))?;
    Ok(FileDigest {
        size: text.len() as u64,
        sha256: hex(&Sha256::digest(&text)),
    })
}

/// The first line of `qemu --version`, empty if it cannot be run.
async fn qemu_version(qemu: &Path) -> String {
    let output = tokio::process::Command::new(qemu)
        .arg("--version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        _ => String::new(),
    }
}

/// Runs `qemu-img` with `args`, within `timeout` if given.
async fn qemu_img(
    binary: &Path,
    args: &[&OsStr],
    timeout: Option<Duration>,
) -> io::Result<std::process::Output> {
    let output = tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    match timeout {
        None => output.await,
        Some(limit) => tokio::time::timeout(limit, output)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("qemu-img did not finish within {limit:?}"),
                ))
            }),
    }
}

/// The last part of a command's stderr, for an error message.
fn stderr_of(output: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let text = text.trim();
    let start = text.len().saturating_sub(2048);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

/// Writes the disk chain under `layer` as one standalone compressed qcow2
/// `dst` (which must not exist).
async fn flatten(qemu_img_binary: &Path, layer: &Path, dst: &Path) -> Result<(), RuntimeError> {
    // `-W`: out-of-order writes, safe into a new standalone image.
    let args: [&OsStr; 13] = [
        "convert".as_ref(),
        "-W".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-c".as_ref(),
        "-o".as_ref(),
        "compression_type=zstd".as_ref(),
        "-m".as_ref(),
        "4".as_ref(),
        layer.as_os_str(),
        dst.as_os_str(),
    ];
    let output = qemu_img(qemu_img_binary, &args, None)
        .await
        .map_err(|source| RuntimeError::Io {
            op: "run qemu-img to flatten the disk into",
            path: dst.to_path_buf(),
            source,
        })?;
    if output.status.success() {
        return Ok(());
    }
    Err(RuntimeError::Io {
        op: "flatten the disk into",
        path: dst.to_path_buf(),
        source: io::Error::other(format!("qemu-img convert: {}", stderr_of(&output))),
    })
}

/// What `qemu-img info --output=json` says of an imported disk.
#[derive(Debug, Deserialize)]
struct DiskInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific")]
    format_specific: Option<serde_json::Value>,
}

/// Checks that the imported disk `path` is a standalone qcow2: by its
/// header first (so that `qemu-img` never opens a backing file it names),
/// then by `qemu-img info` and `check`.
async fn check_disk(qemu_img_binary: &Path, path: &Path) -> Result<(), RuntimeError> {
    let mut header = [0u8; 80];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|_| bad(DISK, "it is too short to be a qcow2 image"))?;
    check_qcow2_header(&header)?;
    let run = |args: &[&'static str]| {
        let mut all: Vec<&OsStr> = args.iter().map(|arg| OsStr::new(*arg)).collect();
        all.push(path.as_os_str());
        async move {
            qemu_img(qemu_img_binary, &all, Some(DISK_CHECK_TIMEOUT))
                .await
                .map_err(|source| RuntimeError::Io {
                    op: "run qemu-img on",
                    path: path.to_path_buf(),
                    source,
                })
        }
    };
    let info = run(&["info", "-f", "qcow2", "--output=json"]).await?;
    if !info.status.success() {
        return Err(bad(DISK, format!("qemu-img info: {}", stderr_of(&info))));
    }
    let info: DiskInfo = serde_json::from_slice(&info.stdout)
        .map_err(|e| bad(DISK, format!("unreadable qemu-img info: {e}")))?;
    check_disk_info(&info)?;
    let check = run(&["check", "-f", "qcow2"]).await?;
    // 3: leaked clusters only, which waste space and harm nothing.
    if !matches!(check.status.code(), Some(0 | 3)) {
        return Err(bad(
            DISK,
            format!("qemu-img check finds it damaged: {}", stderr_of(&check)),
        ));
    }
    Ok(())
}

/// A qcow2 header (its first 80 bytes) that names no backing file, no
/// external data file and no encryption.
fn check_qcow2_header(header: &[u8; 80]) -> Result<(), RuntimeError> {
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or_default());
    if header[..4] != *b"QFI\xfb" {
        return Err(bad(DISK, "not a qcow2 image (wrong magic)"));
    }
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Err(bad(
            DISK,
            format!("qcow2 version {version}; accepted: 2 or 3"),
        ));
    }
    if be64(8) != 0 || be32(16) != 0 {
        return Err(bad(
            DISK,
            "it has a backing file; a checkpoint's disk must stand alone",
        ));
    }
    if be32(32) != 0 {
        return Err(bad(DISK, "it is encrypted"));
    }
    // Incompatible feature bit 2: the data is in an external file.
    if version == 3 && be64(72) & (1 << 2) != 0 {
        return Err(bad(
            DISK,
            "it keeps its data in an external file; a checkpoint's disk must stand alone",
        ));
    }
    Ok(())
}

fn check_disk_info(info: &DiskInfo) -> Result<(), RuntimeError> {
    if info.format != "qcow2" {
        return Err(bad(
            DISK,
            format!("its format is {}; accepted: qcow2", info.format),
        ));
    }
    if let Some(backing) = &info.backing_filename {
        return Err(bad(
            DISK,
            format!("it has a backing file ({backing:?}); a checkpoint's disk must stand alone"),
        ));
    }
    let data = info.format_specific.as_ref().and_then(|f| f.get("data"));
    if data.and_then(|d| d.get("data-file")).is_some() {
        return Err(bad(
            DISK,
            "it keeps its data in an external file; a checkpoint's disk must stand alone",
        ));
    }
    if data.and_then(|d| d.get("corrupt")) == Some(&serde_json::Value::Bool(true)) {
        return Err(bad(DISK, "qemu-img marks it corrupt"));
    }
    if info.virtual_size > MAX_DISK_BYTES {
        return Err(bad(
            DISK,
            format!(
                "its virtual size is {} bytes; accepted: at most {MAX_DISK_BYTES}",
                info.virtual_size
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: char) -> FileDigest {
        FileDigest {
            size: 10,
            sha256: std::iter::repeat_n(byte, 64).collect(),
        }
    }

    fn manifest() -> Manifest {
        Manifest {
            format: FORMAT.to_string(),
            version: CHECKPOINT_VERSION,
            snapshot: SnapshotMeta {
                id: "snap 1".into(),
                sandbox: "box".into(),
                created_at: 1_700_000_000,
                vcpus: 2,
                memory_mb: 256,
                image: "default".into(),
                env: [("A".to_string(), "b".to_string())].into(),
                accel: AccelKind::Tcg,
                state_format: "devices".into(),
                parent_snapshot: None,
                network: Some(SnapshotNet {
                    mode: crate::network::NetMode::User,
                    egress: crate::network::EgressPolicy::DenyAll,
                    forwards: vec![crate::network::GuestForward {
                        guest_port: 80,
                        description: "web".into(),
                    }],
                }),
            },
            host: HostMeta {
                qemu_version: "QEMU emulator version 7.2.22".into(),
                arrakis_version: "0.1.0".into(),
            },
            files: Files {
                state: digest('a'),
                memory: digest('b'),
                disk: digest('c'),
            },
        }
    }

    fn message(error: RuntimeError) -> String {
        assert_eq!(error.kind(), crate::ErrorKind::InvalidArgument, "{error}");
        error.to_string()
    }

    #[test]
    fn manifests_round_trip_and_other_versions_are_refused() {
        let text = serde_json::to_vec(&manifest()).unwrap();
        assert_eq!(parse_manifest(&text).unwrap(), manifest());
        let edit = |change: &dyn Fn(&mut serde_json::Value)| {
            let mut value = serde_json::to_value(manifest()).unwrap();
            change(&mut value);
            parse_manifest(&serde_json::to_vec(&value).unwrap()).unwrap_err()
        };
        // Another version is refused as such, whatever else it holds.
        let error = edit(&|v| {
            v["version"] = 2.into();
            v["something_new"] = true.into();
        });
        assert!(message(error).contains("checkpoint.json: unknown version 2"));
        let error = edit(&|v| v["version"] = "1".into());
        assert!(message(error).contains("unknown version \"1\""));
        let error = edit(&|v| v["format"] = "other".into());
        assert!(message(error).contains("format"));
        let error = edit(&|v| v["files"]["extra.bin"] = v["files"]["state.bin"].clone());
        assert!(message(error).contains("extra.bin"));
        let error = edit(&|v| {
            v["files"].as_object_mut().unwrap().remove("disk.qcow2");
        });
        assert!(message(error).contains("disk.qcow2"));
        assert!(message(parse_manifest(b"[1, 2]").unwrap_err()).contains("checkpoint.json"));
        let huge = vec![b' '; MAX_MANIFEST_BYTES as usize + 1];
        assert!(message(parse_manifest(&huge).unwrap_err()).contains("over"));
    }

    #[test]
    fn snapshot_fields_are_bounded() {
        let config = RuntimeConfig::default();
        let meta = manifest().snapshot;
        assert_eq!(
            check_meta(&meta, &config, AccelKind::Tcg).unwrap(),
            StateFormat::Devices
        );
        let refused = |change: &dyn Fn(&mut SnapshotMeta), expected: &str| {
            let mut meta = manifest().snapshot;
            change(&mut meta);
            let error = check_meta(&meta, &config, AccelKind::Tcg).unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
            error.kind()
        };
        use crate::ErrorKind::{FailedPrecondition, InvalidArgument};
        type Case<'a> = (&'a dyn Fn(&mut SnapshotMeta), &'a str, crate::ErrorKind);
        let cases: [Case; 12] = [
            (&|m| m.id = String::new(), "snapshot.id", InvalidArgument),
            (
                &|m| m.sandbox = "a/b\n".into(),
                "snapshot.sandbox",
                InvalidArgument,
            ),
            (
                &|m| m.image = "../../etc".into(),
                "snapshot.image",
                InvalidArgument,
            ),
            (
                &|m| {
                    m.env.insert("A=B".into(), "c".into());
                },
                "snapshot.env",
                InvalidArgument,
            ),
            (
                &|m| m.state_format = "raw".into(),
                "state_format",
                InvalidArgument,
            ),
            (&|m| m.created_at = u64::MAX, "created_at", InvalidArgument),
            (
                &|m| m.network.as_mut().unwrap().forwards[0].guest_port = 0,
                "network.forwards",
                InvalidArgument,
            ),
            (&|m| m.vcpus = 0, "0 vCPUs", InvalidArgument),
            (&|m| m.memory_mb = 1, "1 MiB", InvalidArgument),
            (
                &|m| m.accel = AccelKind::Kvm,
                "taken under kvm",
                FailedPrecondition,
            ),
            (&|m| m.vcpus = 1000, "at most 16", FailedPrecondition),
            (&|m| m.memory_mb = 1 << 30, "at most 16", FailedPrecondition),
        ];
        for (change, expected, kind) in cases {
            assert_eq!(refused(change, expected), kind, "{expected}");
        }
    }

    #[test]
    fn file_digests_and_sizes_are_checked() {
        check_files(&manifest().files).unwrap();
        let mut files = manifest().files;
        files.memory.sha256 = "ABC".into();
        assert!(message(check_files(&files).unwrap_err()).contains("files.memory.pack.sha256"));
        let mut files = manifest().files;
        files.disk.sha256 = "C".repeat(64);
        assert!(message(check_files(&files).unwrap_err()).contains("lowercase"));
        let mut files = manifest().files;
        files.state.size = MAX_STATE_BYTES + 1;
        assert!(message(check_files(&files).unwrap_err()).contains("files.state.bin.size"));

        let (a, b) = (digest('a'), digest('b'));
        same_digest(STATE, &a, &a).unwrap();
        assert!(message(same_digest(STATE, &a, &b).unwrap_err()).contains("sha256"));
        let longer = FileDigest {
            size: 11,
            ..a.clone()
        };
        assert!(message(same_digest(STATE, &longer, &a).unwrap_err()).contains("11 bytes"));
    }

    /// A qcow2 version 3 header without a backing file.
    fn header() -> [u8; 80] {
        let mut header = [0u8; 80];
        header[..4].copy_from_slice(b"QFI\xfb");
        header[4..8].copy_from_slice(&3u32.to_be_bytes());
        header
    }

    #[test]
    fn only_standalone_qcow2_headers_pass() {
        check_qcow2_header(&header()).unwrap();
        let refused = |change: &dyn Fn(&mut [u8; 80]), expected: &str| {
            let mut bytes = header();
            change(&mut bytes);
            let error = message(check_qcow2_header(&bytes).unwrap_err());
            assert!(
                error.contains("disk.qcow2") && error.contains(expected),
                "{error}"
            );
        };
        refused(&|h| h[0] = b'X', "wrong magic");
        refused(&|h| h[7] = 4, "version 4");
        refused(&|h| h[15] = 0x80, "backing file");
        refused(&|h| h[19] = 9, "backing file");
        refused(&|h| h[35] = 1, "encrypted");
        refused(&|h| h[79] = 1 << 2, "external file");
        // Version 2 has no feature bits.
        let mut v2 = header();
        v2[7] = 2;
        v2[79] = 1 << 2;
        check_qcow2_header(&v2).unwrap();
    }

    #[test]
    fn qemu_img_info_of_a_standalone_disk_passes() {
        let info = |json: serde_json::Value| -> DiskInfo { serde_json::from_value(json).unwrap() };
        let plain = serde_json::json!({
            "virtual-size": 2_619_752_448u64, "filename": "d", "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}},
        });
        check_disk_info(&info(plain.clone())).unwrap();
        let refused = |change: &dyn Fn(&mut serde_json::Value), expected: &str| {
            let mut json = plain.clone();
            change(&mut json);
            let error = message(check_disk_info(&info(json)).unwrap_err());
            assert!(error.contains(expected), "{error}");
        };
        refused(
            &|j| j["backing-filename"] = "/etc/passwd".into(),
            "/etc/passwd",
        );
        refused(
            &|j| j["format-specific"]["data"]["data-file"] = "/dev/sda".into(),
            "external file",
        );
        refused(
            &|j| j["format-specific"]["data"]["corrupt"] = true.into(),
            "corrupt",
        );
        refused(&|j| j["format"] = "raw".into(), "format is raw");
        refused(
            &|j| j["virtual-size"] = (MAX_DISK_BYTES + 1).into(),
            "virtual size",
        );
    }

    #[test]
    fn exports_go_into_an_existing_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        require_empty_dir(dir.path()).unwrap();
        let missing = dir.path().join("absent");
        assert!(message(require_empty_dir(&missing).unwrap_err()).contains("does not exist"));
        std::fs::write(dir.path().join("x"), b"").unwrap();
        assert!(message(require_empty_dir(dir.path()).unwrap_err()).contains("not empty"));
        assert!(
            message(require_empty_dir(&dir.path().join("x")).unwrap_err())
                .contains("not a directory")
        );
    }

    #[test]
    fn copies_are_hashed_synced_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"hello").unwrap();
        let dst = dir.path().join("dst");
        let digest = copy_hashed(File::open(&src).unwrap(), &dst).unwrap();
        assert_eq!(
            digest,
            FileDigest {
                size: 5,
                sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
            }
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"hello");
        assert_eq!(hash_and_sync(&dst).unwrap(), digest);
        let error = copy_hashed(File::open(&src).unwrap(), &dst).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AlreadyExists);
    }
}
