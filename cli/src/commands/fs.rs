//! fs: list, stat, mkdir, rm and chmod inside a sandbox.

use crate::backend::Backend;
use crate::cli::FsVerb;
use crate::output;

pub async fn run(backend: &Backend, verb: FsVerb, json: bool) -> anyhow::Result<u8> {
    match verb {
        FsVerb::Ls { name, path } => {
            let listing = backend.list_dir(&name, &path).await?;
            output::entries(&listing.entries, json)?;
        }
        FsVerb::Stat { name, path } => {
            let entry = backend.stat(&name, &path).await?;
            if json {
                output::json(&entry)?;
            } else {
                output::entries(std::slice::from_ref(&entry), false)?;
            }
        }
        FsVerb::Mkdir {
            name,
            path,
            parents,
        } => backend.mkdir(&name, &path, parents).await?,
        FsVerb::Rm {
            name,
            path,
            recursive,
        } => backend.remove(&name, &path, recursive).await?,
        FsVerb::Chmod { name, mode, path } => backend.chmod(&name, &path, mode).await?,
    }
    Ok(0)
}
