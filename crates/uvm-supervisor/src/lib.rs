//! # uvm-supervisor — one process per long-lived VM
//!
//! `uvmctl create` starts a supervisor detached ([`start_supervisor`]); it owns one
//! [`uvm::Controller`] with its QEMU and helpers (tethered to it: they die with it), keeps the
//! record `<root>/<id>/vm.json` ([`record`]), and serves the `uvm.v1` API (`uvm-api`) on
//! `<root>/<id>/api.sock` until the VM is removed ([`run`]). The CLI's other commands are clients:
//! they find a VM by name or id prefix ([`names::resolve`]) and read records without asking.
//! A directory without a record is a create under way or one a killed `create` abandoned
//! ([`mod@incomplete`]); a supervisor started with a tether removes its VM when the tethered process
//! ends (tests use it so that a killed test leaves nothing behind).
//!
//! ```text
//!   <root>/                 0700, ours      (--root, UVMCTL_ROOT, /run/uvmctl, $XDG_RUNTIME_DIR/uvmctl)
//!     names/<name>          the name claim: the id (O_EXCL: one winner per name)
//!     <id>/                 0700
//!       vm.json             the record, replaced atomically at every change
//!       api.sock            0600, the gRPC API
//!       supervisor.log      the supervisor's stdout and stderr
//!       uvm-<id>-…/         QEMU's runtime directory (sockets, console log)
//! ```

#![warn(missing_docs)]

pub mod incomplete;
pub mod names;
pub mod ready;
pub mod record;
pub mod root;
pub mod start;

mod copy;
mod events;
mod exec;
mod logs;
mod service;
mod stacks;
mod supervisor;
mod tether;

pub use incomplete::{incomplete, remove_abandoned, Incomplete, IncompleteError};
pub use names::{resolve, NameError};
pub use ready::{Ready, ReadyError};
pub use record::{
    read_record, ConfigRecord, DeviceRecord, MountRecord, MountSpecRecord, NetworkRecord,
    ProcessRecord, RecordError, VmRecord,
};
pub use root::{check_root, ensure_root, resolve_root, RootError};
pub use start::{start_supervisor, StartError, Started, SupervisorCommand};
pub use supervisor::{run, SupervisorError, SupervisorSpec};
pub use tether::TetherError;

/// Removes what a VM whose supervisor died never released — the QEMU runtime directories under
/// the VM's directory `dir` whose owner is gone, and each one's cgroup (killing anything left
/// in it) — before its directory is removed. The VM's processes died with their supervisor.
pub fn sweep_dead_vm(dir: &std::path::Path) {
    let options = uvm_vm::VmOptions {
        runtime_root: Some(dir.to_path_buf()),
        ..uvm_vm::VmOptions::default()
    };
    for swept in uvm_vm::sweep_stale_runtime_dirs(&options) {
        tracing::info!(dir = %swept.display(), "removed a dead supervisor's VM runtime directory");
    }
}
