//! `arrakis-init`: the guest's PID 1. It boots the guest from the initramfs
//! into the root disk, reaps every process, and serves the host agent
//! protocol over a virtio-serial port (exec, files, clock, network, power).
//! `main.rs` wires these modules; each module owns one concern.

pub mod agent;
pub mod boot;
pub mod cgroup;
pub mod cmdline;
pub mod exec;
pub mod files;
pub mod handler;
pub mod log;
pub mod net;
pub mod port;
pub mod supervisor;
pub mod system;
pub mod tunnel;
pub mod users;
