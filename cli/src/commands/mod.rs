//! One module per verb. Each takes parsed arguments and a [`Manager`]; none
//! knows about another front end. When the CLI becomes a client of the HTTP
//! API, only the `Manager` calls here change.

mod cp;
mod exec;
mod fs;
mod lifecycle;
mod serve;

use anyhow::Context;
use arrakis_runtime::{Manager, RuntimeConfig};

use crate::cli::{Args, Verb};

/// Runs one command; returns the process exit code.
pub async fn run(args: Args) -> anyhow::Result<u8> {
    let mut config = RuntimeConfig::from_env().context("reading the environment")?;
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    let manager = Manager::open(config)
        .await
        .context("opening the sandbox state")?;
    let json = args.json;
    match args.command {
        Verb::Create(create) => lifecycle::create(&manager, create, json).await,
        Verb::Run(run) => exec::run(&manager, run).await,
        Verb::Exec(exec) => exec::exec(&manager, &exec.name, &exec.command).await,
        Verb::Cp(cp) => cp::copy(&manager, cp).await,
        Verb::Fs(verb) => fs::run(&manager, verb, json).await,
        Verb::List => lifecycle::list(&manager, json).await,
        Verb::Get { name } => lifecycle::show(manager.get(&name).await?, json),
        Verb::Start { name } => lifecycle::show(manager.start(&name).await?, json),
        Verb::Stop { name } => lifecycle::show(manager.stop(&name).await?, json),
        Verb::Pause { name } => lifecycle::show(manager.pause(&name).await?, json),
        Verb::Resume { name } => lifecycle::show(manager.resume(&name).await?, json),
        Verb::Destroy { name } => lifecycle::destroy(&manager, &name).await,
        Verb::Serve(serve) => serve::serve(manager, serve).await,
    }
}
