//! Command-line grammar.
//!
//! Every verb runs either in-process on this machine's sandboxes (the
//! default) or against an arrakis server (`--server URL`). The verbs of the
//! original Go `arrakis-client` are here with its flags (`start -n NAME`,
//! `run -n NAME -c CMD`, `upload -n NAME -f SRC -f DST`, ...); where a verb
//! also takes the sandbox name as a word (`start NAME`), both forms work.

use std::path::PathBuf;

use arrakis_runtime::network::{EgressPolicy, ForwardRequest};
use arrakis_runtime::{ForkSource, MAX_FORKS};
use clap::{Args as ClapArgs, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "arrakis", version, about = "MicroVM sandboxes for AI agents")]
pub struct Args {
    /// State directory (database and per-sandbox files) of the sandboxes
    /// run in this process; not used with --server.
    #[arg(
        long,
        global = true,
        env = "ARRAKIS_STATE_DIR",
        help_heading = "Global options"
    )]
    pub state_dir: Option<PathBuf>,
    /// Talk to the arrakis server at this URL (e.g. http://127.0.0.1:7000)
    /// instead of running sandboxes in this process.
    #[arg(
        long,
        global = true,
        env = "ARRAKIS_SERVER",
        value_name = "URL",
        help_heading = "Global options"
    )]
    pub server: Option<String>,
    /// API token for --server, sent as `Authorization: Bearer TOKEN`.
    #[arg(
        long,
        global = true,
        env = "ARRAKIS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        help_heading = "Global options"
    )]
    pub token: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Verb,
}

#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create and boot a sandbox; returns once it can run commands.
    Create(CreateArgs),
    /// Create a sandbox and run one command in it (with --rm, destroy it
    /// afterwards); with -n NAME -c CMD, run CMD in the existing sandbox.
    Run(RunArgs),
    /// Run a command in a running sandbox; exits with the command's status.
    Exec(ExecArgs),
    /// Copy files and directories: `arrakis cp LOCAL NAME:PATH` or
    /// `arrakis cp NAME:PATH LOCAL`.
    Cp(CpArgs),
    /// Upload local files: `-f SRC -f DST` (or `-f SRC,DST`), repeatable.
    Upload(UploadArgs),
    /// Download sandbox files into the current directory.
    Download(DownloadArgs),
    /// File operations inside a sandbox.
    #[command(subcommand)]
    Fs(FsVerb),
    /// List sandboxes (or show one with -n NAME).
    List(ListArgs),
    /// List all sandboxes.
    ListAll,
    /// Show one sandbox.
    #[command(visible_alias = "info")]
    Get(NameArg),
    /// Start a sandbox: create it if it does not exist, boot it again if it
    /// is stopped; with -s ID, restore a snapshot under this name.
    Start(StartArgs),
    /// Shut a sandbox's guest down; its disk is kept.
    Stop(NameArg),
    /// Freeze a sandbox's vCPUs.
    Pause(NameArg),
    /// Unfreeze a paused sandbox.
    Resume(NameArg),
    /// Remove a sandbox and everything it owns.
    Destroy(NameArg),
    /// Remove every sandbox.
    DestroyAll,
    /// Snapshot a sandbox's memory and disk.
    Snapshot(SnapshotArgs),
    /// Restore a snapshot as a new sandbox.
    Restore(RestoreArgs),
    /// Start new sandboxes from a snapshot, or from a running sandbox.
    #[command(long_about = FORK_ABOUT)]
    Fork(ForkArgs),
    /// Put a sandbox back in a snapshot's state, keeping its name.
    #[command(long_about = ROLLBACK_ABOUT)]
    Rollback(RollbackArgs),
    /// List, show and delete snapshots; show their lineage (`tree`).
    Snapshots(SnapshotsArgs),
    /// List, add and remove a sandbox's port forwards.
    #[command(subcommand, long_about = PORT_ABOUT)]
    Port(PortVerb),
    /// Show or change where a sandbox may connect to.
    #[command(long_about = EGRESS_ABOUT)]
    Egress(EgressArgs),
    /// Pull, import, list and remove images (this machine's image store).
    #[command(subcommand, long_about = IMAGE_ABOUT)]
    Image(ImageVerb),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Run the sandbox daemon with its HTTP API (py-arrakis compatible).
    Serve(ServeArgs),
}

#[derive(Debug, ClapArgs)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:7000, or the config file's);
    /// port 0 picks a free port. Off loopback, an API token is required
    /// unless --allow-unauthenticated.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// TOML configuration file with [server] and [runtime] sections.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// File whose first line is the API token clients must send as
    /// `Authorization: Bearer`. Also from ARRAKIS_API_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address without a token.
    #[arg(long)]
    pub allow_unauthenticated: bool,
}

/// A sandbox name, as a word (`stop NAME`) or as the original client's
/// flag (`stop -n NAME`).
#[derive(Debug, Clone, ClapArgs)]
#[group(required = true, multiple = false)]
pub struct NameArg {
    /// The sandbox.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// The sandbox (the same as NAME).
    #[arg(short = 'n', long = "name", value_name = "NAME")]
    name_flag: Option<String>,
}

