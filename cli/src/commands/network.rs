//! port and egress: a sandbox's port forwards, and where it may connect to.

use anyhow::{bail, Context};
use arrakis_api::wire::PortForward;

use crate::backend::Backend;
use crate::cli::{EgressArgs, PortVerb};
use crate::output;

pub async fn port(backend: &Backend, verb: PortVerb, json: bool) -> anyhow::Result<u8> {
    match verb {
        PortVerb::Ls { name } => output::forwards(&backend.forwards(&name).await?, json)?,
        PortVerb::Add { name, publish } => {
            output::forwards(&backend.add_forwards(&name, publish).await?, json)?
        }
        PortVerb::Rm {
            name,
            mut host_ports,
        } => {
            host_ports.sort_unstable();
            host_ports.dedup();
            let missing = not_forwarded(&backend.forwards(&name).await?, &host_ports);
            if !missing.is_empty() {
                let ports = if missing.len() == 1 { "port" } else { "ports" };
                bail!(
                    "sandbox {name:?} has no forward on host {ports} {} (see `arrakis port ls {name}`)",
                    missing.join(", ")
                );
            }
            backend.remove_forwards(&name, &host_ports).await?
        }
    }
    Ok(0)
}

/// The ports of `host_ports` that no forward of `forwards` is on.
fn not_forwarded(forwards: &[PortForward], host_ports: &[u16]) -> Vec<String> {
    host_ports
        .iter()
        .map(u16::to_string)
        .filter(|port| !forwards.iter().any(|f| &f.host_port == port))
        .collect()
}

pub async fn egress(backend: &Backend, args: EgressArgs, json: bool) -> anyhow::Result<u8> {
    let policy = match args.policy {
        Some(policy) => backend.set_egress(&args.name, policy).await?,
        None => backend.get(&args.name).await?.egress.with_context(|| {
            format!(
                "sandbox {:?} has no network interface (it was restored from a snapshot taken before sandboxes had one)",
                args.name
            )
        })?,
    };
    output::egress(&policy, json)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_without_a_forward_are_named() {
        let forwards = [PortForward {
            host_port: "8080".into(),
            guest_port: "80".into(),
            description: "web".into(),
        }];
        assert!(not_forwarded(&forwards, &[8080]).is_empty());
        assert_eq!(not_forwarded(&forwards, &[22, 8080, 8081]), ["22", "8081"]);
        assert_eq!(not_forwarded(&[], &[8080]), ["8080"]);
    }
}
