//! create, start, stop, pause, resume, destroy, list, snapshots, fork,
//! rollback: the sandbox's life, and how each verb shows its result.

use std::collections::BTreeMap;

use anyhow::bail;
use arrakis_runtime::ForkSource;

use crate::backend::{Backend, Change, NewVm};
use crate::cli::{
    CreateArgs, ForkArgs, NetArgs, RestoreArgs, RollbackArgs, SizeArgs, SnapshotArgs,
    SnapshotsArgs, SnapshotsVerb, StartArgs,
};
use crate::output;

pub fn new_vm(name: &str, size: &SizeArgs, net: &NetArgs) -> NewVm {
    NewVm {
        name: name.to_string(),
        vcpus: size.vcpus,
        memory_mb: size.memory_mb,
        image: size.image.clone(),
        env: BTreeMap::new(),
        cold_boot: size.cold_boot,
        forwards: net.publish.clone(),
        egress: net.egress.clone(),
    }
}

/// `KEY=VALUE` words as a map; `flag` names the option in errors.
pub fn env_pairs(pairs: &[String], flag: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            bail!("{flag} expects KEY=VALUE, got {pair:?}");
        };
        env.insert(key.to_string(), value.to_string());
    }
    Ok(env)
}

pub async fn create(backend: &Backend, args: CreateArgs, json: bool) -> anyhow::Result<u8> {
    let mut new = new_vm(&args.name, &args.size, &args.net);
    new.env = env_pairs(&args.env, "--env")?;
    output::vm(&backend.create(new).await?, json)?;
    Ok(0)
}

/// The original client's options that name boot files: accepted by the
/// grammar, refused here with the reason.
fn refuse_boot_files(args: &StartArgs) -> anyhow::Result<()> {
    for (flag, value, what) in [
        ("-k/--kernel", &args.kernel, "kernel"),
        ("-r/--rootfs", &args.rootfs, "root file system"),
        ("-e/--entry-point", &args.entry_point, "entry point"),
    ] {
        if value.is_some() {
            bail!(
                "{flag} is not supported: sandboxes boot the server's configured kernel and root file system (choose a base image with --image); the {what} cannot be set per sandbox"
            );
        }
    }
    Ok(())
}

pub async fn start(backend: &Backend, args: StartArgs, json: bool) -> anyhow::Result<u8> {
    refuse_boot_files(&args)?;
    let name = args.name.get();
    let vm = match &args.snapshot {
        Some(snapshot) => {
            if args.size.is_set() || args.net.is_set() {
                bail!("--vcpus, --memory, --image, --cold-boot, -p/--publish and --egress cannot be given with -s/--snapshot: a restored sandbox has its snapshot's (change its forwards and egress afterwards with `arrakis port` and `arrakis egress`)");
            }
            backend.restore(name, snapshot).await?
        }
        None => backend.start(new_vm(name, &args.size, &args.net)).await?,
    };
    output::vm(&vm, json)?;
    Ok(0)
}

pub async fn restore(backend: &Backend, args: RestoreArgs, json: bool) -> anyhow::Result<u8> {
    output::vm(&backend.restore(args.name.get(), &args.id).await?, json)?;
    Ok(0)
}

/// The forks' name prefix when none is given: the snapshot id or the
/// sandbox name, plus `-fork` (what the API does too).
pub fn default_prefix(source: &ForkSource) -> String {
    match source {
        ForkSource::Snapshot(id) => format!("{id}-fork"),
        ForkSource::Sandbox(name) => format!("{name}-fork"),
    }
}

pub async fn fork(backend: &Backend, args: ForkArgs, json: bool) -> anyhow::Result<u8> {
    let source = args.source.get();
    let prefix = args
        .prefix
        .filter(|prefix| !prefix.is_empty())
        .unwrap_or_else(|| default_prefix(&source));
    output::vms(&backend.fork(source, args.count, &prefix).await?, json)?;
    Ok(0)
}

pub async fn rollback(backend: &Backend, args: RollbackArgs, json: bool) -> anyhow::Result<u8> {
    let vm = backend
        .rollback(args.name.get(), args.snapshot.get())
        .await?;
    output::vm(&vm, json)?;
    Ok(0)
}

