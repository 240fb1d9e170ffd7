//! create, start, stop, pause, resume, destroy, list, get.

use arrakis_runtime::{Manager, SandboxSpec};

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
    let info = manager.create(spec(&args.name, &args.size)).await?;
    output::sandbox(&info, json)?;
    Ok(0)
}

pub async fn list(manager: &Manager, json: bool) -> anyhow::Result<u8> {
    output::sandboxes(&manager.list().await?, json)?;
    Ok(0)
}

pub async fn get(manager: &Manager, name: &str, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&manager.get(name).await?, json)?;
    Ok(0)
}

pub async fn start(manager: &Manager, name: &str, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&manager.start(name).await?, json)?;
    Ok(0)
}

pub async fn stop(manager: &Manager, name: &str, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&manager.stop(name).await?, json)?;
    Ok(0)
}

pub async fn pause(manager: &Manager, name: &str, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&manager.pause(name).await?, json)?;
    Ok(0)
}

pub async fn resume(manager: &Manager, name: &str, json: bool) -> anyhow::Result<u8> {
    output::sandbox(&manager.resume(name).await?, json)?;
    Ok(0)
}

pub async fn destroy(manager: &Manager, name: &str) -> anyhow::Result<u8> {
    manager.destroy(name).await?;
    Ok(0)
}
