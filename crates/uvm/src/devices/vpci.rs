//! The vPCI sub-controller, in the manner of hcsshim's `internal/controller/device/vpci`: host
//! PCI devices assigned to the VM, driving [`HostPci`] and [`GuestPci`].
//!
//! ```text
//!           host add ok              guest sees it
//!  Reserved ───────────▶ HostAssigned ─────────────▶ Assigned ── last remove ──┐
//!     │  │ host add fails      │ guest wait fails                              │ host remove
//!     │  └─────────▶ Removed   ▼                                               │
//!     │                ▲   AssignedInvalid ◀────── host remove fails ──────────┘
//!     │                │        │ remove (retryable)
//!     └─ remove ───────┴────────┘ host remove ok
//! ```
//!
//! - **Reserve** (no I/O) by the device's host address: the same device returns the same
//!   reservation.
//! - **AddToVM** is reference-counted: the first plugs the device on the host and waits for the
//!   guest to see it; later ones only count. A host failure leaves nothing (Removed); a guest
//!   wait failure leaves the host side in place, AssignedInvalid, until a RemoveFromVM.
//! - **RemoveFromVM** drops a reference; at zero (or from AssignedInvalid, which holds none) it
//!   removes the device on the host. A host removal failure is AssignedInvalid; retrying the
//!   RemoveFromVM resumes. A reservation never added is only dropped.
//!
//! Where we differ from hcsshim: a failed host add is Removed (its reservation is over; a new
//! Reserve starts afresh) where hcsshim leaves it Reserved for a retry, so a failed add never
//! keeps a device reserved that nobody holds; and the host half and the guest half are two
//! table steps (HostAssigned between them), so a cancelled add is torn down on the host.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;

use super::{guest_call, host_call, refused, Deadlines, DeviceError, Reach, Step};
use crate::controller::lock;
use crate::seams::{GuestPci, HostPci, PciAddress, PciLocation};

/// Where an assigned device is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciState {
    /// Reserved; not on the VM.
    Reserved,
    /// Plugged on the host; the guest has not been seen to have it yet.
    HostAssigned,
    /// On the VM and seen by the guest; reference-counted.
    Assigned,
    /// Half there (the guest never saw it, or its host removal failed). Cleared by a remove.
    AssignedInvalid,
    /// Gone. Terminal.
    Removed,
}

impl PciState {
    /// Every state, for tables and tests.
    pub const ALL: [PciState; 5] = [
        PciState::Reserved,
        PciState::HostAssigned,
        PciState::Assigned,
        PciState::AssignedInvalid,
        PciState::Removed,
    ];

    /// The state's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            PciState::Reserved => "Reserved",
            PciState::HostAssigned => "HostAssigned",
            PciState::Assigned => "Assigned",
            PciState::AssignedInvalid => "AssignedInvalid",
            PciState::Removed => "Removed",
        }
    }
}

impl fmt::Display for PciState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to an assigned device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciEvent {
    /// AddToVM: plug it, then wait for the guest.
    Add,
    /// RemoveFromVM at its last reference.
    Remove,
    /// The VM is terminating.
    Teardown,
}

impl PciEvent {
    /// Every event, for tables and tests.
    pub const ALL: [PciEvent; 3] = [PciEvent::Add, PciEvent::Remove, PciEvent::Teardown];

    /// The event's name.
    pub const fn as_str(self) -> &'static str {
        match self {
            PciEvent::Add => "add",
            PciEvent::Remove => "remove",
            PciEvent::Teardown => "tear down",
        }
    }
}

/// The seam calls a device's table asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciCall {
    /// `HostPci::add_pci`.
    HostAdd,
    /// `GuestPci::wait_pci_device`.
    GuestWait,
    /// `HostPci::remove_pci`.
    HostRemove,
}

/// The vPCI table: every (state, event) pair, no wildcard.
pub const fn pci_step(state: PciState, event: PciEvent) -> Step<PciState, PciCall> {
    use PciEvent as E;
    use PciState as S;
    match event {
        E::Add => match state {
            S::Reserved => Step::Call {
                call: PciCall::HostAdd,
                on_success: S::HostAssigned,
                on_failure: S::Removed,
            },
            S::HostAssigned => Step::Call {
                call: PciCall::GuestWait,
                on_success: S::Assigned,
                on_failure: S::AssignedInvalid,
            },
            S::Assigned => Step::Stay,
            S::AssignedInvalid | S::Removed => Step::Refuse,
        },
        E::Remove | E::Teardown => match state {
            S::Reserved => Step::Become(S::Removed),
            S::HostAssigned | S::Assigned | S::AssignedInvalid => Step::Call {
                call: PciCall::HostRemove,
                on_success: S::Removed,
                on_failure: S::AssignedInvalid,
            },
            S::Removed => Step::Stay,
        },
    }
}

