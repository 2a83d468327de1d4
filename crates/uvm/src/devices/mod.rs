//! The device sub-controllers: disks on SCSI slots ([`scsi`]) and shared directories
//! ([`shares`]), in the manner of hcsshim's `internal/controller/device/{scsi,plan9}`; and the
//! network ([`network`], hcsshim's `internal/controller/network`) and assigned PCI devices
//! ([`vpci`], its `device/vpci`), whose own semantics are in their modules. What follows is
//! the disks' and shares'.
//!
//! Each keeps books (no I/O) and drives the seams ([`crate::seams::HostDevices`],
//! [`crate::seams::GuestMounts`]) through three calls:
//!
//! - **Reserve** does no I/O and returns a reservation id. The same host path with the same
//!   configuration refers to the existing disk or share (another reference); with a different
//!   configuration it is [`DeviceError::ConfigMismatch`]. A mount is named by its guest path: the
//!   same guest path with the same device and mount configuration is another reference on that
//!   mount, anything else there is [`DeviceError::GuestPathInUse`].
//! - **Map** attaches on the host, then mounts in the guest. Idempotent: what is done already is
//!   skipped. A caller must Unmap after a failed Map; that Unmap cleans up.
//! - **Unmap** unmounts in the guest (at the mount's last reference), then removes on the host
//!   (at the device's last mount). Retryable: the reservation is dropped last, so a retry resumes
//!   where the failure was. Unmapping a reservation that was never mapped only drops the
//!   reference.
//!
//! Every state machine — disk ([`scsi::disk_step`]), share ([`shares::share_step`]) and mount
//! ([`mount_step`], the same machine for disk mounts and share mounts) — is one table function
//! with no wildcard arm, returning a [`Step`]; the books change state only through the step a
//! table gives. Refcounts live outside the tables: a mount goes through its table only at its
//! last reference, a device only at its last mount.
//!
//! **Cancellation.** Map, Unmap and teardown may be dropped at any await (the VM controller does
//! so when a terminate races a device operation). Before a seam call the entity records the state
//! the call would lead to as *pending*; teardown treats a pending entity as if the call had
//! succeeded, and every teardown call is harmless on something that is not there.
//!
//! **Where we differ from hcsshim, and why.**
//! - Mounts are keyed by the caller's guest path, not by partition with a generated path: our
//!   callers (the CLI, the API) name where a disk or share goes. Two mounts of one disk are two
//!   guest paths; the disk stays attached until both are gone.
//! - A disk whose last reference goes while still Reserved (never attached) frees its slot; in
//!   hcsshim it stays Reserved and keeps the slot. After a failed attach the slot is freed only
//!   when the *last* reservation drains (hcsshim frees it at the first, leaving the others
//!   pointing at a freed slot).
//! - A mount that failed (Unmounted) is drained by Unmap like a Reserved one; in hcsshim's SCSI
//!   mount an Unmap there is an error, so a failed guest mount could never be cleaned up.
//! - A mount remembers which reservations hold it (not just how many), so a retried Unmap never
//!   drops someone else's reference.
//! - Operations do not hold one mutex across their I/O for readers: the books sit behind a short
//!   lock ([`scsi::ScsiController::snapshot`] never waits behind an attach), and Map/Unmap are
//!   serialised by a separate async lock.
//! - Teardown (for a terminating VM) is a fourth event of each table: guest steps first, then
//!   host steps, every failure logged and swallowed, and once the guest or the host is found gone
//!   its remaining calls are skipped.
//! - Read-only devices force read-only mounts (hcsshim leaves that to the caller).
//! - A share may have several mounts (one per guest path), as a disk may; hcsshim's plan9 share
//!   has one. virtio-fs mounts one tag many times; over 9p the guest may refuse a second mount of
//!   a tag, which comes back as the guest's typed refusal.
//! - Disks given at create are born Attached, shares Added (the backend plugged them cold), so
//!   Map only mounts them; hcsshim reserves the rootfs slot only, with `ReserveForRootfs`.

pub mod network;
pub mod scsi;
pub mod shares;
pub mod vpci;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{GuestError, HostError, Rejection};

/// What one step of a device state machine does from a state, for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<S, C> {
    /// Not allowed in this state: the caller gets [`DeviceError::WrongDeviceState`].
    Refuse,
    /// Nothing to do (done already, or not this machine's business yet).
    Stay,
    /// No I/O needed: the state becomes this.
    Become(S),
    /// Make the seam call `call`; the state becomes `on_success` or `on_failure`.
    Call {
        /// The seam call to make.
        call: C,
        /// The state after the call succeeded.
        on_success: S,
        /// The state after the call failed.
        on_failure: S,
    },
}

