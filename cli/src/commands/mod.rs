//! One module per group of verbs. Each takes parsed arguments and a
//! [`Backend`]: the same code runs on this machine's sandboxes (embedded)
//! and against an arrakis server (`--server`).

mod checkpoint;
mod cp;
mod exec;
mod fs;
mod image;
mod lifecycle;
mod network;
mod serve;

use anyhow::Context;
use arrakis_runtime::RuntimeConfig;

use crate::backend::{Backend, Change};
use crate::cli::{Args, Verb};

/// Runs one command; returns the process exit code.
pub async fn run(args: Args) -> anyhow::Result<u8> {
    let json = args.json;
    match args.command {
        Verb::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Args::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "arrakis", &mut script);
            crate::output::print(&String::from_utf8_lossy(&script))?;
            return Ok(0);
        }
        Verb::Serve(serve) => {
            // The server runs the sandboxes itself, whatever --server says.
            let mut config = RuntimeConfig::from_env().context("reading the environment")?;
            if let Some(dir) = &args.state_dir {
                config.state_dir = dir.clone();
            }
            return serve::serve(config, args.state_dir.as_deref(), serve).await;
        }
        _ => {}
    }
    let backend = Backend::open(
        args.server.as_deref(),
        args.token.as_deref(),
        args.state_dir.as_deref(),
    )
    .await?;
    let backend = &backend;
    match args.command {
        Verb::Create(create) => lifecycle::create(backend, create, json).await,
        Verb::Start(start) => lifecycle::start(backend, start, json).await,
        Verb::Run(run) => exec::run(backend, run).await,
        Verb::Exec(exec) => exec::exec(backend, exec).await,
        Verb::Cp(cp) => cp::copy(backend, cp).await,
        Verb::Upload(upload) => cp::upload_pairs(backend, upload).await,
        Verb::Download(download) => cp::download_paths(backend, download).await,
        Verb::Fs(verb) => fs::run(backend, verb, json).await,
        Verb::List(list) => lifecycle::list(backend, list.name(), json).await,
        Verb::ListAll => lifecycle::list(backend, None, json).await,
        Verb::Get(name) => lifecycle::get(backend, name.get(), json).await,
        Verb::Stop(name) => lifecycle::change(backend, name.get(), Change::Stop, json).await,
        Verb::Pause(name) => lifecycle::change(backend, name.get(), Change::Pause, json).await,
        Verb::Resume(name) => lifecycle::change(backend, name.get(), Change::Resume, json).await,
        Verb::Destroy(name) => lifecycle::destroy(backend, name.get()).await,
        Verb::DestroyAll => lifecycle::destroy_all(backend).await,
        Verb::Snapshot(snapshot) => lifecycle::snapshot(backend, snapshot, json).await,
        Verb::Restore(restore) => lifecycle::restore(backend, restore, json).await,
        Verb::Fork(fork) => lifecycle::fork(backend, fork, json).await,
        Verb::Rollback(rollback) => lifecycle::rollback(backend, rollback, json).await,
        Verb::Snapshots(snapshots) => lifecycle::snapshots(backend, snapshots, json).await,
        Verb::Port(verb) => network::port(backend, verb, json).await,
        Verb::Egress(egress) => network::egress(backend, egress, json).await,
        Verb::Image(verb) => image::run(backend, verb, json).await,
        Verb::Completions { .. } | Verb::Serve(_) => unreachable!("handled above"),
    }
}
