//! create, destroy and list, and how every lifecycle verb shows its result.

use arrakis_runtime::{Manager, SandboxInfo, SandboxSpec};

use crate::cli::{CreateArgs, SizeArgs};
use crate::output;

pub fn spec(name: &str, size: &SizeArgs) -> SandboxSpec {
    SandboxSpec {
        name: name.to_string(),
        vcpus: size.vcpus,
        memory_mb: size.memory_mb,
        image: size.image.clone(),
    }
}

pub async fn create(manager: &Manager, args: CreateArgs, json: bool) -> anyhow::Result<u8> {
    show(manager.create(spec(&args.name, &args.size)).await?, json)
}

pub async fn list(manager: &Manager, json: bool) -> anyhow::Result<u8> {
    output::sandboxes(&manager.list().await?, json)?;
    Ok(0)
}

/// Prints the sandbox a lifecycle call returned.
pub fn show(info: SandboxInfo, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&info, json)?;
    Ok(0)
}

pub async fn destroy(manager: &Manager, name: &str) -> anyhow::Result<u8> {
    manager.destroy(name).await?;
    Ok(0)
}
