//! The share sub-controller: host directories shared into the guest under a tag, and their
//! guest mounts.
//!
//! ```text
//!            add ok                 remove ok (last mount gone)
//!  Reserved ───────▶ Added ─────────────────────────────▶ Removed (terminal)
//!     │ │              ▲ │ remove fails (retryable)          ▲  ▲
//!     │ │ add fails    └─┘                                   │  │
//!     │ └──────────▶ Invalid ── its last mount gone ─────────┘  │
//!     └─ last reference gone, never added ──────────────────────┘
//! ```
//!
//! Tags: a hot share gets `uvm-share-<n>`, `n` counting up per VM, so a tag is never reused
//! within a VM (a guest that still holds a stale mount of an old tag can never reach a new
//! share through it). Shares given at create ([`ShareController::reserve_cold`]) are born Added
//! under [`cold_share_tag`]. "No writable shares" refuses a writable share at Reserve. The rules
//! common to all sub-controllers are in [`crate::devices`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{
    check_host_path, check_mount_path, guest_call, host_call, join_mount, mount_step, refused,
    Deadlines, DeviceError, MountCall, MountEntry, MountEvent, MountInfo, MountPart, Reach,
    ShareReservation, Step,
};
use crate::controller::lock;
use crate::seams::{cold_share_tag, GuestMounts, HostDevices, ShareConfig, ShareMount};

/// Where a share is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareState {
    /// Has a tag; not added yet.
    Reserved,
    /// Added to the VM (its server runs); mounts are made from here.
    Added,
    /// The add failed: nothing is on the VM, but reservations remain to drain.
    Invalid,
    /// Removed from the VM, or drained after a failed add. Terminal.
    Removed,
}

impl ShareState {
    /// Every state, for tables and tests.
    pub const ALL: [ShareState; 4] = [
        ShareState::Reserved,
        ShareState::Added,
        ShareState::Invalid,
        ShareState::Removed,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ShareState::Reserved => "Reserved",
            ShareState::Added => "Added",
            ShareState::Invalid => "Invalid",
            ShareState::Removed => "Removed",
        }
    }
}

impl fmt::Display for ShareState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareEvent {
    /// A new mount reserves on the existing share.
    Reserve,
    /// Map: add it to the VM.
    Add,
    /// Unmap of its last mount: take it away.
    Remove,
    /// The VM is terminating: take it away, failures tolerated.
    Teardown,
}

impl ShareEvent {
    /// Every event, for tables and tests.
    pub const ALL: [ShareEvent; 4] = [
        ShareEvent::Reserve,
        ShareEvent::Add,
        ShareEvent::Remove,
        ShareEvent::Teardown,
    ];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            ShareEvent::Reserve => "reserve",
            ShareEvent::Add => "add",
            ShareEvent::Remove => "remove",
            ShareEvent::Teardown => "tear down",
        }
    }
}

/// The seam calls a share's table asks for (both on the host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareCall {
    /// `HostDevices::add_share`.
    Add,
    /// `HostDevices::remove_share`.
    Remove,
}

/// The share table: every (state, event) pair, no wildcard.
pub const fn share_step(state: ShareState, event: ShareEvent) -> Step<ShareState, ShareCall> {
    use ShareEvent as E;
    use ShareState as S;
    match event {
        E::Reserve => match state {
            S::Reserved | S::Added => Step::Stay,
            S::Invalid | S::Removed => Step::Refuse,
        },
        E::Add => match state {
            S::Reserved => Step::Call {
                call: ShareCall::Add,
                on_success: S::Added,
                on_failure: S::Invalid,
            },
            S::Added => Step::Stay,
            S::Invalid | S::Removed => Step::Refuse,
        },
        E::Remove => match state {
            S::Reserved | S::Invalid => Step::Become(S::Removed),
            S::Added => Step::Call {
                call: ShareCall::Remove,
                on_success: S::Removed,
                on_failure: S::Added,
            },
            S::Removed => Step::Stay,
        },
        E::Teardown => match state {
            S::Reserved | S::Invalid => Step::Become(S::Removed),
            // The VM's release that follows stops whatever serves it.
            S::Added => Step::Call {
                call: ShareCall::Remove,
                on_success: S::Removed,
                on_failure: S::Removed,
            },
            S::Removed => Step::Stay,
        },
    }
}

