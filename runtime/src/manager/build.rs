//! `image build`: a Dockerfile executed step by step in microVMs.
//!
//! Each step that changes files (RUN, COPY, ADD, WORKDIR) runs in a sandbox booted from the
//! previous step's disk: RUN executes through the agent with the step's environment, working
//! directory and user; COPY/ADD stream a tar made on the host from the build context into the
//! guest, where the image's `tar` unpacks it (so a hostile archive can only damage the build
//! VM); WORKDIR creates the directory. The sandbox is then shut down cleanly and its disk chain
//! flattened to a sparse ext4 file, which is the step's cache entry:
//! `<images_dir>/.store/build/<key>/rootfs.ext4`, where the key chains the base image, every
//! earlier step and this step's inputs (for COPY/ADD, a hash of the copied files). A rebuild
//! walks the keys and starts from the last step already cached; a build whose every step is
//! cached starts no VM at all. Steps that only change the config (ENV, USER, CMD...) cost
//! nothing. The result is an ordinary image in the store (a manifest without layers whose disk
//! is the last step's), tagged with the requested reference.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use arrakis_image::context::{BuildContext, CopyEntry, EntryKind};
use arrakis_image::dockerfile::{self, ConfigState, CopyInstruction, Instruction, Step};
use arrakis_image::oci::RunConfig;
use arrakis_image::store::{ImageRef, ImageStore};
use arrakis_protocol::{Command, ExecRequest};
use sha2::{Digest as _, Sha256};

use super::images::{ImportedImage, ResolvedImage};
use super::Manager;
use crate::agent::{AgentClient, ExecEvent};
use crate::error::RuntimeError;
use crate::spec::SandboxSpec;

/// Changes whenever the meaning of a cache key changes, so old entries stop matching.
const KEY_VERSION: &str = "arrakis-build-1";
/// Guest memory of build VMs (capped by the configured maximum): package managers need more
/// than an idle sandbox.
const BUILD_MEMORY_MB: u32 = 1024;
/// Where COPY/ADD tars are staged in the build VM.
const STAGED_TAR: &str = "/tmp/.arrakis-build-copy.tar";

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The build context directory COPY and ADD read from.
    pub context: PathBuf,
    /// The reference the result is tagged with.
    pub tag: String,
    /// `--build-arg` values.
    pub build_args: BTreeMap<String, String>,
    /// Run every step, ignoring (and replacing) cached results.
    pub no_cache: bool,
}

/// Receives a build's progress.
pub trait BuildProgress: Send + Sync {
    /// Step `number` of `total` (1-based) starts; `cached` if its result is reused.
    fn step(&self, _number: usize, _total: usize, _text: &str, _cached: bool) {}
    /// Output of a RUN step (stdout and stderr as they come).
    fn output(&self, _data: &[u8]) {}
    /// A warning for the user (such as build args no ARG declares).
    fn warning(&self, _message: &str) {}
}

/// A [`BuildProgress`] that ignores everything.
pub struct QuietBuild;

impl BuildProgress for QuietBuild {}

fn invalid(field: &'static str, message: String) -> RuntimeError {
    RuntimeError::InvalidArgument { field, message }
}

/// The build sandbox of the step being run, if one is up.
struct BuildVm {
    name: String,
    agent: AgentClient,
}

