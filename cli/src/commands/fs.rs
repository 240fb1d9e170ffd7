//! fs: list, stat, mkdir, rm and chmod inside a sandbox.

use arrakis_protocol::{FileKind, FileStat};
use arrakis_runtime::Manager;

use crate::cli::FsVerb;

pub async fn run(manager: &Manager, verb: FsVerb, json: bool) -> anyhow::Result<u8> {
    match verb {
        FsVerb::Ls { name, path } => {
            let entries = manager.agent(&name).await?.list(&path).await?;
            print_stats(&entries, json)?;
        }
        FsVerb::Stat { name, path } => {
            let stat = manager.agent(&name).await?.stat(&path).await?;
            print_stats(std::slice::from_ref(&stat), json)?;
        }
        FsVerb::Mkdir {
            name,
            path,
            parents,
        } => {
            manager
                .agent(&name)
                .await?
                .mkdir(&path, parents, None)
                .await?;
        }
        FsVerb::Rm {
            name,
            path,
            recursive,
        } => {
            manager.agent(&name).await?.remove(&path, recursive).await?;
        }
        FsVerb::Chmod { name, mode, path } => {
            manager.agent(&name).await?.chmod(&path, mode).await?;
        }
    }
    Ok(0)
}

fn print_stats(stats: &[FileStat], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(stats)?);
        return Ok(());
    }
    for stat in stats {
        let kind = match stat.kind {
            FileKind::File => '-',
            FileKind::Dir => 'd',
            FileKind::Symlink => 'l',
            FileKind::Other => '?',
        };
        let target = stat
            .link_target
            .as_ref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        println!(
            "{kind}{:04o} {:>5} {:>5} {:>12} {}{target}",
            stat.mode, stat.uid, stat.gid, stat.size, stat.name
        );
    }
    Ok(())
}