/// Where a guest mount is in its life (disk mounts and share mounts alike).
///
/// ```text
///            mount ok
///  Reserved ─────────▶ Mounted ──unmount ok──▶ Unmounted
///     │                  ▲ │                      ▲
///     │ mount fails      └─┘ unmount fails        │
///     └───────────────────────────────────────────┘ (also: last reference, never mounted)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MountState {
    /// Reserved; the guest has not been asked to mount it.
    Reserved,
    /// Mounted in the guest.
    Mounted,
    /// Not mounted and never again (unmounted, or the mount failed). Terminal.
    Unmounted,
}

impl MountState {
    /// Every state, for tables and tests.
    pub const ALL: [MountState; 3] = [
        MountState::Reserved,
        MountState::Mounted,
        MountState::Unmounted,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            MountState::Reserved => "Reserved",
            MountState::Mounted => "Mounted",
            MountState::Unmounted => "Unmounted",
        }
    }
}

impl fmt::Display for MountState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MountEvent {
    /// Another reservation takes a reference on the existing mount.
    Reserve,
    /// Map: mount it in the guest.
    Mount,
    /// Unmap of the last reference: unmount it in the guest.
    Unmount,
    /// The VM is terminating: unmount whatever may be mounted, failures tolerated.
    Teardown,
}

impl MountEvent {
    /// Every event, for tables and tests.
    pub const ALL: [MountEvent; 4] = [
        MountEvent::Reserve,
        MountEvent::Mount,
        MountEvent::Unmount,
        MountEvent::Teardown,
    ];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            MountEvent::Reserve => "reserve",
            MountEvent::Mount => "mount",
            MountEvent::Unmount => "unmount",
            MountEvent::Teardown => "tear down",
        }
    }
}

/// The guest calls a mount's table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MountCall {
    /// `GuestMounts::mount_disk` / `mount_share`.
    Mount,
    /// `GuestMounts::unmount_disk` / `unmount_share`.
    Unmount,
}

/// The mount table (disk mounts and share mounts): every (state, event) pair, no wildcard.
pub const fn mount_step(state: MountState, event: MountEvent) -> Step<MountState, MountCall> {
    use MountEvent as E;
    use MountState as S;
    match event {
        E::Reserve => match state {
            S::Reserved | S::Mounted => Step::Stay,
            // A failed or finished mount takes no new references: reserve again once it drained.
            S::Unmounted => Step::Refuse,
        },
        E::Mount => match state {
            S::Reserved => Step::Call {
                call: MountCall::Mount,
                on_success: S::Mounted,
                // Nothing was mounted: the mount is over; Unmap drains it.
                on_failure: S::Unmounted,
            },
            S::Mounted => Step::Stay,
            S::Unmounted => Step::Refuse,
        },
        E::Unmount => match state {
            S::Reserved => Step::Become(S::Unmounted),
            // A failed unmount (busy) stays mounted: the caller retries.
            S::Mounted => Step::Call {
                call: MountCall::Unmount,
                on_success: S::Unmounted,
                on_failure: S::Mounted,
            },
            S::Unmounted => Step::Stay,
        },
        E::Teardown => match state {
            S::Reserved => Step::Become(S::Unmounted),
            // The VM goes away next: a mount it could not unmount goes with it.
            S::Mounted => Step::Call {
                call: MountCall::Unmount,
                on_success: S::Unmounted,
                on_failure: S::Unmounted,
            },
            S::Unmounted => Step::Stay,
        },
    }
}

/// A reservation of a disk mount, from [`scsi::ScsiController::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskReservation(pub(crate) u64);

/// A reservation of a share mount, from [`shares::ShareController::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShareReservation(pub(crate) u64);

impl fmt::Display for DiskReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "disk reservation {}", self.0)
    }
}

impl fmt::Display for ShareReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "share reservation {}", self.0)
    }
}

/// The deadlines of the seam calls a sub-controller makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// One host call (attach, detach, add, remove).
    pub host: Duration,
    /// One guest call (mount, unmount, eject).
    pub guest: Duration,
}