impl Manager {
    /// Builds an image from a Dockerfile (see the module documentation) and tags it.
    pub async fn build_image(
        &self,
        request: BuildRequest,
        progress: &dyn BuildProgress,
    ) -> Result<ImportedImage, RuntimeError> {
        let tag = ImageRef::parse(&request.tag).map_err(|e| invalid("tag", e.to_string()))?;
        let parsed = dockerfile::parse(&request.dockerfile, &request.build_args)
            .map_err(|e| invalid("dockerfile", e.to_string()))?;
        let base = self.build_base(&parsed.from.reference)?;
        let base_config = ImageStore::converted_config(&base.path)
            .and_then(|c| c.config)
            .unwrap_or_default();
        let file =
            dockerfile::parse_with_base(&request.dockerfile, &request.build_args, &base_config)
                .map_err(|e| invalid("dockerfile", e.to_string()))?;
        if !file.unused_args.is_empty() {
            progress.warning(&format!(
                "build args not declared by any ARG: {}",
                file.unused_args.join(", ")
            ));
        }
        let context = BuildContext::open(&request.context)
            .map_err(|e| invalid("context", crate::agent::error_chain(&e)))?;
        let store = self.image_store()?;
        let _writing = store.hold()?;
        let cache_dir = store.dir().join("build");
        std::fs::create_dir_all(&cache_dir).map_err(io("creating", &cache_dir))?;

        let meta = std::fs::metadata(&base.path).map_err(io("reading", &base.path))?;
        let mut key = chain(
            KEY_VERSION,
            &format!(
                "FROM {} {} {}",
                base.path.display(),
                meta.len(),
                std::os::unix::fs::MetadataExt::mtime(&meta)
            ),
        );
        let mut disk = base.path.clone();
        let mut vm: Option<BuildVm> = None;
        let total = file.steps.len();
        let result = async {
            for (index, step) in file.steps.iter().enumerate() {
                let number = index + 1;
                let inputs = self.step_inputs(step, &context)?;
                let Some(inputs) = inputs else {
                    // Config only: nothing runs, nothing is cached.
                    progress.step(number, total, &step.text, true);
                    key = chain(&key, &format!("{:?}", step.config));
                    continue;
                };
                key = chain(&key, &inputs);
                let cached = cache_dir.join(&key).join("rootfs.ext4");
                if cached.is_file() && !request.no_cache {
                    progress.step(number, total, &step.text, true);
                    disk = cached;
                    continue;
                }
                progress.step(number, total, &step.text, false);
                let running = match vm.take() {
                    Some(running) => running,
                    None => self.boot_build_vm(&disk).await?,
                };
                let outcome = self.run_step(&running, step, &context, progress).await;
                vm = Some(running);
                outcome.map_err(|message| {
                    invalid(
                        "dockerfile",
                        format!(
                            "step {number}/{total} (line {}) `{}` failed: {message}",
                            step.line, step.text
                        ),
                    )
                })?;
                let running = vm.take().expect("the build VM was just put back");
                disk = self.flatten_build_vm(running, &cache_dir, &key).await?;
            }
            Ok::<(), RuntimeError>(())
        }
        .await;
        if let Some(running) = vm.take() {
            if let Err(error) = self.destroy(&running.name).await {
                tracing::warn!(error = %error.chain(), "removing a build sandbox failed");
            }
        }
        result?;

        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": file.config.to_run_config(),
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        let config = serde_json::to_vec(&config).expect("config serializes");
        let final_key = chain(&key, &String::from_utf8_lossy(&config));
        let store_clone = store.clone();
        let tag_clone = tag.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            store_clone.add_disk_image(&tag_clone, &config, &disk, &final_key)
        })
        .await
        .map_err(|e| RuntimeError::Io {
            op: "storing the built image in",
            path: store.dir().to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })??;
        Ok(ImportedImage {
            references: vec![tag],
            digest: prepared.digest,
            rootfs: prepared.rootfs,
        })
    }

    /// The base image of a build: a local image or one in the store.
    fn build_base(&self, reference: &str) -> Result<ResolvedImage, RuntimeError> {
        if reference == "scratch" {
            return Err(invalid(
                "dockerfile",
                "FROM scratch is not supported: builds run their steps in a VM booted from the \
                 base image; start from an image (e.g. busybox) or import a root file system \
                 with `arrakis image import`"
                    .into(),
            ));
        }
        let local = match crate::spec::validate_image_name(reference) {
            Ok(()) => crate::spec::image_path(&self.inner.config.images_dir, reference),
            Err(_) => PathBuf::new(),
        };
        self.resolve_image(reference, &local)
    }

    /// The cache-key input of a step that changes files, or `None` for config-only steps.
    fn step_inputs(
        &self,
        step: &Step,
        context: &BuildContext,
    ) -> Result<Option<String>, RuntimeError> {
        let state = format!(
            "env={:?} workdir={} user={:?}",
            step.config.run_env(),
            step.config.workdir,
            step.config.user
        );
        Ok(match &step.instruction {
            Instruction::Run(command) => Some(format!("RUN {:?} {state}", command.argv())),
            Instruction::Workdir(dir) => Some(format!("WORKDIR {dir}")),
            Instruction::Copy(copy) => {
                let sources = context
                    .resolve_sources(&copy.sources)
                    .map_err(|e| invalid("dockerfile", format!("line {}: {e}", step.line)))?;
                let digest = context
                    .digest_sources(&sources)
                    .map_err(|e| invalid("dockerfile", format!("line {}: {e}", step.line)))?;
                Some(format!("{copy:?} {digest} {state}"))
            }
            _ => None,
        })
    }

    async fn boot_build_vm(&self, disk: &Path) -> Result<BuildVm, RuntimeError> {
        let name = format!("build-{}", super::lifecycle::new_id()?);
        let config = &self.inner.config;
        let spec = SandboxSpec {
            memory_mb: Some(BUILD_MEMORY_MB.min(config.max_memory_mb)),
            cold_boot: true,
            ..SandboxSpec::named(&name)
        };
        let base = ResolvedImage {
            name: "build".to_owned(),
            path: disk.to_path_buf(),
        };
        self.create_inner(spec, Some(base)).await?;
        let agent = match self.agent(&name).await {
            Ok(agent) => agent,
            Err(error) => {
                let _ = self.destroy(&name).await;
                return Err(error);
            }
        };
        Ok(BuildVm { name, agent })
    }

    /// Runs one step in the build VM; the error is the user-facing reason.
    async fn run_step(
        &self,
        vm: &BuildVm,
        step: &Step,
        context: &BuildContext,
        progress: &dyn BuildProgress,
    ) -> Result<(), String> {
        let config = &step.config;
        match &step.instruction {
            Instruction::Run(command) => {
                let argv = command.argv();
                let code = run(vm, argv, config, progress).await?;
                if code != 0 {
                    return Err(format!("it exited with code {code}"));
                }
                Ok(())
            }
            Instruction::Workdir(dir) => vm
                .agent
                .mkdir(dir, true, None)
                .await
                .map_err(|e| crate::agent::error_chain(&e)),
            Instruction::Copy(copy) => copy_into(vm, copy, context, progress).await,
            _ => Ok(()),
        }
    }

    /// Shuts the build VM down, flattens its disk into the cache entry `key` and removes it.
    async fn flatten_build_vm(
        &self,
        vm: BuildVm,
        cache_dir: &Path,
        key: &str,
    ) -> Result<PathBuf, RuntimeError> {
        let result = async {
            self.stop(&vm.name).await?;
            let record = self.record(&vm.name)?;
            let source = self.disk_path(&record);
            let entry = cache_dir.join(key);
            let tmp = cache_dir.join(format!(".tmp-{key}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io("creating", &tmp))?;
            let out = tmp.join("rootfs.ext4");
            let output = tokio::process::Command::new(&self.inner.config.qemu_img_binary)
                .args(["convert", "-O", "raw"])
                .arg(&source)
                .arg(&out)
                .output()
                .await
                .map_err(io("running qemu-img convert on", &source))?;
            if !output.status.success() {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io("flattening", &source)(std::io::Error::other(
                    String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                )));
            }
            let _ = std::fs::remove_dir_all(&entry);
            std::fs::rename(&tmp, &entry).map_err(io("renaming into place", &entry))?;
            Ok(entry.join("rootfs.ext4"))
        }
        .await;
        if let Err(error) = self.destroy(&vm.name).await {
            tracing::warn!(error = %error.chain(), "removing a build sandbox failed");
        }
        result
    }
}

