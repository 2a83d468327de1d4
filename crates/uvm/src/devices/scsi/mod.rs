//! The SCSI sub-controller: disks on slots (`controller × 64 + lun`) and their guest mounts.
//!
//! ```text
//!            attach ok             eject ok (last mount gone)     detach ok
//!  Reserved ──────────▶ Attached ───────────────────▶ Ejected ─────────▶ Detached
//!     │  │                 ▲ │ eject fails               ▲ │ detach fails
//!     │  │ attach fails    └─┘                           └─┘ (retryable)
//!     │  └───────────────────────────────────────────────────────────────▶ (terminal)
//!     └─ last reference gone, never attached ─────────────────────────────▶
//! ```
//!
//! Slots: the lowest free one is taken, and a slot is free again once its disk is Detached and
//! its last reservation gone; full is [`crate::DeviceError::NoAvailableSlots`]. Disks given at create
//! ([`ScsiController::reserve_cold`]) are born Attached at [`crate::seams::cold_disk_slot`], as the backend
//! attached them cold. The rules common to all sub-controllers are in [`crate::devices`].

use std::fmt;

use super::{MountInfo, Step};
use crate::seams::{DiskConfig, DiskMount, ScsiSlot};

mod controller;
pub use controller::ScsiController;

/// Where a disk is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskState {
    /// Has a slot; not attached yet.
    Reserved,
    /// Attached to the VM; mounts are made from here.
    Attached,
    /// The guest let go of it; the host has not removed it yet (a failed removal stays here).
    Ejected,
    /// Removed from the VM, or never attached (a failed attach). Terminal.
    Detached,
}

impl DiskState {
    /// Every state, for tables and tests.
    pub const ALL: [DiskState; 4] = [
        DiskState::Reserved,
        DiskState::Attached,
        DiskState::Ejected,
        DiskState::Detached,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskState::Reserved => "Reserved",
            DiskState::Attached => "Attached",
            DiskState::Ejected => "Ejected",
            DiskState::Detached => "Detached",
        }
    }
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskEvent {
    /// A new mount reserves on the existing disk.
    Reserve,
    /// Map: attach it to the VM.
    Attach,
    /// Unmap of its last mount: take it away (one step per call; repeated until it stays).
    Remove,
    /// The VM is terminating: take it away, failures tolerated.
    Teardown,
}

impl DiskEvent {
    /// Every event, for tables and tests.
    pub const ALL: [DiskEvent; 4] = [
        DiskEvent::Reserve,
        DiskEvent::Attach,
        DiskEvent::Remove,
        DiskEvent::Teardown,
    ];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            DiskEvent::Reserve => "reserve",
            DiskEvent::Attach => "attach",
            DiskEvent::Remove => "remove",
            DiskEvent::Teardown => "tear down",
        }
    }
}

/// The seam calls a disk's table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskCall {
    /// `HostDevices::attach_disk`.
    Attach,
    /// `GuestMounts::eject_disk`: the guest lets go before the host removes it.
    Eject,
    /// `HostDevices::detach_disk`.
    Detach,
}

impl DiskCall {
    const fn on_guest(self) -> bool {
        match self {
            DiskCall::Eject => true,
            DiskCall::Attach | DiskCall::Detach => false,
        }
    }
}

/// The disk table: every (state, event) pair, no wildcard.
pub const fn disk_step(state: DiskState, event: DiskEvent) -> Step<DiskState, DiskCall> {
    use DiskEvent as E;
    use DiskState as S;
    match event {
        E::Reserve => match state {
            S::Reserved | S::Attached => Step::Stay,
            // Going or gone: reserve again once its reservations drained.
            S::Ejected | S::Detached => Step::Refuse,
        },
        E::Attach => match state {
            S::Reserved => Step::Call {
                call: DiskCall::Attach,
                on_success: S::Attached,
                // Never attached: nothing to undo; its reservations drain through Unmap.
                on_failure: S::Detached,
            },
            S::Attached => Step::Stay,
            S::Ejected | S::Detached => Step::Refuse,
        },
        E::Remove => match state {
            S::Reserved => Step::Become(S::Detached),
            S::Attached => Step::Call {
                call: DiskCall::Eject,
                on_success: S::Ejected,
                on_failure: S::Attached,
            },
            S::Ejected => Step::Call {
                call: DiskCall::Detach,
                on_success: S::Detached,
                on_failure: S::Ejected,
            },
            S::Detached => Step::Stay,
        },
        E::Teardown => match state {
            S::Reserved => Step::Become(S::Detached),
            // The host removes it next in any case; a guest that cannot let go is going away.
            S::Attached => Step::Call {
                call: DiskCall::Eject,
                on_success: S::Ejected,
                on_failure: S::Ejected,
            },
            // The VM's release that follows removes whatever this could not.
            S::Ejected => Step::Call {
                call: DiskCall::Detach,
                on_success: S::Detached,
                on_failure: S::Detached,
            },
            S::Detached => Step::Stay,
        },
    }
}

/// A disk as [`ScsiController::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Its slot.
    pub slot: ScsiSlot,
    /// What the host attaches (the host path is `config.host_path`).
    pub config: DiskConfig,
    /// Its state.
    pub state: DiskState,
    /// Given at create (attached cold) rather than hot-added.
    pub cold: bool,
    /// Its mounts, by guest path.
    pub mounts: Vec<MountInfo<DiskMount>>,
}