/// Why a device request failed. Nothing was left half-done that the books do not show.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An argument is wrong before anything is looked at.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// The argument at fault.
        what: &'static str,
        /// Why it is wrong.
        message: String,
    },
    /// Every SCSI slot is taken.
    #[error("no free SCSI slot: all {capacity} are taken")]
    NoAvailableSlots {
        /// How many slots the VM has.
        capacity: u32,
    },
    /// The host path is attached or shared already, with another configuration.
    #[error("{} is in use with a different configuration", host_path.display())]
    ConfigMismatch {
        /// The host path.
        host_path: PathBuf,
    },
    /// Something else is (or is being) mounted at the guest path.
    #[error("guest path {guest_path} is in use by another mount")]
    GuestPathInUse {
        /// The guest path.
        guest_path: String,
    },
    /// The VM was created with "no writable shares".
    #[error("writable share of {} refused: this VM takes read-only shares only", host_path.display())]
    WritableShareRefused {
        /// The host directory.
        host_path: PathBuf,
    },
    /// The device or mount is in a state where the request cannot be done (e.g. mapping a mount
    /// whose guest mount failed: unmap it, then reserve again).
    #[error("cannot {event} the {what}: it is {state}")]
    WrongDeviceState {
        /// `disk`, `share` or `mount`.
        what: &'static str,
        /// Its state's name.
        state: &'static str,
        /// What was asked.
        event: &'static str,
    },
    /// No such reservation (never made, or unmapped already).
    #[error("no {what} reservation {id}")]
    UnknownReservation {
        /// `disk` or `share`.
        what: &'static str,
        /// The id.
        id: u64,
    },
    /// Nothing of this kind is mounted at the guest path.
    #[error("no {what} is mounted at {guest_path}")]
    NotFound {
        /// `disk` or `share`.
        what: &'static str,
        /// The guest path asked for.
        guest_path: String,
    },
    /// No NIC has this id.
    #[error("no NIC {id}")]
    UnknownNic {
        /// The id asked for.
        id: String,
    },
    /// No assigned PCI device has this id.
    #[error("no PCI device {id}")]
    UnknownDevice {
        /// The id asked for.
        id: String,
    },
    /// A teardown went through everything but some of it failed.
    #[error("{what}: {failures} step(s) failed")]
    Incomplete {
        /// What was torn down.
        what: &'static str,
        /// How many parts failed.
        failures: usize,
        /// The first failure.
        #[source]
        first: Box<DeviceError>,
    },
    /// A host call failed.
    #[error("{step} failed on the host")]
    Host {
        /// The step (`attach disk`, …).
        step: &'static str,
        /// What the backend said.
        #[source]
        source: HostError,
    },
    /// A guest call failed.
    #[error("{step} failed in the guest")]
    Guest {
        /// The step (`mount disk`, …).
        step: &'static str,
        /// What the guest link said.
        #[source]
        source: GuestError,
    },
}

/// The guest paths a mount may not cover: the guest's own pseudo-filesystems. The agent checks
/// this too (and more: its own files); checking here refuses before any I/O.
const RESERVED_GUEST_PATHS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Checks a mount's guest path: as [`crate::check_guest_path`], and not `/proc`, `/sys`, `/dev`
/// or below.
pub(crate) fn check_mount_path(path: &str) -> Result<(), DeviceError> {
    let invalid = |message: String| DeviceError::InvalidArgument {
        what: "guest path",
        message,
    };
    if let Some(message) = crate::files::guest_path_problem(path) {
        return Err(invalid(message));
    }
    for reserved in RESERVED_GUEST_PATHS {
        let below = path
            .strip_prefix(reserved)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
        if below {
            return Err(invalid(format!("{path} is on the guest's {reserved}")));
        }
    }
    Ok(())
}

pub(crate) fn check_host_path(path: &std::path::Path) -> Result<(), DeviceError> {
    if path.is_absolute() {
        return Ok(());
    }
    Err(DeviceError::InvalidArgument {
        what: "host path",
        message: format!("{} is not absolute", path.display()),
    })
}

/// A guest mount in the books: its configuration, state and the reservations holding it.
#[derive(Debug, Clone)]
pub(crate) struct MountEntry<M> {
    pub(crate) config: M,
    pub(crate) state: MountState,
    /// The state an interrupted call would have led to; see the module documentation.
    pub(crate) pending: Option<MountState>,
    /// The reservations holding this mount: its refcount.
    pub(crate) holders: BTreeSet<u64>,
}

impl<M> MountEntry<M> {
    pub(crate) fn reserved(config: M, holder: u64) -> MountEntry<M> {
        MountEntry {
            config,
            state: MountState::Reserved,
            pending: None,
            holders: BTreeSet::from([holder]),
        }
    }

    /// The state teardown starts from: a pending call counts as done.
    pub(crate) fn teardown_state(&self) -> MountState {
        self.pending.unwrap_or(self.state)
    }
}