/// Runs `argv` in the build VM with the step's environment, directory and user, streaming
/// its output to `progress`; returns the exit code.
async fn run(
    vm: &BuildVm,
    argv: Vec<String>,
    config: &ConfigState,
    progress: &dyn BuildProgress,
) -> Result<i32, String> {
    let request = ExecRequest {
        command: Command::Argv(argv),
        env: config.run_env().into_iter().collect(),
        cwd: Some(config.workdir.clone()),
        user: config.user.clone(),
        timeout_ms: None,
        stdin: false,
        ..ExecRequest::default()
    };
    let mut session = vm
        .agent
        .exec_stream(request)
        .await
        .map_err(|e| crate::agent::error_chain(&e))?;
    loop {
        match session
            .next()
            .await
            .map_err(|e| crate::agent::error_chain(&e))?
        {
            ExecEvent::Stdout(data) | ExecEvent::Stderr(data) => progress.output(&data),
            ExecEvent::Exited(status) => {
                return Ok(match (status.code, status.signal) {
                    (Some(code), _) => code,
                    (None, Some(signal)) => 128 + signal,
                    (None, None) => -1,
                })
            }
        }
    }
}

/// COPY/ADD: a tar of the planned entries, made on the host, unpacked in the guest.
async fn copy_into(
    vm: &BuildVm,
    copy: &CopyInstruction,
    context: &BuildContext,
    progress: &dyn BuildProgress,
) -> Result<(), String> {
    let sources = context
        .resolve_sources(&copy.sources)
        .map_err(|e| e.to_string())?;
    let dest_is_dir = copy.dest_is_dir
        || vm
            .agent
            .stat(&copy.dest)
            .await
            .is_ok_and(|stat| stat.kind == arrakis_protocol::FileKind::Dir);
    let entries = context
        .plan_copy(&sources, &copy.dest, dest_is_dir, copy.kind)
        .map_err(|e| e.to_string())?;
    let owner = match &copy.chown {
        Some(spec) => Some(resolve_owner(vm, spec).await?),
        None => None,
    };
    let (plain, archives): (Vec<&CopyEntry>, Vec<&CopyEntry>) = entries
        .iter()
        .partition(|e| !matches!(e.kind, EntryKind::Archive(_)));
    let tar = tempfile::NamedTempFile::new().map_err(|e| format!("staging the copy: {e}"))?;
    write_tar(tar.as_file(), &plain, owner, copy.chmod)
        .map_err(|e| format!("packing the copy: {e}"))?;
    unpack_in_guest(vm, tar.path(), "/", progress).await?;
    for archive in archives {
        let dest = archive.dest.to_string_lossy().into_owned();
        vm.agent
            .mkdir(&dest, true, None)
            .await
            .map_err(|e| crate::agent::error_chain(&e))?;
        let plain = tempfile::NamedTempFile::new().map_err(|e| format!("staging {dest}: {e}"))?;
        decompress(&archive.host_path, plain.as_file())
            .map_err(|e| format!("reading {}: {e}", archive.host_path.display()))?;
        unpack_in_guest(vm, plain.path(), &dest, progress).await?;
    }
    Ok(())
}

