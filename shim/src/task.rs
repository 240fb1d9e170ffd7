//! The ttrpc Task service: containerd's view of the container (a task with
//! an init process and exec'd processes) mapped onto an arrakis sandbox.
//!
//! - Create converts the root file system, boots the VM and records the
//!   init process; Start runs it through the guest agent. The init process
//!   is a *kept* agent process: it survives the agent session, so after a
//!   checkpoint is restored the shim attaches to it again.
//! - Exec/Start(exec_id) run more processes in the same VM.
//! - Output is copied to the client's FIFOs as the guest produces it; a
//!   process's exit is recorded (waking `Wait`) and published only after its
//!   output has been written and the FIFOs closed, so the client has it all.
//! - State, Pids and Wait answer from memory: containerd gives State two
//!   seconds, less than a VM may take to answer under emulation.
//! - Events go out in order through one queue: create < start < exit <
//!   delete, and exec-added < exec-started < exit.
//!
//! Pids: the init task's pid is QEMU's (a host process, which is what
//! containerd's clients expect to find in /proc); exec'd processes and the
//! `Pids` listing use guest pids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arrakis_protocol::{ConfigureRequest, ExecRequest};
use arrakis_runtime::agent::{ExecControl, ExecEvent, ExecSession, WriteOptions};
use arrakis_runtime::{Manager, SandboxSpec};
use async_trait::async_trait;
use bytes::Bytes;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim_protos::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest,
    StatsResponse, Status, UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO,
    TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim_protos::shim::oci::CheckpointOptions;
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::r#async::TtrpcContext;
use containerd_shim_protos::ttrpc::{self, context::Context};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, OnceCell};

use crate::error::ShimError;
use crate::net::{self, HookContext};
use crate::oci::{self, Spec};
use crate::rootfs;
use crate::service::{open_manager, release};
use crate::state::{sandbox_name, TaskState};
use crate::stats;
use crate::stdio::{open_outputs, open_stdin, Logger, Sink, StdioPaths};

/// The agent's name for a container's init process.
pub const INIT_KEEP: &str = "init";

/// After CloseIO, how long the stdin FIFO may stay quiet before what the
/// client wrote counts as all read.
const STDIN_DRAIN: std::time::Duration = std::time::Duration::from_millis(50);

/// Exit status of a process whose VM or agent session was lost.
const LOST: u32 = 255;

/// How long the guest may take to report its numbers for Stats (the
/// caller, often the CRI plugin's periodic collection, must not hang).
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

type TtrpcResult<T> = ttrpc::Result<T>;
type Event = (&'static str, Box<dyn MessageDyn>);

pub struct TaskService {
    namespace: String,
    exit: Arc<ExitSignal>,
    events: mpsc::UnboundedSender<Event>,
    manager: OnceCell<Manager>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

struct Container {
    id: String,
    bundle: PathBuf,
    state: TaskState,
    vm_pid: u32,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    paused: AtomicBool,
    /// Restored from a checkpoint: Start attaches to the running init.
    restored: bool,
    hooks: HookContext,
}

struct Process {
    container_id: String,
    /// Empty for the init process.
    exec_id: String,
    stdio: StdioPaths,
    request: ExecRequest,
    inner: Mutex<Running>,
    exited: watch::Sender<Option<Exit>>,
    /// Set by CloseIO: the client's input ended.
    stdin_closed: watch::Sender<bool>,
}

#[derive(Default)]
struct Running {
    started: bool,
    /// The guest pid, once started.
    pid: u32,
    control: Option<ExecControl>,
}

#[derive(Debug, Clone, Copy)]
struct Exit {
    status: u32,
    at: SystemTime,
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

impl Process {
    fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, request: ExecRequest) -> Self {
        Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            request,
            inner: Mutex::new(Running::default()),
            exited: watch::channel(None).0,
            stdin_closed: watch::channel(false).0,
        }
    }

    /// The id containerd's events use: the exec id, or the container's.
    fn id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self) -> Option<ExecControl> {
        self.running().control.clone()
    }

    /// Records the exit; false if it was already recorded.
    fn record_exit(&self, status: u32) -> bool {
        let mut recorded = false;
        self.exited.send_if_modified(|exit| {
            if exit.is_none() {
                *exit = Some(Exit {
                    status,
                    at: SystemTime::now(),
                });
                recorded = true;
            }
            recorded
        });
        recorded
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    status: LOST,
                    at: SystemTime::now(),
                };
            }
        }
    }
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        if exec_id.is_empty() {
            return Ok(Arc::clone(&self.init));
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("no process {exec_id:?} in {}", self.id)))
    }

    fn status(&self, process: &Process) -> Status {
        if process.exit().is_some() {
            Status::STOPPED
        } else if !process.running().started {
            Status::CREATED
        } else if self.paused.load(Ordering::SeqCst) {
            Status::PAUSED
        } else {
            Status::RUNNING
        }
    }

    /// The pid containerd sees for `process`.
    fn pid(&self, process: &Process) -> u32 {
        if process.exec_id.is_empty() {
            self.vm_pid
        } else {
            process.running().pid
        }
    }
}