/// What Unmap does with a reservation's mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MountPart {
    /// Other reservations hold it too: only this reference goes.
    Shared,
    /// This is its last reference: unmount it.
    Last,
    /// This reservation no longer holds it (a retry after the mount part was done).
    Done,
}

impl MountPart {
    pub(crate) fn of(holders: Option<&BTreeSet<u64>>, id: u64) -> MountPart {
        match holders {
            Some(h) if h.contains(&id) && h.len() > 1 => MountPart::Shared,
            Some(h) if h.contains(&id) => MountPart::Last,
            Some(_) | None => MountPart::Done,
        }
    }
}

/// Whether teardown can still reach each side; once a side is found gone, its remaining calls
/// are skipped (each would only wait for its deadline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// The guest answers.
    pub guest: bool,
    /// The VM process is there.
    pub host: bool,
}

impl Reach {
    /// Notes a guest failure during teardown.
    pub(crate) fn guest_failed(&mut self, what: &str, e: &GuestError) {
        match e {
            GuestError::Rejected { kind, .. } => {
                let kind: Rejection = *kind;
                tracing::warn!(what, ?kind, error = %crate::error_chain(e), "teardown: the guest refused; going on");
            }
            GuestError::Unsupported { .. }
            | GuestError::NotConnected
            | GuestError::ConnectionLost
            | GuestError::Protocol { .. }
            | GuestError::Timeout { .. }
            | GuestError::Io { .. } => {
                tracing::warn!(what, error = %crate::error_chain(e), "teardown: the guest is gone; skipping its other steps");
                self.guest = false;
            }
        }
    }

    /// Notes a host failure during teardown.
    pub(crate) fn host_failed(&mut self, what: &str, e: &HostError) {
        match e {
            HostError::Gone | HostError::Timeout { .. } | HostError::Unsupported { .. } => {
                tracing::warn!(what, error = %crate::error_chain(e), "teardown: the host VM is gone; skipping its other steps");
                self.host = false;
            }
            HostError::InvalidInput { .. }
            | HostError::NotFound { .. }
            | HostError::Failed { .. }
            | HostError::Io { .. } => {
                tracing::warn!(what, error = %crate::error_chain(e), "teardown: a host step failed; going on");
            }
        }
    }
}

/// Runs a host call under `after`.
pub(crate) async fn host_call<T>(
    step: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, HostError>>,
) -> Result<T, HostError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(HostError::Timeout {
            operation: step,
            after,
        }),
    }
}

/// Runs a guest call under `after`.
pub(crate) async fn guest_call<T>(
    step: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, GuestError>>,
) -> Result<T, GuestError> {
    crate::controller::with_deadline(step, after, fut).await
}

/// The refusal for a table's [`Step::Refuse`].
/// Adds reservation `id` as `mount` at its guest path among a device's `mounts`: another
/// reference on the same mount there, a new reserved one, or `GuestPathInUse` for a different
/// mount there — as the mount table allows.
pub(crate) fn join_mount<M: PartialEq>(
    mounts: &mut BTreeMap<String, MountEntry<M>>,
    path: String,
    mount: M,
    id: u64,
) -> Result<(), DeviceError> {
    match mounts.get_mut(&path) {
        Some(m) if m.config != mount => Err(DeviceError::GuestPathInUse { guest_path: path }),
        Some(m) => match mount_step(m.state, MountEvent::Reserve) {
            Step::Refuse => Err(refused("mount", m.state.as_str(), "reserve")),
            Step::Stay | Step::Become(_) | Step::Call { .. } => {
                m.holders.insert(id);
                Ok(())
            }
        },
        None => {
            mounts.insert(path, MountEntry::reserved(mount, id));
            Ok(())
        }
    }
}

pub(crate) fn refused(what: &'static str, state: &'static str, event: &'static str) -> DeviceError {
    DeviceError::WrongDeviceState { what, state, event }
}

/// A guest mount as [`scsi::DiskInfo`] and [`shares::ShareInfo`] show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo<M> {
    /// Where and how it is mounted (the guest path is `config.guest_path`).
    pub config: M,
    /// Its state.
    pub state: MountState,
    /// How many reservations hold it.
    pub references: usize,
}

impl<M: Clone> From<&MountEntry<M>> for MountInfo<M> {
    fn from(m: &MountEntry<M>) -> Self {
        MountInfo {
            config: m.config.clone(),
            state: m.state,
            references: m.holders.len(),
        }
    }
}
