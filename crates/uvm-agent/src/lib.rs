//! The in-guest agent of uvmctl utility VMs.
//!
//! As `/init` (PID 1) it sets the guest up — pseudo filesystems, hostname, kernel modules —,
//! serves the ttrpc API of `uvm-agent-proto` on vsock, announces itself to the host and
//! forwards its log there, reaps every orphan, and never exits (a fatal error powers the VM
//! off). The pieces are a library so that the API can be tested in-process on a unix socket.

pub mod logging;

pub mod announce;
pub mod clock;
pub mod cpus;
mod entropy;
pub mod error;
pub mod files;
pub mod modules;
pub mod mounts;
pub mod network;
pub mod policy;
pub mod power;
pub mod probe;
pub mod process;
pub mod run;
pub mod service;
pub mod stacks;
pub mod stats;
pub mod system;