impl NameArg {
    pub fn get(&self) -> &str {
        self.name
            .as_deref()
            .or(self.name_flag.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Default, ClapArgs)]
pub struct SizeArgs {
    /// Virtual CPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long = "memory")]
    pub memory_mb: Option<u32>,
    /// Base image: a local image name (`default`) or an image in the store
    /// (`busybox`, `localhost:5000/app:1`, an id); see `arrakis image ls`.
    #[arg(long)]
    pub image: Option<String>,
    /// Boot the guest even when a golden snapshot of this image and shape
    /// could warm-start it.
    #[arg(long)]
    pub cold_boot: bool,
}

impl SizeArgs {
    pub fn is_set(&self) -> bool {
        self.vcpus.is_some() || self.memory_mb.is_some() || self.image.is_some() || self.cold_boot
    }
}

/// The network of a sandbox created by this call.
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct NetArgs {
    /// Forward a host port to a guest port (repeatable):
    /// `[HOST:]GUEST[=DESCRIPTION]`, e.g. `-p 8080:80=web` or `-p 22`.
    /// Without HOST, or with 0, a free host port is picked.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = PUBLISH_FORM,
        value_parser = parse_publish
    )]
    pub publish: Vec<ForwardRequest>,
    /// Where the sandbox may open connections to: `allow`, `deny`, or
    /// `CIDR[,CIDR...]` (e.g. `10.0.0.0/8,192.168.1.0/24`; bridge mode
    /// only). Default: the runtime's configured policy.
    #[arg(long, value_name = "POLICY", value_parser = EgressPolicy::parse_list)]
    pub egress: Option<EgressPolicy>,
}

impl NetArgs {
    pub fn is_set(&self) -> bool {
        !self.publish.is_empty() || self.egress.is_some()
    }
}

#[derive(Debug, ClapArgs)]
pub struct CreateArgs {
    pub name: String,
    #[command(flatten)]
    pub size: SizeArgs,
    #[command(flatten)]
    pub net: NetArgs,
    /// Environment of every command run in the sandbox, KEY=VALUE
    /// (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct StartArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Restore this snapshot under NAME instead.
    #[arg(short = 's', long = "snapshot", value_name = "ID")]
    pub snapshot: Option<String>,
    /// Not supported: sandboxes boot the configured kernel.
    #[arg(short = 'k', long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// Not supported: sandboxes boot the configured root file system.
    #[arg(short = 'r', long, value_name = "PATH")]
    pub rootfs: Option<String>,
    /// Not supported: the guest agent is PID 1.
    #[arg(short = 'e', long = "entry-point", value_name = "PATH")]
    pub entry_point: Option<String>,
    /// Sizes of a sandbox created by this call.
    #[command(flatten)]
    pub size: SizeArgs,
    /// Network of a sandbox created by this call (a stopped one that is
    /// booted again keeps its own; change it with `port` and `egress`).
    #[command(flatten)]
    pub net: NetArgs,
}

/// How a command runs (shared by exec and run).
#[derive(Debug, Clone, Default, ClapArgs)]
pub struct CommandArgs {
    /// Environment variable for the command, KEY=VALUE (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory inside the guest.
    #[arg(short = 'w', long)]
    pub cwd: Option<String>,
    /// User name or uid to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill the command's process tree after this many seconds.
    #[arg(short, long, value_name = "SECONDS")]
    pub timeout: Option<f64>,
    /// Pass this process's stdin to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Run the words as one shell command line (`bash -c`).
    #[arg(long)]
    pub shell: bool,
}

#[derive(Debug, ClapArgs)]
pub struct ExecArgs {
    pub name: String,
    #[command(flatten)]
    pub options: CommandArgs,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// Sandbox name (default: a generated one); with -c, the existing
    /// sandbox to run in.
    #[arg(short = 'n', long)]
    pub name: Option<String>,
    /// Run this shell command line in the existing sandbox -n NAME and
    /// print its output (stdout and stderr together), as the original
    /// client did.
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "CMD",
        requires = "name",
        conflicts_with_all = [
            "rm", "command", "shell", "vcpus", "memory_mb", "image", "publish", "egress"
        ]
    )]
    pub cmd: Option<String>,
    /// Destroy the sandbox when the command ends.
    #[arg(long)]
    pub rm: bool,
    #[command(flatten)]
    pub size: SizeArgs,
    #[command(flatten)]
    pub net: NetArgs,
    #[command(flatten)]
    pub options: CommandArgs,
    /// The command and its arguments.
    #[arg(
        required_unless_present = "cmd",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct CpArgs {
    pub source: String,
    pub destination: String,
    /// Permission bits of an uploaded file, in octal.
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

#[derive(Debug, ClapArgs)]
pub struct UploadArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Alternately a local source and its sandbox destination:
    /// `-f SRC -f DST` or `-f SRC,DST` (repeatable).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "PATH",
        required = true,
        value_delimiter = ','
    )]
    pub files: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct DownloadArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// A sandbox path to download (repeatable, or comma separated). A
    /// relative path lands at the same relative path here; an absolute one
    /// under its file name in the current directory.
    #[arg(
        short = 'p',
        long = "path",
        value_name = "PATH",
        required = true,
        value_delimiter = ','
    )]
    pub paths: Vec<String>,
}