/// A share as [`ShareController::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareInfo {
    /// Its tag.
    pub tag: String,
    /// What the host shares (the host path is `config.host_path`).
    pub config: ShareConfig,
    /// Its state.
    pub state: ShareState,
    /// Given at create (added cold) rather than hot-added.
    pub cold: bool,
    /// Its mounts, by guest path.
    pub mounts: Vec<MountInfo<ShareMount>>,
}

#[derive(Debug)]
struct Share {
    config: ShareConfig,
    state: ShareState,
    pending: Option<ShareState>,
    cold: bool,
    mounts: BTreeMap<String, MountEntry<ShareMount>>,
}

#[derive(Debug, Clone)]
struct Held {
    tag: String,
    guest_path: String,
}

#[derive(Debug, Default)]
struct Books {
    no_writable: bool,
    shares: BTreeMap<String, Share>,
    by_path: HashMap<PathBuf, String>,
    reservations: BTreeMap<u64, Held>,
    next_id: u64,
    next_tag: u64,
}

impl Books {
    fn share(&self, tag: &str) -> Result<&Share, DeviceError> {
        self.shares.get(tag).ok_or(DeviceError::WrongDeviceState {
            what: "share",
            state: "gone",
            event: "use",
        })
    }
    fn held(&self, id: ShareReservation) -> Result<Held, DeviceError> {
        self.reservations
            .get(&id.0)
            .cloned()
            .ok_or(DeviceError::UnknownReservation {
                what: "share",
                id: id.0,
            })
    }
    fn mount_mut(&mut self, tag: &str, path: &str) -> Option<&mut MountEntry<ShareMount>> {
        self.shares
            .get_mut(tag)
            .and_then(|s| s.mounts.get_mut(path))
    }
}

/// The shares of one VM: tags, reservations, refcounts. See the module documentation.
#[derive(Debug)]
pub struct ShareController {
    books: Mutex<Books>,
    ops: tokio::sync::Mutex<()>,
    deadlines: Deadlines,
}

impl ShareController {
    /// A controller; `no_writable_shares` refuses writable shares at Reserve.
    pub fn new(no_writable_shares: bool, deadlines: Deadlines) -> ShareController {
        ShareController {
            books: Mutex::new(Books {
                no_writable: no_writable_shares,
                ..Books::default()
            }),
            ops: tokio::sync::Mutex::new(()),
            deadlines,
        }
    }

    /// Reserve a mount of `share` (no I/O). A read-only share is always mounted read-only.
    ///
    /// # Errors
    /// [`DeviceError::WritableShareRefused`] under "no writable shares",
    /// [`DeviceError::InvalidArgument`], [`DeviceError::ConfigMismatch`],
    /// [`DeviceError::GuestPathInUse`], or [`DeviceError::WrongDeviceState`] for a share or
    /// mount on its way out. Nothing was reserved then.
    pub fn reserve(
        &self,
        share: ShareConfig,
        mount: ShareMount,
    ) -> Result<ShareReservation, DeviceError> {
        self.reserve_at(share, mount, None)
    }

    /// Reserve the `index`-th share given at create, added cold under [`cold_share_tag`].
    ///
    /// # Errors
    /// As [`ShareController::reserve`]; a host path given twice is an invalid argument.
    pub fn reserve_cold(
        &self,
        index: usize,
        share: ShareConfig,
        mount: ShareMount,
    ) -> Result<ShareReservation, DeviceError> {
        self.reserve_at(share, mount, Some(cold_share_tag(index)))
    }