pub async fn list(backend: &Backend, name: Option<&str>, json: bool) -> anyhow::Result<u8> {
    match name {
        Some(name) => output::vm(&backend.get(name).await?, json)?,
        None => output::vms(&backend.list().await?, json)?,
    }
    Ok(0)
}

pub async fn get(backend: &Backend, name: &str, json: bool) -> anyhow::Result<u8> {
    output::vm_details(&backend.get(name).await?, json)?;
    Ok(0)
}

pub async fn change(
    backend: &Backend,
    name: &str,
    change: Change,
    json: bool,
) -> anyhow::Result<u8> {
    output::vm(&backend.change(name, change).await?, json)?;
    Ok(0)
}

pub async fn destroy(backend: &Backend, name: &str) -> anyhow::Result<u8> {
    backend.destroy(name).await?;
    Ok(0)
}

pub async fn destroy_all(backend: &Backend) -> anyhow::Result<u8> {
    backend.destroy_all().await?;
    Ok(0)
}

pub async fn snapshot(backend: &Backend, args: SnapshotArgs, json: bool) -> anyhow::Result<u8> {
    let id = args.id.filter(|id| !id.is_empty());
    output::snapshot(&backend.snapshot(args.name.get(), id).await?, json)?;
    Ok(0)
}

pub async fn snapshots(backend: &Backend, args: SnapshotsArgs, json: bool) -> anyhow::Result<u8> {
    match args.action {
        None => output::snapshots(&backend.snapshots(args.vm.as_deref()).await?, json)?,
        Some(SnapshotsVerb::List { vm }) => {
            let vm = vm.or(args.vm);
            output::snapshots(&backend.snapshots(vm.as_deref()).await?, json)?
        }
        Some(SnapshotsVerb::Get { id }) => {
            output::snapshot(&backend.get_snapshot(&id).await?, json)?
        }
        Some(SnapshotsVerb::Rm { id }) => backend.delete_snapshot(&id).await?,
        Some(SnapshotsVerb::Export { id, dir }) => {
            super::checkpoint::export(backend, &id, &dir, json).await?
        }
        Some(SnapshotsVerb::Import { dir }) => {
            super::checkpoint::import(backend, &dir, json).await?
        }
        Some(SnapshotsVerb::Tree) => {
            // Sandboxes first: the snapshot each came from existed before
            // it, so it is in the later list unless deleted meanwhile.
            let vms = backend.list().await?;
            let snapshots = backend.snapshots(None).await?;
            output::lineage(&crate::lineage::build(&snapshots, &vms), json)?
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs_split_on_the_first_equals() {
        let env = env_pairs(&["A=b=c".into(), "E=".into()], "--env").unwrap();
        assert_eq!(env["A"], "b=c");
        assert_eq!(env["E"], "");
        for bad in ["NOEQUALS", "=x"] {
            let err = env_pairs(&[bad.into()], "--env").unwrap_err();
            assert!(err.to_string().contains("--env"), "{err}");
        }
    }

    #[test]
    fn forks_are_named_after_their_source_by_default() {
        assert_eq!(
            default_prefix(&ForkSource::Snapshot("base".into())),
            "base-fork"
        );
        assert_eq!(
            default_prefix(&ForkSource::Sandbox("dev".into())),
            "dev-fork"
        );
    }

    #[test]
    fn boot_file_flags_are_refused_with_the_reason() {
        use clap::Parser;
        let args = crate::cli::Args::parse_from(["arrakis", "start", "-n", "a", "-k", "/vmlinux"]);
        let crate::cli::Verb::Start(start) = args.command else {
            panic!()
        };
        let err = refuse_boot_files(&start).unwrap_err().to_string();
        assert!(
            err.contains("-k/--kernel") && err.contains("configured kernel"),
            "{err}"
        );
        let args = crate::cli::Args::parse_from(["arrakis", "start", "-n", "a"]);
        let crate::cli::Verb::Start(start) = args.command else {
            panic!()
        };
        assert!(refuse_boot_files(&start).is_ok());
    }
}