#[derive(Debug, ClapArgs)]
pub struct ListArgs {
    /// Show only this sandbox.
    #[arg(value_name = "NAME")]
    name: Option<String>,
    /// Show only this sandbox (the same as NAME).
    #[arg(
        short = 'n',
        long = "name",
        value_name = "NAME",
        conflicts_with = "name"
    )]
    name_flag: Option<String>,
}

impl ListArgs {
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref().or(self.name_flag.as_deref())
    }
}

#[derive(Debug, ClapArgs)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Snapshot id (default: generated by the server).
    #[arg(short = 'i', long = "id", value_name = "ID")]
    pub id: Option<String>,
}

#[derive(Debug, ClapArgs)]
pub struct RestoreArgs {
    /// Name of the restored sandbox.
    #[command(flatten)]
    pub name: NameArg,
    /// The snapshot to restore.
    #[arg(short = 'i', long = "id", value_name = "ID", required = true)]
    pub id: String,
}

const FORK_ABOUT: &str = "\
Start new sandboxes from a snapshot, or from a running sandbox.

Each fork is its own machine (hostname, machine id, clock, entropy) whose
processes, memory and disk continue from the snapshot. The forks are named
PREFIX-1 to PREFIX-N; it is all or nothing: if one cannot be made, none is
left. Forking a running or paused sandbox (--sandbox) snapshots it first and
deletes that snapshot afterwards.

Examples:
  arrakis fork base -c 3                 # base-fork-1 .. base-fork-3
  arrakis fork -i base --prefix worker   # worker-1
  arrakis fork --sandbox dev -c 2        # dev-fork-1, dev-fork-2";

/// What `fork` starts from: a snapshot id (as a word or `-i`), or a
/// sandbox (`--sandbox`/`-n`); exactly one.
#[derive(Debug, ClapArgs)]
#[group(id = "fork_source", required = true, multiple = false)]
pub struct ForkSourceArgs {
    /// The snapshot to fork.
    #[arg(value_name = "SNAPSHOT_ID")]
    snapshot: Option<String>,
    /// The snapshot to fork (the same as SNAPSHOT_ID).
    #[arg(
        short = 'i',
        long = "snapshot",
        visible_alias = "id",
        value_name = "ID"
    )]
    snapshot_flag: Option<String>,
    /// Fork this running or paused sandbox instead of a snapshot.
    #[arg(
        short = 'n',
        long = "sandbox",
        visible_alias = "name",
        value_name = "NAME"
    )]
    sandbox: Option<String>,
}

impl ForkSourceArgs {
    pub fn get(&self) -> ForkSource {
        match (
            &self.sandbox,
            self.snapshot.as_ref().or(self.snapshot_flag.as_ref()),
        ) {
            (Some(name), _) => ForkSource::Sandbox(name.clone()),
            (None, id) => ForkSource::Snapshot(id.cloned().unwrap_or_default()),
        }
    }
}

#[derive(Debug, ClapArgs)]
pub struct ForkArgs {
    #[command(flatten)]
    pub source: ForkSourceArgs,
    /// How many sandboxes to start (1 to 64).
    #[arg(
        short = 'c',
        long = "count",
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_FORKS))
    )]
    pub count: u32,
    /// Name the forks PREFIX-1 to PREFIX-N (default: the snapshot id or
    /// the sandbox name, plus "-fork").
    #[arg(short = 'p', long = "prefix", value_name = "PREFIX")]
    pub prefix: Option<String>,
}

const ROLLBACK_ABOUT: &str = "\
Put a sandbox back in a snapshot's state, keeping its name.

Its memory, devices and disk are replaced by the snapshot's (which can be of
any sandbox with the same vCPUs, memory and image): what ran since is gone.
The sandbox can be running, paused, stopped or crashed; it runs afterwards.

Examples:
  arrakis rollback dev before
  arrakis rollback -n dev -i before";

#[derive(Debug, ClapArgs)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub snapshot: SnapshotIdArg,
}

/// A snapshot id, as a word after the sandbox name or as `-i ID`.
#[derive(Debug, Clone, ClapArgs)]
#[group(id = "snapshot_id", required = true, multiple = false)]
pub struct SnapshotIdArg {
    /// The snapshot whose state replaces the sandbox's.
    #[arg(value_name = "SNAPSHOT_ID")]
    id: Option<String>,
    /// The snapshot (the same as SNAPSHOT_ID).
    #[arg(
        short = 'i',
        long = "id",
        visible_alias = "snapshot",
        value_name = "ID"
    )]
    id_flag: Option<String>,
}

impl SnapshotIdArg {
    pub fn get(&self) -> &str {
        self.id
            .as_deref()
            .or(self.id_flag.as_deref())
            .unwrap_or_default()
    }
}