/// An assigned device as [`VpciController::snapshot`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciInfo {
    /// Its id in the VM (`pci<n>`), the reservation.
    pub id: String,
    /// Its host address.
    pub address: PciAddress,
    /// Where the guest finds it.
    pub location: PciLocation,
    /// Its state.
    pub state: PciState,
    /// AddToVM calls not yet matched by a RemoveFromVM.
    pub references: u32,
}

#[derive(Debug)]
struct Entry {
    address: PciAddress,
    location: PciLocation,
    state: PciState,
    pending: Option<PciState>,
    references: u32,
}

#[derive(Debug, Default)]
struct Books {
    devices: BTreeMap<String, Entry>,
    by_address: BTreeMap<PciAddress, String>,
    next_id: u64,
}

/// One VM's assigned PCI devices. Operations are serialised by the caller (the VM's device
/// lock); [`VpciController::snapshot`] never waits behind one.
#[derive(Debug)]
pub struct VpciController {
    books: Mutex<Books>,
    deadlines: Deadlines,
}

impl VpciController {
    /// No devices.
    pub fn new(deadlines: Deadlines) -> VpciController {
        VpciController {
            books: Mutex::new(Books::default()),
            deadlines,
        }
    }

    /// Reserve `address` (no I/O), found by the guest at `location` (the host's probe says
    /// where). The same device again returns the same reservation.
    pub fn reserve(&self, address: PciAddress, location: PciLocation) -> String {
        let mut b = lock(&self.books);
        if let Some(id) = b.by_address.get(&address) {
            return id.clone();
        }
        let id = format!("pci{}", b.next_id);
        b.next_id += 1;
        b.by_address.insert(address, id.clone());
        b.devices.insert(
            id.clone(),
            Entry {
                address,
                location,
                state: PciState::Reserved,
                pending: None,
                references: 0,
            },
        );
        id
    }

    /// The reservation of `address`, if any.
    pub fn reservation(&self, address: PciAddress) -> Option<String> {
        lock(&self.books).by_address.get(&address).cloned()
    }

    /// AddToVM: the first plugs the device and waits for the guest, later ones count. After an
    /// error the caller should [`VpciController::remove`] (an AssignedInvalid device needs it).
    ///
    /// # Errors
    /// [`DeviceError::UnknownDevice`] for an unknown id, [`DeviceError::WrongDeviceState`] for a device AssignedInvalid or Removed, or the failing
    /// step's error.
    pub async fn add(
        &self,
        id: &str,
        host: &dyn HostPci,
        guest: &dyn GuestPci,
    ) -> Result<(), DeviceError> {
        loop {
            let (state, address, location) = self.entry(id)?;
            let to = match pci_step(state, PciEvent::Add) {
                Step::Refuse => return Err(refused("PCI device", state.as_str(), "add")),
                Step::Stay => break,
                Step::Become(to) => to,
                Step::Call {
                    call,
                    on_success,
                    on_failure,
                } => {
                    self.set_pending(id, on_success);
                    match self.call(call, id, address, &location, host, guest).await {
                        Ok(()) => on_success,
                        Err(e) => {
                            self.commit(id, on_failure);
                            self.forget_if_removed(id);
                            return Err(e);
                        }
                    }
                }
            };
            self.commit(id, to);
        }
        if let Some(e) = lock(&self.books).devices.get_mut(id) {
            e.references += 1;
        }
        Ok(())
    }

    /// RemoveFromVM: drop a reference; at the last (or from AssignedInvalid) remove the device
    /// on the host. Retryable.
    ///
    /// # Errors
    /// [`DeviceError::UnknownDevice`], or the host's error (the device is AssignedInvalid).
    pub async fn remove(&self, id: &str, host: &dyn HostPci) -> Result<(), DeviceError> {
        {
            let mut b = lock(&self.books);
            let e = b
                .devices
                .get_mut(id)
                .ok_or_else(|| DeviceError::UnknownDevice { id: id.to_owned() })?;
            e.references = e.references.saturating_sub(1);
            if e.state == PciState::Assigned && e.references > 0 {
                return Ok(());
            }
        }
        self.walk_out(id, host, PciEvent::Remove).await
    }

