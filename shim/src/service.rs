//! The shim's process-level commands: `start` (spawn the server, print its
//! address), `delete` (undo whatever a dead or finished shim left) and the
//! server itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrakis_runtime::{Manager, RuntimeConfig};
use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::{Config, Flags, StartOpts};
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::MessageField;

use crate::error::ShimError;
use crate::state::TaskState;
use crate::task::TaskService;
use crate::{logging, rootfs};

/// Exit status reported for a task whose shim is gone (what runc reports:
/// the process was killed).
const KILLED: u32 = 128 + libc::SIGKILL as u32;

pub struct ArrakisShim {
    exit: Arc<ExitSignal>,
    namespace: String,
    bundle: PathBuf,
}

#[async_trait]
impl Shim for ArrakisShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        if args.action.is_empty() {
            logging::init(args.debug);
        }
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        ArrakisShim {
            exit: Arc::new(ExitSignal::default()),
            namespace: args.namespace.clone(),
            bundle,
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim (and one VM) per container.
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // containerd reconnects through this file after it restarts.
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        if let Err(error) = cleanup_bundle(&self.bundle).await {
            // containerd logs stderr as cleanup warnings.
            eprintln!("cleaning up {}: {error}", self.bundle.display());
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: KILLED,
            exited_at: MessageField::some(crate::task::timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService::new(self.namespace.clone(), Arc::clone(&self.exit), publisher)
    }
}

/// Opens the runtime the way the server does: configuration from the
/// environment containerd gives its shims (`ARRAKIS_HOME`, ...).
pub async fn open_manager() -> Result<Manager, ShimError> {
    let config = RuntimeConfig::from_env().map_err(arrakis_runtime::RuntimeError::from)?;
    Ok(Manager::open(config).await?)
}

/// Removes the VM, mounts and private conversion recorded in `bundle`.
/// Idempotent: containerd runs `delete` after every shutdown too.
pub async fn cleanup_bundle(bundle: &Path) -> Result<(), ShimError> {
    rootfs::unmount(&bundle.join("rootfs"));
    rootfs::unmount(&bundle.join("rootfs-layers"));
    let Some(mut state) = TaskState::load(bundle)? else {
        return Ok(());
    };
    let manager = open_manager().await?;
    release(&manager, &state).await?;
    // The bundle's directory is named after the container.
    let id = bundle
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::net::teardown(&id, bundle, &mut state).await;
    TaskState::remove(bundle);
    Ok(())
}

/// Destroys the sandbox of `state` (if it still exists) and its private
/// conversion.
pub async fn release(manager: &Manager, state: &TaskState) -> Result<(), ShimError> {
    match manager.destroy(&state.sandbox).await {
        Ok(()) => {}
        Err(arrakis_runtime::RuntimeError::NotFound { .. }) => {}
        Err(error) => return Err(error.into()),
    }
    if let Some(reference) = &state.private_image {
        rootfs::release(manager, reference);
    }
    Ok(())
}