#[derive(Debug, ClapArgs)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SnapshotsArgs {
    #[command(subcommand)]
    pub action: Option<SnapshotsVerb>,
    /// Only the snapshots of this sandbox.
    #[arg(long = "vm", value_name = "NAME")]
    pub vm: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotsVerb {
    /// List snapshots (the default).
    #[command(visible_alias = "ls")]
    List {
        /// Only the snapshots of this sandbox.
        #[arg(long = "vm", value_name = "NAME")]
        vm: Option<String>,
    },
    /// Show one snapshot.
    Get { id: String },
    /// Delete a snapshot.
    #[command(visible_alias = "delete")]
    Rm { id: String },
    /// Write a snapshot into an existing empty directory as a checkpoint
    /// that stands alone: device state, the RAM without its holes, and the
    /// whole disk (base image included) in one qcow2. Copy the directory
    /// anywhere (a plain tar is fine) and `snapshots import` it. Runs on this
    /// machine's state (not with --server).
    Export {
        /// The snapshot to export.
        id: String,
        /// An existing empty directory.
        dir: PathBuf,
    },
    /// Import a checkpoint directory written by `snapshots export` (checked
    /// file by file: it may come from anywhere) as a new snapshot with a
    /// new id, which `restore` restores. Runs on this machine's state (not
    /// with --server).
    Import {
        /// The checkpoint directory.
        dir: PathBuf,
    },
    /// Show the lineage of snapshots and sandboxes as a tree.
    ///
    /// Each snapshot is shown under the snapshot its sandbox came from,
    /// with the sandbox it was taken of; below it, the sandboxes restored,
    /// forked or rolled back from it. Snapshots whose parent was deleted,
    /// and sandboxes whose snapshot was, are shown at the top, marked.
    /// With --json, the same as nested objects.
    Tree,
}

#[derive(Debug, Subcommand)]
pub enum FsVerb {
    /// List a directory.
    Ls { name: String, path: String },
    /// Describe a path.
    Stat { name: String, path: String },
    /// Create a directory.
    Mkdir {
        name: String,
        path: String,
        /// Create missing parents too.
        #[arg(short, long)]
        parents: bool,
    },
    /// Remove a path.
    Rm {
        name: String,
        path: String,
        /// Remove directories and their contents.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Change permission bits (octal, e.g. 755).
    Chmod {
        name: String,
        #[arg(value_parser = parse_mode)]
        mode: u32,
        path: String,
    },
}

const PORT_ABOUT: &str = "\
List, add and remove a sandbox's port forwards.

A forward makes a guest port reachable on a host port. It works in any state:
a stopped sandbox gets its forwards when it boots again.

Examples:
  arrakis port ls dev
  arrakis port add dev -p 8080:80=web -p 22   # 22 on a free host port
  arrakis port rm dev 8080";

#[derive(Debug, Subcommand)]
pub enum PortVerb {
    /// List the forwards: host port, guest port, description.
    #[command(visible_alias = "list")]
    Ls { name: String },
    /// Add forwards (all or nothing); prints them with their host ports.
    Add {
        name: String,
        /// A forward, `[HOST:]GUEST[=DESCRIPTION]` (repeatable); without
        /// HOST, or with 0, a free host port is picked.
        #[arg(
            short = 'p',
            long = "publish",
            value_name = PUBLISH_FORM,
            value_parser = parse_publish,
            required = true
        )]
        publish: Vec<ForwardRequest>,
    },
    /// Remove the forwards on these host ports.
    #[command(visible_alias = "remove")]
    Rm {
        name: String,
        #[arg(value_name = "HOST_PORT", required = true)]
        host_ports: Vec<u16>,
    },
}

const IMAGE_ABOUT: &str = "\
Pull, import, list and remove the images sandboxes boot from.

Any OCI image works: it is converted once to an ext4 disk, cached by its
manifest digest and shared read-only by every sandbox started from it
(`arrakis start -n NAME --image REF`). Commands in such a sandbox run with
the image's ENV, WORKDIR and USER unless told otherwise. These commands act
on this machine's image store (under ARRAKIS_HOME), also with --server.

Examples:
  arrakis image pull python:3.12-slim
  arrakis image pull --insecure localhost:5000/team/app:1
  arrakis image import busybox.tar            # docker save, ctr export, OCI layout
  arrakis image build -t myimage .            # ./Dockerfile, RUN steps in microVMs
  arrakis image ls
  arrakis image rm python:3.12-slim";

#[derive(Debug, Subcommand)]
pub enum ImageVerb {
    /// Download an image from a registry and convert it.
    Pull(PullArgs),
    /// Import images from an OCI layout (directory or tar) or a `docker save` tar.
    Import {
        /// The archive or layout directory.
        path: PathBuf,
        /// Name the (single) imported image REF instead of the names in the archive.
        #[arg(short, long, value_name = "REF")]
        tag: Option<String>,
        /// PATH is a plain root file system tarball (like `docker import`), which
        /// becomes a one-layer image named by --tag.
        #[arg(long, requires = "tag")]
        rootfs: bool,
    },
    /// Build an image from a Dockerfile; every RUN step runs in a microVM, and each
    /// step's result is cached by its inputs.
    Build(BuildArgs),
    /// Write an image as an OCI image layout: a directory, or a tar of one when PATH ends
    /// in .tar (what `image import`, `ctr import` and skopeo read). A built image's disk
    /// becomes one layer.
    Export {
        /// The image: a reference, digest or id.
        #[arg(value_name = "REF")]
        image: String,
        /// A new or empty directory, or a new file ending in .tar.
        path: PathBuf,
    },
    /// List the images in the store.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove images; refused while a sandbox or snapshot uses one unless --force
    /// (which only removes the name and keeps the disk for them).
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(value_name = "REF", required = true)]
        images: Vec<String>,
        #[arg(short, long)]
        force: bool,
    },
    /// Remove untagged images nothing uses, unreferenced blobs and interrupted downloads.
    Gc {
        /// Also remove the cached steps of image builds (the next build runs every step).
        #[arg(long)]
        build_cache: bool,
    },
}

