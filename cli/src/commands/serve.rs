//! serve: the sandbox daemon with its HTTP API.

use anyhow::{bail, Context};
use arrakis_runtime::Manager;

use crate::cli::ServeArgs;

pub async fn serve(manager: Manager, args: ServeArgs) -> anyhow::Result<u8> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "--listen {} is not a loopback address; the API has no authentication yet, so it only binds to loopback (e.g. 127.0.0.1:7000)",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    // Scripts and tests read this line to find the server.
    eprintln!("arrakis: serving the API on http://{address}");
    tokio::select! {
        result = arrakis_api::serve(listener, manager) => result.context("serving the API")?,
        _ = tokio::signal::ctrl_c() => eprintln!("arrakis: stopping; sandboxes keep running"),
    }
    Ok(0)
}
