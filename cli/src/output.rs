//! How results are shown: tables for people, JSON with `--json`.

use arrakis_runtime::SandboxInfo;

/// The error and all its causes on one line.
pub fn error_chain(error: &anyhow::Error) -> String {
    format!("{error:#}")
}

pub fn sandboxes(list: &[SandboxInfo], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(list)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>5} {:>8} {:<16} {:>8}",
        "NAME", "STATE", "VCPUS", "MEMORY", "IMAGE", "PID"
    );
    for info in list {
        println!(
            "{:<24} {:<10} {:>5} {:>7}M {:<16} {:>8}",
            info.name,
            format!("{:?}", info.state).to_lowercase(),
            info.vcpus,
            info.memory_mb,
            info.image,
            info.pid
                .map(|pid| pid.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    Ok(())
}

pub fn sandbox(info: &SandboxInfo, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(info)?);
    } else {
        sandboxes(std::slice::from_ref(info), false)?;
    }
    Ok(())
}