#[derive(Debug, ClapArgs)]
pub struct BuildArgs {
    /// The build context: the directory COPY and ADD read from.
    #[arg(value_name = "CONTEXT")]
    pub context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(short, long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// The reference to tag the result with.
    #[arg(short, long, value_name = "REF")]
    pub tag: String,
    /// A build argument, KEY=VALUE (repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// Run every step, ignoring cached results.
    #[arg(long)]
    pub no_cache: bool,
}

#[derive(Debug, ClapArgs)]
pub struct PullArgs {
    /// `[REGISTRY/]NAME[:TAG][@DIGEST]`; Docker Hub when no registry is named.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Talk plain HTTP to the registry (e.g. one on localhost).
    #[arg(long)]
    pub insecure: bool,
    /// User name for the registry; the password is read from stdin
    /// (or ARRAKIS_REGISTRY_PASSWORD). Without it, credentials from
    /// ~/.docker/config.json are used when present, else none.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Layer downloads at once.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub parallel: u16,
}

const EGRESS_ABOUT: &str = "\
Show or change where a sandbox may open connections to.

POLICY is `allow` (anywhere but the host and other sandboxes), `deny`
(nowhere) or a comma-separated list of IPv4 CIDRs to allow. Without POLICY,
the current one is shown. In bridge mode, connections opened from now on
follow the new policy; a sandbox in user-mode networking (no root) keeps the
one it was created with, which can only be allow or deny.

Examples:
  arrakis egress dev
  arrakis egress dev deny
  arrakis egress dev 10.0.0.0/8,192.168.1.0/24";

#[derive(Debug, ClapArgs)]
pub struct EgressArgs {
    pub name: String,
    /// `allow`, `deny` or `CIDR[,CIDR...]`.
    #[arg(value_name = "POLICY", value_parser = EgressPolicy::parse_list)]
    pub policy: Option<EgressPolicy>,
}

/// How `-p/--publish` is written.
const PUBLISH_FORM: &str = "[HOST:]GUEST[=DESCRIPTION]";

/// `[HOST:]GUEST[=DESCRIPTION]`: the description is everything after the
/// first `=`; a HOST of 0 (or none) leaves the pick to the runtime.
pub fn parse_publish(text: &str) -> Result<ForwardRequest, String> {
    let bad = |why: String| format!("{why}; expected {PUBLISH_FORM}, e.g. 8080:80=web or 22");
    let (ports, description) = text.split_once('=').unwrap_or((text, ""));
    let (host, guest) = match ports.split_once(':') {
        Some((host, guest)) => {
            let host = host
                .parse::<u16>()
                .map_err(|_| bad(format!("HOST {host:?} is not a port (0 to 65535)")))?;
            ((host != 0).then_some(host), guest)
        }
        None => (None, ports),
    };
    let guest_port = guest
        .parse::<u16>()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| bad(format!("GUEST {guest:?} is not a port (1 to 65535)")))?;
    Ok(ForwardRequest {
        host_port: host,
        guest_port,
        description: description.to_string(),
    })
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not an octal permission mode (0 to 7777)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Args {
        let mut argv = vec!["arrakis"];
        argv.extend_from_slice(words);
        Args::try_parse_from(argv).unwrap_or_else(|e| panic!("{words:?}: {e}"))
    }

