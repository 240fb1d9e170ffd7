//! `arrakis`: create sandboxes and run commands in them, on this machine or
//! through an arrakis server (`--server URL`).
//!
//! Thin wiring: argument parsing lives in [`cli`], one module per group of
//! verbs in [`commands`], written once against [`backend::Backend`]; the
//! work is done by the runtime library or the server.

mod backend;
mod cli;
mod commands;
mod lineage;
mod output;
mod tarball;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("arrakis: cannot start the async runtime: {error}");
            return std::process::ExitCode::from(70);
        }
    };
    let result = runtime.block_on(commands::run(args));
    // A blocking read of a terminal's stdin (exec -i) must not keep the
    // process alive once the command is over.
    runtime.shutdown_background();
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(error) => {
            eprintln!("arrakis: {}", output::error_chain(&error));
            std::process::ExitCode::from(1)
        }
    }
}

/// Logs go to stderr at `ARRAKIS_LOG` level (default warn), or appended to
/// the file `ARRAKIS_LOG_FILE` names, which keeps them apart from the
/// command output that `exec` passes through on stderr.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ARRAKIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let file = std::env::var_os("ARRAKIS_LOG_FILE").and_then(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
    });
    match file {
        Some(file) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}