impl TaskService {
    pub fn new(namespace: String, exit: Arc<ExitSignal>, publisher: RemotePublisher) -> Self {
        let (events, mut queue) = mpsc::unbounded_channel::<Event>();
        let ns = namespace.clone();
        tokio::spawn(async move {
            while let Some((topic, event)) = queue.recv().await {
                if let Err(error) = publisher
                    .publish(Context::default(), topic, &ns, event)
                    .await
                {
                    tracing::warn!(topic, %error, "could not publish an event");
                }
            }
        });
        TaskService {
            namespace,
            exit,
            events,
            manager: OnceCell::new(),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn publish(&self, topic: &'static str, event: impl MessageDyn) {
        let _ = self.events.send((topic, Box::new(event)));
    }

    async fn manager(&self) -> Result<&Manager, ShimError> {
        self.manager.get_or_try_init(open_manager).await
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ShimError> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("no container {id:?}")))
    }

    async fn do_create(&self, req: CreateTaskRequest) -> Result<CreateTaskResponse, ShimError> {
        if req.id.is_empty() {
            return Err(ShimError::invalid("id", "empty"));
        }
        if self.container(&req.id).is_ok() {
            return Err(ShimError::AlreadyExists(format!(
                "container {:?} already exists",
                req.id
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        let spec = Spec::load(&bundle)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let request = spec
            .process()?
            .exec_request(Some(INIT_KEEP), !stdio.stdin.is_empty())?;
        let manager = self.manager().await?;
        let mut state = TaskState {
            sandbox: sandbox_name(&self.namespace, &req.id),
            ..TaskState::default()
        };
        // A sandbox of that name is left over from a shim that died before
        // containerd ran `delete`: the container id is ours now.
        if manager.get(&state.sandbox).await.is_ok() {
            tracing::warn!(sandbox = %state.sandbox, "removing a leftover sandbox");
            release(manager, &state).await?;
        }
        state.save(&bundle)?;
        let (vm_pid, hooks) = match self.boot(manager, &req, &spec, &bundle, &mut state).await {
            Ok(booted) => booted,
            Err(error) => {
                tracing::warn!(id = %req.id, error = %arrakis_protocol::error_chain(&error), "create failed; cleaning up");
                if let Err(cleanup) = release(manager, &state).await {
                    tracing::warn!(error = %cleanup, "cleanup after a failed create");
                }
                net::teardown(&req.id, &bundle, &mut state).await;
                rootfs::unmount(&bundle.join("rootfs"));
                TaskState::remove(&bundle);
                return Err(error);
            }
        };
        let init = Arc::new(Process::new(&req.id, "", stdio.clone(), request));
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            state,
            vm_pid,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            restored: !req.checkpoint.is_empty(),
            hooks,
        });
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.id.clone(), container);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                checkpoint: req.checkpoint.clone(),
                pid: vm_pid,
                ..Default::default()
            },
        );
        Ok(CreateTaskResponse {
            pid: vm_pid,
            ..Default::default()
        })
    }

    /// Makes the container's network and VM (booted, or restored from a
    /// checkpoint); returns the task's pid (QEMU's, or for a CRI pod's
    /// sandbox its namespace holder's) and what the later hooks need.
    async fn boot(
        &self,
        manager: &Manager,
        req: &CreateTaskRequest,
        spec: &Spec,
        bundle: &Path,
        state: &mut TaskState,
    ) -> Result<(u32, HookContext), ShimError> {
        let setup = net::prepare(spec, &req.id, bundle, state).await?;
        let (netns, hooks) = (setup.attach, setup.hooks);
        let holder = match &setup.hold {
            Some(path) => {
                let pid = net::NetnsHolder::spawn(path)?;
                state.holder_pid = Some(pid);
                state.save(bundle)?;
                Some(pid)
            }
            None => None,
        };
        let forwards = spec.forwards()?;
        if netns.is_some() && !forwards.is_empty() {
            return Err(ShimError::invalid(
                format!("annotations.{}", oci::PORTS_ANNOTATION),
                "the container is on a CNI network, which publishes its ports (e.g. nerdctl -p); \
                 this annotation works only without one",
            ));
        }
        if !req.checkpoint.is_empty() {
            let pid = self.restore(manager, req, spec, state, netns).await?;
            return Ok((holder.unwrap_or(pid), hooks));
        }
        let source = rootfs::classify(&req.rootfs)?;
        let prepared = rootfs::prepare(manager, source, bundle, &req.id).await?;
        if prepared.private {
            state.private_image = Some(prepared.reference.clone());
            state.save(bundle)?;
        }
        let sandbox = SandboxSpec {
            name: state.sandbox.clone(),
            vcpus: spec.vcpus(),
            memory_mb: spec.memory_mb(),
            image: Some(prepared.reference.clone()),
            // A conversion made for one container is never booted again.
            cold_boot: prepared.private,
            forwards,
            netns,
            ..SandboxSpec::default()
        };
        let info = manager.create(sandbox).await?;
        set_hostname(manager, spec, &state.sandbox).await?;
        copy_files(manager, spec, &state.sandbox).await?;
        Ok((holder.unwrap_or(info.pid.unwrap_or_default()), hooks))
    }

    /// Brings a checkpointed container back: the checkpoint directory
    /// (which containerd unpacked from its content store and never removes)
    /// becomes a snapshot, the snapshot a sandbox running from the instant
    /// of the checkpoint, with the init process still running in it.
    async fn restore(
        &self,
        manager: &Manager,
        req: &CreateTaskRequest,
        spec: &Spec,
        state: &TaskState,
        netns: Option<PathBuf>,
    ) -> Result<u32, ShimError> {
        let dir = Path::new(&req.checkpoint);
        let snapshot = manager.import_snapshot(dir).await?;
        let restored = match &netns {
            Some(path) => {
                manager
                    .restore_attached(&snapshot.id, &state.sandbox, path)
                    .await
            }
            None => manager.restore(&snapshot.id, &state.sandbox).await,
        };
        if let Err(error) = manager.delete_snapshot(&snapshot.id).await {
            tracing::warn!(id = %snapshot.id, %error, "could not delete the imported snapshot");
        }
        let info = restored?;
        if let Err(error) = std::fs::remove_dir_all(dir) {
            tracing::debug!(dir = %dir.display(), %error, "could not remove the checkpoint directory");
        }
        set_hostname(manager, spec, &state.sandbox).await?;
        Ok(info.pid.unwrap_or_default())
    }

    /// Writes the VM's memory, devices and disk into `path` as a
    /// self-contained checkpoint; the container keeps running (or paused).
    async fn do_checkpoint(&self, req: CheckpointTaskRequest) -> Result<(), ShimError> {
        let container = self.container(&req.id)?;
        if req.path.is_empty() {
            return Err(ShimError::invalid("path", "empty"));
        }
        let exit_after = req
            .options
            .as_ref()
            .filter(|any| any.type_url.ends_with("CheckpointOptions"))
            .and_then(|any| CheckpointOptions::parse_from_bytes(&any.value).ok())
            .is_some_and(|options| options.exit);
        let manager = self.manager().await?;
        let started = std::time::Instant::now();
        let snapshot = manager.snapshot(&container.state.sandbox, None).await?;
        let exported = manager
            .export_snapshot(&snapshot.id, Path::new(&req.path))
            .await;
        if let Err(error) = manager.delete_snapshot(&snapshot.id).await {
            tracing::warn!(id = %snapshot.id, %error, "could not delete the checkpoint's snapshot");
        }
        exported?;
        tracing::info!(
            id = %req.id,
            path = %req.path,
            ms = started.elapsed().as_millis() as u64,
            "checkpointed"
        );
        self.publish(
            topics::TASK_CHECKPOINTED_EVENT_TOPIC,
            TaskCheckpointed {
                container_id: req.id.clone(),
                checkpoint: req.path.clone(),
                ..Default::default()
            },
        );
        if exit_after {
            self.do_kill(KillRequest {
                id: req.id.clone(),
                signal: libc::SIGKILL as u32,
                all: true,
                ..Default::default()
            })
            .await?;
        }
        Ok(())
    }

    async fn do_start(&self, req: StartRequest) -> Result<StartResponse, ShimError> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if process.running().started || process.exit().is_some() {
            return Err(ShimError::FailedPrecondition(format!(
                "process {:?} was already started",
                process.id()
            )));
        }
        let manager = self.manager().await?;
        let agent = manager.agent(&container.state.sandbox).await?;
        // Open the client's streams first: if they fail, nothing runs.
        let (stdout, stderr, logger) = open_outputs(&process.stdio, &container.id, &self.namespace)
            .await
            .map_err(|e| ShimError::io("opening", Path::new(&process.stdio.stdout), e))?;
        let stdin = open_stdin(&process.stdio.stdin)
            .map_err(|e| ShimError::io("opening", Path::new(&process.stdio.stdin), e))?;
        let session = if process.exec_id.is_empty() && container.restored {
            agent.attach(INIT_KEEP).await?
        } else {
            agent.exec_stream(process.request.clone()).await?
        };
        let pid = session.pid();
        let control = session.control();
        {
            let mut running = process.running();
            running.started = true;
            running.pid = pid;
            running.control = Some(control.clone());
        }
        let shown_pid = container.pid(&process);
        if process.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                TaskStart {
                    container_id: container.id.clone(),
                    pid: shown_pid,
                    ..Default::default()
                },
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                TaskExecStarted {
                    container_id: container.id.clone(),
                    exec_id: process.exec_id.clone(),
                    pid: shown_pid,
                    ..Default::default()
                },
            );
        }
        if let Some(fifo) = stdin {
            tokio::spawn(feed_stdin(fifo, control, Arc::clone(&process)));
        }
        let events = self.events.clone();
        tokio::spawn(copy_output(
            session,
            (stdout, stderr, logger),
            Arc::clone(&process),
            shown_pid,
            events,
        ));
        if process.exec_id.is_empty() {
            container
                .hooks
                .poststart(&container.id, &container.bundle, container.vm_pid)
                .await;
        }
        Ok(StartResponse {
            pid: shown_pid,
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        let container = self.container(&req.id)?;
        if !req.exec_id.is_empty() {
            let process = container.process(&req.exec_id)?;
            if process.running().started && process.exit().is_none() {
                return Err(ShimError::FailedPrecondition(format!(
                    "process {:?} is still running",
                    req.exec_id
                )));
            }
            container
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.exec_id);
            let exit = process.exit();
            return Ok(delete_response(process.running().pid, exit));
        }
        let init = &container.init;
        if init.running().started && init.exit().is_none() {
            return Err(ShimError::FailedPrecondition(format!(
                "task {:?} is still running; kill it first",
                req.id
            )));
        }
        let manager = self.manager().await?;
        release(manager, &container.state).await?;
        net::teardown(
            &container.id,
            &container.bundle,
            &mut container.state.clone(),
        )
        .await;
        rootfs::unmount(&container.bundle.join("rootfs"));
        TaskState::remove(&container.bundle);
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.id);
        let exit = init.exit();
        let response = delete_response(container.vm_pid, exit);
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            TaskDelete {
                container_id: container.id.clone(),
                pid: container.vm_pid,
                exit_status: response.exit_status,
                exited_at: response.exited_at.clone(),
                id: container.id.clone(),
                ..Default::default()
            },
        );
        Ok(response)
    }

    async fn do_kill(&self, req: KillRequest) -> Result<(), ShimError> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| {
                ShimError::invalid("signal", format!("{} is not 1 to 64", req.signal))
            })?;
        if process.exit().is_some() {
            return Err(ShimError::NotFound(format!(
                "process {:?} already finished",
                process.id()
            )));
        }
        let Some(control) = process.control() else {
            // Never started: it ends before it ran, as runc's would.
            if process.record_exit(128 + signal as u32) {
                self.publish_exit(&container, &process);
            }
            return Ok(());
        };
        if signal == libc::SIGKILL && container.paused.load(Ordering::SeqCst) {
            // A stopped VM cannot take the signal: let it run to die.
            self.do_resume(&req.id).await?;
        }
        control.signal(signal, req.all).await?;
        Ok(())
    }

    fn publish_exit(&self, container: &Container, process: &Process) {
        if let Some(event) = exit_event(process, container.pid(process)) {
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, event);
        }
    }

    async fn do_exec(&self, req: ExecProcessRequest) -> Result<(), ShimError> {
        let container = self.container(&req.id)?;
        if req.exec_id.is_empty() {
            return Err(ShimError::invalid("exec_id", "empty"));
        }
        if container.init.exit().is_some() {
            return Err(ShimError::FailedPrecondition(format!(
                "task {:?} has stopped",
                req.id
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| ShimError::invalid("spec", "missing"))?;
        let process = oci::parse_process(&spec.value)?;
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut request = process.exec_request(None, !stdio.stdin.is_empty())?;
        if !req.terminal {
            request.tty = None;
        }
        let process = Arc::new(Process::new(&req.id, &req.exec_id, stdio, request));
        {
            let mut execs = container.execs.lock().unwrap_or_else(|e| e.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {:?} already exists",
                    req.exec_id
                )));
            }
            execs.insert(req.exec_id.clone(), process);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            },
        );
        Ok(())
    }

    async fn do_pause(&self, id: &str) -> Result<(), ShimError> {
        let container = self.container(id)?;
        let manager = self.manager().await?;
        manager.pause(&container.state.sandbox).await?;
        container.paused.store(true, Ordering::SeqCst);
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            },
        );
        Ok(())
    }

    async fn do_resume(&self, id: &str) -> Result<(), ShimError> {
        let container = self.container(id)?;
        let manager = self.manager().await?;
        manager.resume(&container.state.sandbox).await?;
        container.paused.store(false, Ordering::SeqCst);
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            },
        );
        Ok(())
    }

    /// The VM's metrics (see [`crate::stats`]).
    async fn do_stats(&self, req: StatsRequest) -> Result<StatsResponse, ShimError> {
        let container = self.container(&req.id)?;
        let manager = self.manager().await?;
        let info = manager.get(&container.state.sandbox).await?;
        let cpu = info.pid.and_then(stats::host_cpu);
        let guest = match container.paused.load(Ordering::SeqCst) {
            true => None,
            false => {
                let agent = manager.agent(&container.state.sandbox).await?;
                let read = async {
                    let mut meminfo = Vec::new();
                    agent.read_file("/proc/meminfo", &mut meminfo).await?;
                    let mut loadavg = Vec::new();
                    agent.read_file("/proc/loadavg", &mut loadavg).await?;
                    Ok::<_, arrakis_runtime::agent::AgentError>((meminfo, loadavg))
                };
                match tokio::time::timeout(STATS_TIMEOUT, read).await {
                    Ok(Ok((meminfo, loadavg))) => stats::parse_guest(
                        &String::from_utf8_lossy(&meminfo),
                        &String::from_utf8_lossy(&loadavg),
                    ),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "the guest's numbers are unavailable");
                        None
                    }
                    Err(_) => None,
                }
            }
        };
        let metrics = stats::metrics(cpu, guest, info.memory_mb);
        let any = containerd_shim::util::convert_to_any(Box::new(metrics))
            .map_err(|e| ShimError::Internal(format!("encoding the metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn do_update(&self, req: UpdateTaskRequest) -> Result<(), ShimError> {
        let container = self.container(&req.id)?;
        let Some(resources) = req.resources.as_ref() else {
            return Ok(());
        };
        let wanted: oci::Resources = serde_json::from_slice(&resources.value)
            .map_err(|e| ShimError::invalid("resources", e.to_string()))?;
        let spec = Spec {
            linux: Some(oci::Linux {
                resources: Some(wanted),
                ..oci::Linux::default()
            }),
            ..Spec::default()
        };
        let manager = self.manager().await?;
        let info = manager.get(&container.state.sandbox).await?;
        let memory_changes = spec.memory_mb().is_some_and(|m| m != info.memory_mb);
        let vcpus_change = spec.vcpus().is_some_and(|v| v != info.vcpus);
        if memory_changes || vcpus_change {
            return Err(ShimError::FailedPrecondition(format!(
                "a microVM keeps the vCPUs and memory it was created with ({} vCPUs, {} MiB); \
                 recreate the container to change them",
                info.vcpus, info.memory_mb
            )));
        }
        Ok(())
    }
}

/// Gives the guest the spec's hostname, if it names one.
async fn set_hostname(manager: &Manager, spec: &Spec, sandbox: &str) -> Result<(), ShimError> {
    if let Some(hostname) = spec.hostname.as_deref().filter(|h| !h.is_empty()) {
        let agent = manager.agent(sandbox).await?;
        agent
            .configure(ConfigureRequest {
                hostname: Some(hostname.to_owned()),
                ..ConfigureRequest::default()
            })
            .await?;
    }
    Ok(())
}

/// Copies the spec's file bind mounts into the guest; a bind of
/// `/etc/hostname` (how the CRI plugin names a pod's containers) also sets
/// the hostname when the spec has none.
async fn copy_files(manager: &Manager, spec: &Spec, sandbox: &str) -> Result<(), ShimError> {
    let files = spec.copied_files();
    if files.is_empty() {
        return Ok(());
    }
    let agent = manager.agent(sandbox).await?;
    for (source, destination) in files {
        let content = tokio::fs::read(&source)
            .await
            .map_err(|e| ShimError::io("reading", Path::new(&source), e))?;
        if destination == "/etc/hostname" && spec.hostname.as_deref().unwrap_or("").is_empty() {
            let name = String::from_utf8_lossy(&content).trim().to_owned();
            if !name.is_empty() {
                agent
                    .configure(ConfigureRequest {
                        hostname: Some(name),
                        ..ConfigureRequest::default()
                    })
                    .await?;
            }
        }
        let options = WriteOptions {
            mode: Some(0o644),
            create_parents: true,
            append: false,
        };
        agent
            .write_file(&destination, &mut content.as_slice(), options)
            .await?;
    }
    Ok(())
}

/// The `/tasks/exit` event of a process that has exited.
fn exit_event(process: &Process, pid: u32) -> Option<TaskExit> {
    let exit = process.exit()?;
    Some(TaskExit {
        container_id: process.container_id.clone(),
        id: process.id().to_owned(),
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    })
}

fn delete_response(pid: u32, exit: Option<Exit>) -> DeleteResponse {
    let exit = exit.unwrap_or(Exit {
        status: 0,
        at: SystemTime::now(),
    });
    DeleteResponse {
        pid,
        exit_status: exit.status,
        exited_at: MessageField::some(timestamp(exit.at)),
        ..Default::default()
    }
}

/// Copies the process's output to the client until it exits, then records
/// and publishes the exit.
async fn copy_output(
    mut session: ExecSession,
    (mut stdout, mut stderr, logger): (Sink, Sink, Option<Logger>),
    process: Arc<Process>,
    pid: u32,
    events: mpsc::UnboundedSender<Event>,
) {
    let status = loop {
        match session.next().await {
            Ok(ExecEvent::Stdout(data)) => write_or_drop(&mut stdout, &data, "stdout").await,
            Ok(ExecEvent::Stderr(data)) => write_or_drop(&mut stderr, &data, "stderr").await,
            Ok(ExecEvent::Exited(status)) => {
                break u32::try_from(status.shell_code()).unwrap_or(LOST);
            }
            Err(error) => {
                tracing::warn!(
                    id = process.id(),
                    error = %arrakis_protocol::error_chain(&error),
                    "lost the process's agent session"
                );
                break LOST;
            }
        }
    };
    let _ = stdout.flush().await;
    let _ = stderr.flush().await;
    // Closing the FIFOs is the client's end of output.
    drop(stdout);
    drop(stderr);
    if let Some(logger) = logger {
        logger.wait().await;
    }
    if process.record_exit(status) {
        if let Some(event) = exit_event(&process, pid) {
            let _ = events.send((topics::TASK_EXIT_EVENT_TOPIC, Box::new(event)));
        }
    }
}

async fn write_or_drop(sink: &mut Sink, data: &Bytes, what: &str) {
    if let Err(error) = sink.write_all(data).await {
        tracing::debug!(%error, what, "the client's stream is gone; discarding its output");
        *sink = Sink::Discard;
    }
}

/// Copies the client's stdin to the process until CloseIO or the exit.
async fn feed_stdin(mut fifo: pipe::Receiver, control: ExecControl, process: Arc<Process>) {
    let mut closed = process.stdin_closed.subscribe();
    let mut exited = process.exited.subscribe();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        if *closed.borrow_and_update() {
            // Whatever the client wrote before it closed is still sent. The
            // shim holds a writer itself, so reads never see EOF: the input
            // has ended when nothing more arrives for a moment.
            while let Ok(Ok(n)) = tokio::time::timeout(STDIN_DRAIN, fifo.read(&mut buf)).await {
                if n == 0
                    || control
                        .write_stdin(Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                {
                    break;
                }
            }
            break;
        }
        tokio::select! {
            read = fifo.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if control.write_stdin(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            },
            changed = closed.changed() => if changed.is_err() { break },
            _ = exited.changed() => return,
        }
    }
    let _ = control.close_stdin().await;
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.exit();
        Ok(StateResponse {
            id: process.id().to_owned(),
            bundle: container.bundle.display().to_string(),
            pid: container.pid(&process),
            status: container.status(&process).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(e.at)))
                .unwrap_or_default(),
            exec_id: process.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        tracing::info!(id = %req.id, "create");
        Ok(self.do_create(req).await?)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "start");
        Ok(self.do_start(req).await?)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "delete");
        Ok(self.do_delete(req).await?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let container = self.container(&req.id)?;
        let mut processes = Vec::new();
        let init_pid = container.init.running().pid;
        if init_pid != 0 && container.init.exit().is_none() {
            processes.push(init_pid);
        }
        for process in container
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let pid = process.running().pid;
            if pid != 0 && process.exit().is_none() {
                processes.push(pid);
            }
        }
        Ok(PidsResponse {
            processes: processes
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.do_pause(&req.id).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.do_resume(&req.id).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, signal = req.signal, "kill");
        self.do_kill(req).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, exec_id = %req.exec_id, "exec");
        self.do_exec(req).await?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if let Some(control) = process.control() {
            let rows = req.height.min(u16::MAX.into()) as u16;
            let cols = req.width.min(u16::MAX.into()) as u16;
            control.resize(rows, cols).await.map_err(ShimError::from)?;
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if req.stdin {
            process.stdin_closed.send_replace(true);
        }
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        tracing::info!(id = %req.id, path = %req.path, "checkpoint");
        self.do_checkpoint(req).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.do_stats(req).await?)
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.do_update(req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.vm_pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        let empty = self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if empty {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}