/// Uploads a tar and unpacks it under `dest` with the image's own `tar`.
async fn unpack_in_guest(
    vm: &BuildVm,
    tar: &Path,
    dest: &str,
    progress: &dyn BuildProgress,
) -> Result<(), String> {
    let mut file = tokio::fs::File::open(tar)
        .await
        .map_err(|e| format!("opening the staged copy: {e}"))?;
    let options = crate::agent::WriteOptions {
        mode: Some(0o600),
        create_parents: true,
        append: false,
    };
    vm.agent
        .write_file(STAGED_TAR, &mut file, options)
        .await
        .map_err(|e| crate::agent::error_chain(&e))?;
    let root = ConfigState {
        workdir: "/".into(),
        user: None,
        ..ConfigState::from_base(&RunConfig::default())
    };
    let argv = ["tar", "-xpf", STAGED_TAR, "-C", dest]
        .map(str::to_owned)
        .to_vec();
    let outcome = run(vm, argv, &root, progress).await;
    let _ = vm.agent.remove(STAGED_TAR, false).await;
    match outcome {
        Ok(0) => Ok(()),
        Ok(code) => Err(format!(
            "unpacking in the guest failed (tar exited with {code})"
        )),
        Err(message) if message.contains("No such file") || message.contains("not found") => Err(
            "COPY and ADD need `tar` in the image (to unpack what they copy); \
             this image has none"
                .to_owned(),
        ),
        Err(message) => Err(message),
    }
}

