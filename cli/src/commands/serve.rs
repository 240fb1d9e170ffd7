//! serve: the sandbox daemon with its HTTP API.

use anyhow::Context;
use arrakis_api::config::{check_exposure, read_token, ServerConfig};
use arrakis_api::ServeOptions;
use arrakis_runtime::{Manager, RuntimeConfig};

use crate::cli::ServeArgs;

/// `base` is the runtime config from the environment and `--state-dir`;
/// the config file lays over it, then `state_dir` (the flag) wins again.
pub async fn serve(
    base: RuntimeConfig,
    state_dir: Option<&std::path::Path>,
    args: ServeArgs,
) -> anyhow::Result<u8> {
    let mut config = ServerConfig::load(args.config.as_deref(), base)?;
    if let Some(dir) = state_dir {
        config.runtime.state_dir = dir.to_path_buf();
    }
    let listen = args.listen.unwrap_or(config.server.listen);
    let token_file = args.token_file.or(config.server.token_file.clone());
    let token = read_token(
        token_file.as_deref(),
        std::env::var("ARRAKIS_API_TOKEN").ok(),
    )?;
    check_exposure(
        listen,
        token.as_deref(),
        args.allow_unauthenticated || config.server.allow_unauthenticated,
    )?;
    let manager = Manager::open(config.runtime)
        .await
        .context("opening the sandbox state")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let address = listener.local_addr()?;
    // Scripts and tests read this line to find the server.
    eprintln!("arrakis: serving the API on http://{address}");
    if token.is_some() {
        eprintln!("arrakis: clients must send the API token (Authorization: Bearer)");
    }
    let options = ServeOptions { token };
    arrakis_api::serve(listener, manager, options, shutdown_signal())
        .await
        .context("serving the API")?;
    eprintln!("arrakis: stopped; sandboxes keep running and a new 'arrakis serve' picks them up");
    Ok(0)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