    /// Teardown: every device removed on the host; failures logged, the books emptied.
    pub async fn teardown(&self, host: &dyn HostPci, reach: &mut Reach) {
        let ids: Vec<String> = lock(&self.books).devices.keys().cloned().collect();
        for id in ids {
            if !reach.host {
                continue;
            }
            if let Err(DeviceError::Host { step, source }) =
                self.walk_out(&id, host, PciEvent::Teardown).await
            {
                reach.host_failed(step, &source);
            }
        }
        let mut b = lock(&self.books);
        b.devices.clear();
        b.by_address.clear();
    }

    /// The devices now, by id.
    pub fn snapshot(&self) -> Vec<PciInfo> {
        lock(&self.books)
            .devices
            .iter()
            .map(|(id, e)| PciInfo {
                id: id.clone(),
                address: e.address,
                location: e.location,
                state: e.state,
                references: e.references,
            })
            .collect()
    }

    async fn walk_out(
        &self,
        id: &str,
        host: &dyn HostPci,
        event: PciEvent,
    ) -> Result<(), DeviceError> {
        loop {
            let (state, _, _) = match self.entry(id) {
                Ok(e) => e,
                Err(_) => return Ok(()),
            };
            let state = lock(&self.books)
                .devices
                .get(id)
                .and_then(|e| e.pending)
                .unwrap_or(state);
            let to = match pci_step(state, event) {
                Step::Refuse | Step::Stay => break,
                Step::Become(to) => to,
                Step::Call {
                    call: _,
                    on_success,
                    on_failure,
                } => match host_call(
                    "remove PCI device",
                    self.deadlines.host,
                    host.remove_pci(id),
                )
                .await
                {
                    Ok(()) => on_success,
                    Err(source) => {
                        self.commit(id, on_failure);
                        return Err(DeviceError::Host {
                            step: "remove PCI device",
                            source,
                        });
                    }
                },
            };
            self.commit(id, to);
        }
        self.forget_if_removed(id);
        Ok(())
    }

    fn entry(&self, id: &str) -> Result<(PciState, PciAddress, PciLocation), DeviceError> {
        lock(&self.books)
            .devices
            .get(id)
            .map(|e| (e.state, e.address, e.location))
            .ok_or_else(|| DeviceError::UnknownDevice { id: id.to_owned() })
    }

    fn set_pending(&self, id: &str, to: PciState) {
        if let Some(e) = lock(&self.books).devices.get_mut(id) {
            e.pending = Some(to);
        }
    }

    fn commit(&self, id: &str, to: PciState) {
        if let Some(e) = lock(&self.books).devices.get_mut(id) {
            e.state = to;
            e.pending = None;
        }
    }

    fn forget_if_removed(&self, id: &str) {
        let mut b = lock(&self.books);
        if b.devices
            .get(id)
            .is_some_and(|e| e.state == PciState::Removed)
        {
            if let Some(e) = b.devices.remove(id) {
                b.by_address.remove(&e.address);
            }
        }
    }

    async fn call(
        &self,
        call: PciCall,
        id: &str,
        address: PciAddress,
        location: &PciLocation,
        host: &dyn HostPci,
        guest: &dyn GuestPci,
    ) -> Result<(), DeviceError> {
        match call {
            PciCall::HostAdd => host_call(
                "add PCI device",
                self.deadlines.host,
                host.add_pci(id, address),
            )
            .await
            .map_err(|source| DeviceError::Host {
                step: "add PCI device",
                source,
            }),
            PciCall::GuestWait => guest_call(
                "wait for PCI device",
                self.deadlines.guest,
                guest.wait_pci_device(location),
            )
            .await
            .map_err(|source| DeviceError::Guest {
                step: "wait for PCI device",
                source,
            }),
            PciCall::HostRemove => host_call(
                "remove PCI device",
                self.deadlines.host,
                host.remove_pci(id),
            )
            .await
            .map_err(|source| DeviceError::Host {
                step: "remove PCI device",
                source,
            }),
        }
    }
}