    fn refused(words: &[&str]) -> String {
        let mut argv = vec!["arrakis"];
        argv.extend_from_slice(words);
        match Args::try_parse_from(argv) {
            Ok(args) => panic!("{words:?} parsed: {args:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn grammar_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn exec_keeps_hyphenated_command_words() {
        let args = parse(&["exec", "box", "--", "ls", "-la", "/"]);
        let Verb::Exec(exec) = args.command else {
            panic!("not exec")
        };
        assert_eq!(exec.name, "box");
        assert_eq!(exec.command, ["ls", "-la", "/"]);
    }

    #[test]
    fn modes_are_octal_and_bounded() {
        assert_eq!(parse_mode("755"), Ok(0o755));
        assert!(parse_mode("8").is_err());
        assert!(parse_mode("17777").is_err());
    }

    /// `VERB NAME` and `VERB -n NAME` (and `--name NAME`) name the same
    /// sandbox; giving both or neither is refused.
    #[test]
    fn name_verbs_take_a_word_or_the_flag() {
        fn name_of(args: Args) -> String {
            match args.command {
                Verb::Get(n)
                | Verb::Stop(n)
                | Verb::Pause(n)
                | Verb::Resume(n)
                | Verb::Destroy(n) => n.get().to_string(),
                Verb::Start(start) => start.name.get().to_string(),
                Verb::Snapshot(s) => s.name.get().to_string(),
                other => panic!("unexpected {other:?}"),
            }
        }
        for verb in [
            "get", "info", "stop", "pause", "resume", "destroy", "start", "snapshot",
        ] {
            assert_eq!(name_of(parse(&[verb, "my box"])), "my box", "{verb}");
            assert_eq!(name_of(parse(&[verb, "-n", "my box"])), "my box", "{verb}");
            assert_eq!(name_of(parse(&[verb, "--name", "é"])), "é", "{verb}");
            refused(&[verb]);
            refused(&[verb, "a", "-n", "b"]);
        }
    }

    #[test]
    fn original_start_flags() {
        let Verb::Start(start) = parse(&["start", "-n", "a", "-s", "snap-1"]).command else {
            panic!()
        };
        assert_eq!(start.name.get(), "a");
        assert_eq!(start.snapshot.as_deref(), Some("snap-1"));
        let Verb::Start(start) = parse(&[
            "start",
            "-n",
            "a",
            "-k",
            "/k",
            "-r",
            "/r",
            "-e",
            "/sbin/init",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(start.kernel.as_deref(), Some("/k"));
        assert_eq!(start.rootfs.as_deref(), Some("/r"));
        assert_eq!(start.entry_point.as_deref(), Some("/sbin/init"));
        let Verb::Start(start) = parse(&["start", "b", "--vcpus", "2", "--memory", "512"]).command
        else {
            panic!()
        };
        assert_eq!(start.size.vcpus, Some(2));
        assert_eq!(start.size.memory_mb, Some(512));
    }

    #[test]
    fn original_list_destroy_all_snapshot_restore() {
        assert!(matches!(parse(&["list-all"]).command, Verb::ListAll));
        assert!(matches!(parse(&["destroy-all"]).command, Verb::DestroyAll));
        let Verb::List(list) = parse(&["list", "-n", "a"]).command else {
            panic!()
        };
        assert_eq!(list.name(), Some("a"));
        let Verb::List(list) = parse(&["list", "a"]).command else {
            panic!()
        };
        assert_eq!(list.name(), Some("a"));
        let Verb::List(list) = parse(&["list"]).command else {
            panic!()
        };
        assert_eq!(list.name(), None);

        let Verb::Snapshot(snap) = parse(&["snapshot", "-n", "a", "-i", "s1"]).command else {
            panic!()
        };
        assert_eq!((snap.name.get(), snap.id.as_deref()), ("a", Some("s1")));
        let Verb::Snapshot(snap) = parse(&["snapshot", "-n", "a"]).command else {
            panic!()
        };
        assert_eq!(snap.id, None);

        let Verb::Restore(restore) = parse(&["restore", "-n", "b", "-i", "s1"]).command else {
            panic!()
        };
        assert_eq!((restore.name.get(), restore.id.as_str()), ("b", "s1"));
        let Verb::Restore(restore) = parse(&["restore", "b", "--id", "s1"]).command else {
            panic!()
        };
        assert_eq!(restore.name.get(), "b");
        refused(&["restore", "-n", "b"]);
    }

    #[test]
    fn run_has_both_meanings() {
        // The original: a command line in an existing sandbox.
        let Verb::Run(run) = parse(&["run", "-n", "a", "-c", "echo hi; exit 3"]).command else {
            panic!()
        };
        assert_eq!(run.name.as_deref(), Some("a"));
        assert_eq!(run.cmd.as_deref(), Some("echo hi; exit 3"));
        assert!(run.command.is_empty());
        let Verb::Run(run) = parse(&["run", "--name", "a", "--cmd", "true"]).command else {
            panic!()
        };
        assert_eq!(run.cmd.as_deref(), Some("true"));
        // Today's: create a sandbox and run the words.
        let Verb::Run(run) = parse(&["run", "--rm", "--", "uname", "-a"]).command else {
            panic!()
        };
        assert!(run.rm && run.cmd.is_none());
        assert_eq!(run.command, ["uname", "-a"]);
        let Verb::Run(run) = parse(&["run", "-n", "x", "--memory", "256", "true"]).command else {
            panic!()
        };
        assert_eq!(run.name.as_deref(), Some("x"));
        assert_eq!(run.size.memory_mb, Some(256));
        // -c needs -n and excludes what only a new sandbox has.
        refused(&["run", "-c", "true"]);
        refused(&["run", "-n", "a", "-c", "true", "--rm"]);
        refused(&["run", "-n", "a", "-c", "true", "--", "ls"]);
        refused(&["run", "-n", "a", "-c", "true", "--vcpus", "2"]);
        refused(&["run", "--rm"]);
    }

    #[test]
    fn upload_and_download_take_repeated_or_comma_lists() {
        let Verb::Upload(up) =
            parse(&["upload", "-n", "a", "-f", "x.txt", "-f", "/tmp/x.txt"]).command
        else {
            panic!()
        };
        assert_eq!(up.name.get(), "a");
        assert_eq!(up.files, ["x.txt", "/tmp/x.txt"]);
        let Verb::Upload(up) = parse(&["upload", "a", "-f", "x,/tmp/x", "-f", "y,/tmp/y"]).command
        else {
            panic!()
        };
        assert_eq!(up.files, ["x", "/tmp/x", "y", "/tmp/y"]);
        refused(&["upload", "-n", "a"]);

        let Verb::Download(down) = parse(&["download", "-n", "a", "-p", "/etc/hostname"]).command
        else {
            panic!()
        };
        assert_eq!(down.name.get(), "a");
        assert_eq!(down.paths, ["/etc/hostname"]);
        let Verb::Download(down) = parse(&["download", "a", "-p", "x,y", "--path", "z"]).command
        else {
            panic!()
        };
        assert_eq!(down.paths, ["x", "y", "z"]);
        refused(&["download", "-n", "a"]);
    }

    #[test]
    fn snapshots_and_completions() {
        let Verb::Snapshots(s) = parse(&["snapshots"]).command else {
            panic!()
        };
        assert!(s.action.is_none() && s.vm.is_none());
        let Verb::Snapshots(s) = parse(&["snapshots", "--vm", "a"]).command else {
            panic!()
        };
        assert_eq!(s.vm.as_deref(), Some("a"));
        let Verb::Snapshots(s) = parse(&["snapshots", "get", "s1"]).command else {
            panic!()
        };
        assert!(matches!(s.action, Some(SnapshotsVerb::Get { id }) if id == "s1"));
        let Verb::Snapshots(s) = parse(&["snapshots", "rm", "s1"]).command else {
            panic!()
        };
        assert!(matches!(s.action, Some(SnapshotsVerb::Rm { id }) if id == "s1"));
        for shell in ["bash", "zsh", "fish"] {
            assert!(matches!(
                parse(&["completions", shell]).command,
                Verb::Completions { .. }
            ));
        }
        refused(&["completions", "cmd.exe"]);
    }

    #[test]
    fn fork_takes_a_snapshot_or_a_sandbox_and_a_bounded_count() {
        let fork = |words: &[&str]| {
            let mut argv = vec!["fork"];
            argv.extend_from_slice(words);
            let Verb::Fork(fork) = parse(&argv).command else {
                panic!("not fork")
            };
            (fork.source.get(), fork.count, fork.prefix)
        };
        let snapshot = |id: &str| ForkSource::Snapshot(id.into());
        assert_eq!(fork(&["s1"]), (snapshot("s1"), 1, None));
        assert_eq!(fork(&["-i", "s1", "-c", "3"]), (snapshot("s1"), 3, None));
        assert_eq!(
            fork(&["--snapshot", "s1", "--count", "64", "--prefix", "w"]),
            (snapshot("s1"), 64, Some("w".into()))
        );
        assert_eq!(fork(&["--id", "s1", "-p", "w"]).2.as_deref(), Some("w"));
        assert_eq!(
            fork(&["--sandbox", "dev", "-c", "2"]),
            (ForkSource::Sandbox("dev".into()), 2, None)
        );
        assert_eq!(fork(&["-n", "dev"]).0, ForkSource::Sandbox("dev".into()));
        refused(&["fork"]);
        refused(&["fork", "s1", "--sandbox", "dev"]);
        refused(&["fork", "s1", "-i", "s2"]);
        for bad in ["0", "65", "-1", "many"] {
            let error = refused(&["fork", "s1", "-c", bad]);
            assert!(error.contains("--count"), "{bad}: {error}");
        }
        assert!(refused(&["fork", "s1", "-c", "65"]).contains("1..=64"));
    }

    #[test]
    fn rollback_takes_words_or_the_original_flags() {
        let rollback = |words: &[&str]| {
            let mut argv = vec!["rollback"];
            argv.extend_from_slice(words);
            let Verb::Rollback(rollback) = parse(&argv).command else {
                panic!("not rollback")
            };
            (
                rollback.name.get().to_string(),
                rollback.snapshot.get().to_string(),
            )
        };
        let expected = ("my box".to_string(), "s 1".to_string());
        assert_eq!(rollback(&["my box", "s 1"]), expected);
        assert_eq!(rollback(&["-n", "my box", "-i", "s 1"]), expected);
        assert_eq!(rollback(&["--name", "my box", "--id", "s 1"]), expected);
        assert_eq!(rollback(&["my box", "--snapshot", "s 1"]), expected);
        refused(&["rollback", "a"]);
        refused(&["rollback", "-n", "a"]);
        refused(&["rollback", "a", "s1", "-i", "s2"]);
        refused(&["rollback", "a", "-n", "b", "-i", "s1"]);
    }

    #[test]
    fn snapshots_tree() {
        let Verb::Snapshots(s) = parse(&["snapshots", "tree", "--json"]).command else {
            panic!()
        };
        assert!(matches!(s.action, Some(SnapshotsVerb::Tree)));
    }

    #[test]
    fn publish_specs() {
        let forward = |host: Option<u16>, guest: u16, description: &str| ForwardRequest {
            host_port: host,
            guest_port: guest,
            description: description.into(),
        };
        assert_eq!(parse_publish("22"), Ok(forward(None, 22, "")));
        assert_eq!(parse_publish("0:22"), Ok(forward(None, 22, "")));
        assert_eq!(
            parse_publish("8080:80=web"),
            Ok(forward(Some(8080), 80, "web"))
        );
        assert_eq!(
            parse_publish("65535:1=a=b:c d"),
            Ok(forward(Some(65535), 1, "a=b:c d"))
        );
        assert_eq!(parse_publish("80="), Ok(forward(None, 80, "")));
        for (bad, named) in [
            ("", "GUEST \"\""),
            ("0", "GUEST \"0\""),
            ("65536", "GUEST \"65536\""),
            ("web", "GUEST \"web\""),
            ("8080:", "GUEST \"\""),
            ("1:2:3", "GUEST \"2:3\""),
            (":80", "HOST \"\""),
            ("-1:80", "HOST \"-1\""),
            ("70000:80", "HOST \"70000\""),
            ("=web", "GUEST \"\""),
        ] {
            let error = parse_publish(bad).unwrap_err();
            assert!(
                error.contains(named) && error.contains("expected [HOST:]GUEST[=DESCRIPTION]"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn egress_policies() {
        let net = |text: &str| text.parse::<arrakis_runtime::network::Ipv4Net>().unwrap();
        assert_eq!(
            EgressPolicy::parse_list("allow"),
            Ok(EgressPolicy::AllowAll)
        );
        assert_eq!(EgressPolicy::parse_list("deny"), Ok(EgressPolicy::DenyAll));
        assert_eq!(
            EgressPolicy::parse_list("10.1.2.3/8, 192.168.1.0/24,1.1.1.1"),
            Ok(EgressPolicy::AllowList(vec![
                net("10.0.0.0/8"),
                net("192.168.1.0/24"),
                net("1.1.1.1/32"),
            ]))
        );
        for (bad, named) in [
            ("", "\"\""),
            ("Allow", "\"Allow\""),
            ("10.0.0.0/8,", "\"\""),
            ("10.0.0.0/33", "\"10.0.0.0/33\""),
            ("10.0.0.0/8,deny", "\"deny\""),
            ("::1/128", "\"::1/128\""),
        ] {
            let error = EgressPolicy::parse_list(bad).unwrap_err();
            assert!(
                error.contains(named) && error.contains("expected allow, deny or CIDR[,CIDR...]"),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn new_sandboxes_take_forwards_and_egress() {
        let Verb::Create(create) = parse(&[
            "create",
            "a",
            "-p",
            "80",
            "--publish",
            "8080:81=web",
            "--egress",
            "deny",
        ])
        .command
        else {
            panic!()
        };
        let ports: Vec<_> = create
            .net
            .publish
            .iter()
            .map(|f| (f.host_port, f.guest_port))
            .collect();
        assert_eq!(ports, [(None, 80), (Some(8080), 81)]);
        assert_eq!(create.net.egress, Some(EgressPolicy::DenyAll));
        let Verb::Start(start) = parse(&["start", "a", "--egress", "10.0.0.0/8"]).command else {
            panic!()
        };
        assert!(start.net.is_set() && start.net.publish.is_empty());
        let Verb::Run(run) = parse(&["run", "--rm", "-p", "22", "--", "true"]).command else {
            panic!()
        };
        assert_eq!(run.net.publish[0].guest_port, 22);
        refused(&["run", "-n", "a", "-c", "true", "-p", "22"]);
        refused(&["run", "-n", "a", "-c", "true", "--egress", "deny"]);
        let error = refused(&["create", "a", "-p", "x"]);
        assert!(error.contains("--publish"), "{error}");
        let error = refused(&["create", "a", "--egress", "none"]);
        assert!(error.contains("--egress"), "{error}");
    }

    #[test]
    fn port_and_egress_verbs() {
        let Verb::Port(PortVerb::Ls { name }) = parse(&["port", "ls", "a"]).command else {
            panic!()
        };
        assert_eq!(name, "a");
        let Verb::Port(PortVerb::Add { name, publish }) =
            parse(&["port", "add", "a", "-p", "8080:80", "-p", "22=ssh"]).command
        else {
            panic!()
        };
        assert_eq!(name, "a");
        assert_eq!(publish[0].host_port, Some(8080));
        assert_eq!(publish[1].description, "ssh");
        let Verb::Port(PortVerb::Rm { host_ports, .. }) =
            parse(&["port", "remove", "a", "8080", "40001"]).command
        else {
            panic!()
        };
        assert_eq!(host_ports, [8080, 40001]);
        refused(&["port", "add", "a"]);
        refused(&["port", "rm", "a"]);
        refused(&["port", "rm", "a", "http"]);
        let Verb::Egress(egress) = parse(&["egress", "a"]).command else {
            panic!()
        };
        assert_eq!((egress.name.as_str(), egress.policy), ("a", None));
        let Verb::Egress(egress) = parse(&["egress", "a", "deny"]).command else {
            panic!()
        };
        assert_eq!(egress.policy, Some(EgressPolicy::DenyAll));
        refused(&["egress", "a", "sometimes"]);
    }

    #[test]
    fn server_and_token_are_global() {
        let args = parse(&["list-all", "--server", "http://h:1", "--token", "t"]);
        assert_eq!(args.server.as_deref(), Some("http://h:1"));
        assert_eq!(args.token.as_deref(), Some("t"));
        let args = parse(&["--server", "h:1", "--json", "list"]);
        assert_eq!(args.server.as_deref(), Some("h:1"));
        assert!(args.json);
    }
}
