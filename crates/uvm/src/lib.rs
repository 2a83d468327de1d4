//! # uvm — the utility-VM controller
//!
//! The Rust counterpart of hcsshim's VM controller (`internal/controller/vm`): one [`Controller`]
//! per utility VM drives a host backend ([`seams::VmBackend`] / [`seams::HostVm`]) and a guest link
//! ([`seams::Guest`]) through the lifecycle NotCreated → Created → Running → Terminated, with
//! Invalid when cleanup fails (the diagram is in [`state`]). This crate does no I/O of its own:
//! every failure path is testable with the recording fakes in `uvm::testing` (feature `testing`).
//!
//! The table behind the diagram is [`state::plan`]: one function deciding, for every (state,
//! operation) pair, whether the operation is allowed and which state it leads to; the state
//! changes only through it (module `machine`).
//!
//! Disks and shares are kept by the device sub-controllers in [`devices`] (each machine one
//! table, like the VM's), driven through [`Controller::add_disk`], [`Controller::add_share`] and
//! their removals, and shown by [`Controller::devices`]; NICs and assigned PCI devices likewise
//! through [`Controller::add_nics`], [`Controller::add_pci_device`] and their removals, shown by
//! [`Controller::network`] and [`Controller::pci_devices`].
//!
//! Beyond hcsshim: [`Controller::state`] and [`Controller::stats`] never wait behind a long
//! operation; [`Controller::terminate_vm`] cancels an in-flight [`Controller::start_vm`]; every
//! guest-facing step has a deadline ([`Timeouts`]); the state carries a [`Reason`] and the guest
//! link its own [`seams::LinkHealth`].

#![warn(missing_docs)]

mod controller;
mod device_ops;
pub mod devices;
pub mod error;
mod files;
mod lifecycle;
mod machine;
pub mod seams;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;

pub use controller::{normalize_memory, Controller, ResourceSettings, Status, Timeouts};
pub use device_ops::Devices;
pub use devices::DeviceError;
pub use error::{
    error_chain, ControllerError, GuestError, GuestRequest, HostError, Rejection, SeamError,
};
pub use files::{check_guest_path, DEFAULT_COPY_LIMIT};
pub use machine::{ExitStatus, Transition, HISTORY_LEN};
pub use state::{plan, Operation, Plan, Reason, StartStep, State, VmExit};
