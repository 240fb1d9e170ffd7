//! cp: copy one file between this machine and a sandbox.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use arrakis_runtime::{Manager, WriteOptions};

use crate::cli::CpArgs;

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Sandbox { name: String, path: String },
}

/// `NAME:PATH` names a path in a sandbox; anything else is local. A local
/// path containing ':' can be written as `./a:b`.
fn place(text: &str) -> Place {
    match text.split_once(':') {
        Some((name, path)) if !name.is_empty() && !name.contains('/') => Place::Sandbox {
            name: name.to_string(),
            path: path.to_string(),
        },
        _ => Place::Local(PathBuf::from(text)),
    }
}

fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
}

pub async fn copy(manager: &Manager, args: CpArgs) -> anyhow::Result<u8> {
    match (place(&args.source), place(&args.destination)) {
        (Place::Local(local), Place::Sandbox { name, path }) => {
            upload(manager, &local, &name, &path, args.mode).await
        }
        (Place::Sandbox { name, path }, Place::Local(local)) => {
            download(manager, &name, &path, &local).await
        }
        _ => bail!("cp copies between this machine and a sandbox: exactly one of SOURCE and DESTINATION must be NAME:PATH"),
    }?;
    Ok(0)
}

async fn upload(
    manager: &Manager,
    local: &Path,
    name: &str,
    path: &str,
    mode: Option<u32>,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("opening {}", local.display()))?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        bail!("{} is not a regular file", local.display());
    }
    let target = if path.is_empty() || path.ends_with('/') {
        let file_name = local
            .file_name()
            .and_then(|n| n.to_str())
            .context("the local file name is not valid UTF-8")?;
        format!("{path}{file_name}")
    } else {
        path.to_string()
    };
    let options = WriteOptions {
        mode: Some(mode.unwrap_or(meta.permissions().mode() & 0o777)),
        create_parents: true,
        append: false,
    };
    let agent = manager.agent(name).await?;
    agent
        .write_file(&target, &mut file, options)
        .await
        .with_context(|| format!("writing {name}:{target}"))?;
    Ok(())
}

async fn download(manager: &Manager, name: &str, path: &str, local: &Path) -> anyhow::Result<()> {
    let target = if local.is_dir() {
        let file_name = base_name(path).context("the sandbox path has no file name")?;
        local.join(file_name)
    } else {
        local.to_path_buf()
    };
    let agent = manager.agent(name).await?;
    let partial = target.with_extension("arrakis-partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    let result = agent.read_file(path, &mut file).await;
    if let Err(error) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(error).with_context(|| format!("reading {name}:{path}"));
    }
    file.sync_all().await?;
    tokio::fs::rename(&partial, &target)
        .await
        .with_context(|| format!("moving the download to {}", target.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_sandbox_paths_from_local_ones() {
        assert_eq!(
            place("box:/etc/hosts"),
            Place::Sandbox {
                name: "box".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(place("./a:b"), Place::Local("./a:b".into()));
        assert_eq!(place("/tmp/x"), Place::Local("/tmp/x".into()));
        assert_eq!(place(":x"), Place::Local(":x".into()));
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("/a/b.txt"), Some("b.txt"));
        assert_eq!(base_name("/a/dir/"), Some("dir"));
        assert_eq!(base_name("/"), None);
    }
}