/// `user[:group]` as numeric ids, names looked up in the guest's /etc/passwd and /etc/group.
async fn resolve_owner(vm: &BuildVm, spec: &str) -> Result<(u64, u64), String> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let passwd = read_guest(vm, "/etc/passwd").await;
    let groups = read_guest(vm, "/etc/group").await;
    let lookup = |table: &str, name: &str, field: usize| -> Option<u64> {
        table.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| fields.get(field)?.parse().ok())
                .flatten()
        })
    };
    let uid = match user.parse() {
        Ok(uid) => uid,
        Err(_) => lookup(&passwd, user, 2)
            .ok_or_else(|| format!("--chown: no user {user:?} in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => lookup(&passwd, user, 3).unwrap_or(uid),
        Some(group) => match group.parse() {
            Ok(gid) => gid,
            Err(_) => lookup(&groups, group, 2)
                .ok_or_else(|| format!("--chown: no group {group:?} in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

async fn read_guest(vm: &BuildVm, path: &str) -> String {
    let mut out = Vec::new();
    match vm.agent.read_file(path, &mut out).await {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => String::new(),
    }
}

/// Writes `entries` as a tar with paths relative to `/`, numeric ownership only.
fn write_tar(
    file: &std::fs::File,
    entries: &[&CopyEntry],
    owner: Option<(u64, u64)>,
    chmod: Option<u32>,
) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let (uid, gid) = owner.unwrap_or((0, 0));
    for entry in entries {
        let path = entry.dest.strip_prefix("/").unwrap_or(&entry.dest);
        if path.as_os_str().is_empty() {
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_uid(uid);
        header.set_gid(gid);
        header.set_mtime(0);
        header.set_mode(chmod.unwrap_or(entry.mode) & 0o7777);
        match &entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, path, std::io::empty())?;
            }
            EntryKind::File => {
                let data = std::fs::File::open(&entry.host_path)?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.metadata()?.len());
                builder.append_data(&mut header, path, data)?;
            }
            EntryKind::Symlink(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
            EntryKind::Archive(_) => {}
        }
    }
    builder.into_inner()?.flush()
}

/// Copies a (possibly gzip- or zstd-compressed) tar as a plain tar.
fn decompress(path: &Path, out: &std::fs::File) -> std::io::Result<()> {
    let mut input = std::io::BufReader::new(std::fs::File::open(path)?);
    let compression = arrakis_image::unpack::detect(std::io::BufRead::fill_buf(&mut input)?);
    let mut out = std::io::BufWriter::new(out);
    std::io::copy(&mut compression.decoder(input)?, &mut out)?;
    out.flush()
}

/// The next key of a chain: sha256 of the previous key and this link's input, in hex.
fn chain(previous: &str, input: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update([0]);
    hasher.update(input.as_bytes());
    arrakis_image::oci::Digest::from_sha256(hasher)
        .hex()
        .to_owned()
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_every_input() {
        let a = chain("base", "RUN x");
        assert_eq!(a, chain("base", "RUN x"));
        assert_ne!(a, chain("base", "RUN y"));
        assert_ne!(a, chain("other", "RUN x"));
        assert_ne!(chain(&a, "RUN z"), chain(&chain("base", "RUN y"), "RUN z"));
        assert_eq!(a.len(), 64);
    }
}