    fn reserve_at(
        &self,
        share: ShareConfig,
        mut mount: ShareMount,
        cold_tag: Option<String>,
    ) -> Result<ShareReservation, DeviceError> {
        check_host_path(&share.host_path)?;
        check_mount_path(&mount.guest_path)?;
        mount.read_only |= share.read_only;
        let mut b = lock(&self.books);
        if b.no_writable && !share.read_only {
            return Err(DeviceError::WritableShareRefused {
                host_path: share.host_path,
            });
        }
        let id = b.next_id;
        let path = mount.guest_path.clone();
        let taken_by_another = b.shares.values().any(|s| {
            s.config.host_path != share.host_path && s.mounts.contains_key(&mount.guest_path)
        });
        if taken_by_another {
            return Err(DeviceError::GuestPathInUse { guest_path: path });
        }
        let existing = b.by_path.get(&share.host_path).cloned();
        let tag = match (existing, cold_tag) {
            (Some(_), Some(_)) => {
                return Err(DeviceError::InvalidArgument {
                    what: "shares",
                    message: format!("{} is given twice", share.host_path.display()),
                })
            }
            (Some(tag), None) => {
                let s = b.shares.get_mut(&tag).ok_or(DeviceError::ConfigMismatch {
                    host_path: share.host_path.clone(),
                })?;
                join_share(s, &share, mount, id)?;
                tag
            }
            (None, cold) => {
                let (tag, state) = match cold {
                    Some(tag) => (tag, ShareState::Added),
                    None => {
                        let tag = format!("uvm-share-{}", b.next_tag);
                        b.next_tag += 1;
                        (tag, ShareState::Reserved)
                    }
                };
                b.by_path.insert(share.host_path.clone(), tag.clone());
                b.shares.insert(
                    tag.clone(),
                    Share {
                        config: share,
                        state,
                        pending: None,
                        cold: state == ShareState::Added,
                        mounts: BTreeMap::from([(path.clone(), MountEntry::reserved(mount, id))]),
                    },
                );
                tag
            }
        };
        b.reservations.insert(
            id,
            Held {
                tag,
                guest_path: path,
            },
        );
        b.next_id += 1;
        Ok(ShareReservation(id))
    }

