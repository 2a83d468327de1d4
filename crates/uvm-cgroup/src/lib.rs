//! # uvm-cgroup — one cgroup per VM
//!
//! The VM's ownership boundary on the host: every process of a VM (QEMU, vhost-device-vsock,
//! each virtiofsd) is in its cgroup from before its first instruction, so none escapes, its
//! accounting is the cgroup's, and its release kills whatever is still inside.
//!
//! - [`Layout`] detects cgroup v2 (one unified hierarchy) or v1 (one hierarchy per controller,
//!   as on these machines) from `/proc/self/mountinfo`.
//! - [`VmCgroup::create`] makes `<parent>/<name>` in each hierarchy used (v2: enabling `cpu`,
//!   `memory` and `pids` down the way), before any process is spawned.
//! - [`VmCgroup::joiner`] opens each `cgroup.procs` beforehand; [`Joiner::join`] runs in the
//!   child between fork and exec and writes `0` (itself) into each — two raw syscalls per
//!   hierarchy, nothing allocated — so the program starts inside.
//! - [`VmCgroup::set_cpu_limits`]: `cpu.max` / `cpu.weight` on v2, `cpu.cfs_quota_us` /
//!   `cpu.shares` on v1 ([`limits`]). [`VmCgroup::stats`]: CPU usage, throttling, memory current
//!   and peak.
//! - [`VmCgroup::kill_all`] (v2 `cgroup.kill`, else freeze, kill each member through a pidfd
//!   after checking it is still a member, thaw) and [`VmCgroup::remove`] (waits for it to empty,
//!   then removes each directory).
//!
//! Why not the `cgroups-rs` crate: 0.5 depends on zbus (a D-Bus client) and a third `nix`
//! unconditionally, and has no way to put a child into a cgroup before it execs; what a VM needs
//! is a dozen files.

pub mod cpu_group;
mod group;
pub mod layout;
pub mod limits;
#[cfg(test)]
mod testing;

use std::path::PathBuf;

pub use cpu_group::{CpuGroup, GroupMove, GroupSettings, GROUPS_PARENT};
pub use group::{CgroupStats, Joiner, Throttling, VmCgroup};
pub use layout::Layout;

/// What can go wrong with a VM's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy is mounted (neither cgroup2 nor a v1 hierarchy with the cpu controller)")]
    NotMounted,
    #[error("{what} {value:?} is not a plain relative cgroup path")]
    InvalidName { what: &'static str, value: String },
    #[error("the cgroup {} exists already", path.display())]
    Exists { path: PathBuf },
    #[error("the host has no {controller} controller in its cgroups")]
    NoController { controller: &'static str },
    #[error("there is no cpu group {name:?} (uvmctl cpu-group create {name})")]
    NoGroup { name: String },
    #[error("the cpu group {name:?} is in use by {members:?}")]
    InUse { name: String, members: Vec<String> },
    #[error("{what} {value} is not valid")]
    InvalidValue { what: &'static str, value: String },
    #[error("{} still holds processes {pids:?} after they were killed", path.display())]
    Busy { path: PathBuf, pids: Vec<u32> },
    #[error("cannot {operation} {}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
