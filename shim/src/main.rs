//! `containerd-shim-arrakis-v2`: the containerd runtime
//! `io.containerd.arrakis.v2`. Each container is an arrakis microVM; its
//! process runs inside the VM through the guest agent, and containerd sees
//! an ordinary task.
//!
//! Speaks the shim v2 protocol with task API v2 (`containerd-shim` 0.11),
//! which containerd 1.6, 1.7 and 2.x all accept. Besides the ttrpc server
//! (no action), the binary answers containerd's `start` and `delete`
//! commands, `-v` and `-info`.

mod error;
mod hooks;
mod logging;
mod net;
mod netns;
mod oci;
mod rootfs;
mod service;
mod state;
mod stats;
mod stdio;
mod task;

use containerd_shim::Config;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The name containerd knows the runtime by.
pub const RUNTIME_ID: &str = "io.containerd.arrakis.v2";
const BINARY: &str = "containerd-shim-arrakis-v2";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-v" || a == "--version") {
        println!("{BINARY}:\n  Runtime: {RUNTIME_ID}\n  Version: {VERSION}");
        return;
    }
    if args.iter().any(|a| a == "-info" || a == "--info") {
        print_info();
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("{BINARY}: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    // QEMU daemonizes; with the shim as a subreaper it would be reparented
    // here, and a reaper would take the exit statuses of the commands the
    // runtime waits for (mkfs, qemu-img, nft). Neither is wanted.
    let config = Config {
        no_setup_logger: true,
        default_log_level: "info".into(),
        no_reaper: true,
        no_sub_reaper: true,
    };
    runtime.block_on(containerd_shim::asynchronous::run::<service::ArrakisShim>(
        RUNTIME_ID,
        Some(config),
    ));
}

/// `-info`: containerd 2.x reads a `RuntimeInfo` protobuf from stdout.
fn print_info() {
    use std::io::Write;
    let info = RuntimeInfo {
        name: BINARY.into(),
        version: MessageField::some(RuntimeVersion {
            version: VERSION.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bytes = info.write_to_bytes().unwrap_or_default();
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(&bytes);
    let _ = stdout.flush();
}