    /// Add the reservation's share (if not yet), then mount it in the guest (if not yet).
    /// Returns the share's tag. After an error the caller must [`ShareController::unmap`].
    ///
    /// # Errors
    /// [`DeviceError::UnknownReservation`], [`DeviceError::WrongDeviceState`] (a share whose add
    /// failed, a mount that failed before), or the seam's error.
    pub async fn map(
        &self,
        id: ShareReservation,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<String, DeviceError> {
        let _op = self.ops.lock().await;
        let held = lock(&self.books).held(id)?;
        self.share_once(&held.tag, ShareEvent::Add, host).await?;
        self.mount_once(&held, MountEvent::Mount, host, guest)
            .await?;
        Ok(held.tag)
    }

    /// Drop the reservation: at its mount's last reference unmount it in the guest, at the
    /// share's last mount remove it from the VM. Retryable, as [`super::scsi::ScsiController::unmap`].
    ///
    /// # Errors
    /// [`DeviceError::UnknownReservation`], or the failing step's seam error.
    pub async fn unmap(
        &self,
        id: ShareReservation,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<(), DeviceError> {
        let _op = self.ops.lock().await;
        let held = lock(&self.books).held(id)?;
        let part = {
            let b = lock(&self.books);
            let mount = b
                .shares
                .get(&held.tag)
                .and_then(|s| s.mounts.get(&held.guest_path));
            MountPart::of(mount.map(|m| &m.holders), id.0)
        };
        match part {
            MountPart::Shared => {
                let mut b = lock(&self.books);
                if let Some(m) = b.mount_mut(&held.tag, &held.guest_path) {
                    m.holders.remove(&id.0);
                }
                b.reservations.remove(&id.0);
                return Ok(());
            }
            MountPart::Last => {
                while self
                    .mount_once(&held, MountEvent::Unmount, host, guest)
                    .await?
                {}
                if let Some(s) = lock(&self.books).shares.get_mut(&held.tag) {
                    s.mounts.remove(&held.guest_path);
                }
            }
            MountPart::Done => {}
        }
        let unused = lock(&self.books)
            .share(&held.tag)
            .map(|s| s.mounts.is_empty())
            .unwrap_or(false);
        if unused {
            while self.share_once(&held.tag, ShareEvent::Remove, host).await? {}
            let mut b = lock(&self.books);
            if let Some(s) = b.shares.remove(&held.tag) {
                b.by_path.remove(&s.config.host_path);
            }
        }
        lock(&self.books).reservations.remove(&id.0);
        Ok(())
    }

    /// Teardown, guest side: unmount every mount that may be there. Failures are logged and
    /// swallowed; once the guest is found gone its calls are skipped.
    pub async fn teardown_guest(&self, guest: &dyn GuestMounts, reach: &mut Reach) {
        let _op = self.ops.lock().await;
        let mounts: Vec<(String, String)> = lock(&self.books)
            .shares
            .iter()
            .flat_map(|(tag, s)| s.mounts.keys().map(|p| (tag.clone(), p.clone())))
            .collect();
        for (tag, path) in mounts {
            loop {
                let Some(state) = lock(&self.books)
                    .mount_mut(&tag, &path)
                    .map(|m| m.teardown_state())
                else {
                    break;
                };
                let to = match mount_step(state, MountEvent::Teardown) {
                    Step::Refuse | Step::Stay => break,
                    Step::Become(to) => to,
                    Step::Call {
                        call: MountCall::Mount,
                        on_failure,
                        ..
                    } => on_failure,
                    Step::Call {
                        call: MountCall::Unmount,
                        on_success,
                        on_failure,
                    } => {
                        if !reach.guest {
                            on_failure
                        } else {
                            let dl = self.deadlines.guest;
                            match guest_call("unmount share", dl, guest.unmount_share(&path)).await
                            {
                                Ok(()) => on_success,
                                Err(e) => {
                                    reach.guest_failed("unmount share", &e);
                                    on_failure
                                }
                            }
                        }
                    }
                };
                if let Some(m) = lock(&self.books).mount_mut(&tag, &path) {
                    m.state = to;
                    m.pending = None;
                }
            }
        }
        for s in lock(&self.books).shares.values_mut() {
            s.mounts.clear();
        }
    }

    /// Teardown, host side: remove every share that may be added, then forget them all.
    /// Failures are logged and swallowed; once the VM is found gone its calls are skipped.
    pub async fn teardown_host(&self, host: &dyn HostDevices, reach: &mut Reach) {
        let _op = self.ops.lock().await;
        let tags: Vec<String> = lock(&self.books).shares.keys().cloned().collect();
        for tag in tags {
            self.teardown_share(&tag, host, reach).await;
        }
        let mut b = lock(&self.books);
        b.shares.clear();
        b.by_path.clear();
        b.reservations.clear();
    }

    async fn teardown_share(&self, tag: &str, host: &dyn HostDevices, reach: &mut Reach) {
        loop {
            let Some(state) = lock(&self.books)
                .shares
                .get(tag)
                .map(|s| s.pending.unwrap_or(s.state))
            else {
                return;
            };
            let to = match share_step(state, ShareEvent::Teardown) {
                Step::Refuse | Step::Stay => return,
                Step::Become(to) => to,
                Step::Call {
                    call,
                    on_success,
                    on_failure,
                } => {
                    if !reach.host {
                        on_failure
                    } else {
                        match self.share_call(call, tag, host).await {
                            Ok(()) => on_success,
                            Err(DeviceError::Host { step, source }) => {
                                reach.host_failed(step, &source);
                                on_failure
                            }
                            Err(e) => {
                                tracing::warn!(error = %crate::error_chain(&e), "teardown step failed");
                                on_failure
                            }
                        }
                    }
                }
            };
            if let Some(s) = lock(&self.books).shares.get_mut(tag) {
                s.state = to;
                s.pending = None;
            }
        }
    }

    /// The shares now, by tag, with their mounts. Never waits behind a Map or Unmap.
    pub fn snapshot(&self) -> Vec<ShareInfo> {
        lock(&self.books)
            .shares
            .iter()
            .map(|(tag, s)| ShareInfo {
                tag: tag.clone(),
                config: s.config.clone(),
                state: s.state,
                cold: s.cold,
                mounts: s.mounts.values().map(MountInfo::from).collect(),
            })
            .collect()
    }

    /// Whether `id` is a live reservation of `share` mounted as `mount` (read-only forced as
    /// [`ShareController::reserve`] forces it).
    pub fn holds(&self, id: ShareReservation, share: &ShareConfig, mount: &ShareMount) -> bool {
        let mut mount = mount.clone();
        mount.read_only |= share.read_only;
        let b = lock(&self.books);
        let Ok(held) = b.held(id) else {
            return false;
        };
        b.shares.get(&held.tag).is_some_and(|s| {
            s.config == *share
                && s.mounts
                    .get(&held.guest_path)
                    .is_some_and(|m| m.config == mount && m.holders.contains(&id.0))
        })
    }

    /// Whether any share has a mount (in any state) at `guest_path`.
    pub fn has_mount_at(&self, guest_path: &str) -> bool {
        lock(&self.books)
            .shares
            .values()
            .any(|s| s.mounts.contains_key(guest_path))
    }

    async fn share_once(
        &self,
        tag: &str,
        event: ShareEvent,
        host: &dyn HostDevices,
    ) -> Result<bool, DeviceError> {
        let state = lock(&self.books).share(tag)?.state;
        let (to, result) = match share_step(state, event) {
            Step::Refuse => return Err(refused("share", state.as_str(), event.as_str())),
            Step::Stay => return Ok(false),
            Step::Become(to) => (to, Ok(true)),
            Step::Call {
                call,
                on_success,
                on_failure,
            } => {
                if let Some(s) = lock(&self.books).shares.get_mut(tag) {
                    s.pending = Some(on_success);
                }
                match self.share_call(call, tag, host).await {
                    Ok(()) => (on_success, Ok(true)),
                    Err(e) => (on_failure, Err(e)),
                }
            }
        };
        if let Some(s) = lock(&self.books).shares.get_mut(tag) {
            s.state = to;
            s.pending = None;
        }
        result
    }

    async fn share_call(
        &self,
        call: ShareCall,
        tag: &str,
        host: &dyn HostDevices,
    ) -> Result<(), DeviceError> {
        let dl = self.deadlines.host;
        match call {
            ShareCall::Add => {
                let config = lock(&self.books).share(tag)?.config.clone();
                host_call("add share", dl, host.add_share(tag, &config))
                    .await
                    .map_err(|source| DeviceError::Host {
                        step: "add share",
                        source,
                    })
            }
            ShareCall::Remove => host_call("remove share", dl, host.remove_share(tag))
                .await
                .map_err(|source| DeviceError::Host {
                    step: "remove share",
                    source,
                }),
        }
    }

    async fn mount_once(
        &self,
        held: &Held,
        event: MountEvent,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<bool, DeviceError> {
        let (state, config) =
            {
                let b = lock(&self.books);
                let m = b.share(&held.tag)?.mounts.get(&held.guest_path).ok_or(
                    DeviceError::NotFound {
                        what: "share",
                        guest_path: held.guest_path.clone(),
                    },
                )?;
                (m.state, m.config.clone())
            };
        let (to, result) = match mount_step(state, event) {
            Step::Refuse => return Err(refused("mount", state.as_str(), event.as_str())),
            Step::Stay => return Ok(false),
            Step::Become(to) => (to, Ok(true)),
            Step::Call {
                call,
                on_success,
                on_failure,
            } => {
                if let Some(m) = lock(&self.books).mount_mut(&held.tag, &held.guest_path) {
                    m.pending = Some(on_success);
                }
                let dl = self.deadlines.guest;
                let on_guest =
                    |step: &'static str| move |source| DeviceError::Guest { step, source };
                let r = match call {
                    MountCall::Mount => {
                        let transport = host.share_transport(&held.tag);
                        guest_call(
                            "mount share",
                            dl,
                            guest.mount_share(&held.tag, transport, &config),
                        )
                        .await
                        .map_err(on_guest("mount share"))
                    }
                    MountCall::Unmount => {
                        guest_call("unmount share", dl, guest.unmount_share(&held.guest_path))
                            .await
                            .map_err(on_guest("unmount share"))
                    }
                };
                match r {
                    Ok(()) => (on_success, Ok(true)),
                    Err(e) => (on_failure, Err(e)),
                }
            }
        };
        if let Some(m) = lock(&self.books).mount_mut(&held.tag, &held.guest_path) {
            m.state = to;
            m.pending = None;
        }
        result
    }
}

/// Adds reservation `id` on the existing share `s` as `mount`, if the tables allow.
fn join_share(
    s: &mut Share,
    share: &ShareConfig,
    mount: ShareMount,
    id: u64,
) -> Result<(), DeviceError> {
    if s.config != *share {
        return Err(DeviceError::ConfigMismatch {
            host_path: share.host_path.clone(),
        });
    }
    match share_step(s.state, ShareEvent::Reserve) {
        Step::Refuse => return Err(refused("share", s.state.as_str(), "reserve")),
        Step::Stay | Step::Become(_) | Step::Call { .. } => {}
    }
    let path = mount.guest_path.clone();
    join_mount(&mut s.mounts, path, mount, id)
}
