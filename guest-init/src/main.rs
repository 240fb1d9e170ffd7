//! `arrakis-init`: boot (when PID 1), then serve the host forever. As PID 1
//! this must never return: a panic or an error is logged to the console and
//! the agent starts again. (SIGPIPE is already ignored by the Rust runtime.)

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrakis_guest_init::cgroup::Cgroups;
use arrakis_guest_init::exec::ExecContext;
use arrakis_guest_init::handler::Agent;
use arrakis_guest_init::{agent, boot, log, supervisor};

fn main() {
    let is_init = std::process::id() == 1;
    let config = if is_init {
        boot::early()
    } else {
        boot::read_cmdline()
    };
    log::init(config.debug);
    tracing::info!(
        version = agent::AGENT_VERSION,
        is_init,
        "arrakis-init starting"
    );
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let cgroups = if is_init {
        boot::finish(&config)
    } else {
        Cgroups::disabled()
    };
    let handler = Arc::new(Agent::new(
        ExecContext::new(supervisor::global(), Arc::new(cgroups), PathBuf::from("/")),
        is_init,
    ));
    loop {
        // The panic hook has already printed a panic's message to the console.
        match std::panic::catch_unwind(AssertUnwindSafe(|| serve(&config.port, &handler))) {
            Ok(Ok(())) => tracing::error!("agent loop returned; restarting it"),
            Ok(Err(e)) => tracing::error!(error = %e, "cannot start the agent runtime; retrying"),
            Err(_) => tracing::error!("agent panicked; restarting it"),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the agent on a 2-worker runtime; returns only on failure.
fn serve(port: &str, handler: &Arc<Agent>) -> Result<(), std::io::Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(agent::serve_forever(port, Arc::clone(handler)));
    Ok(())
}
