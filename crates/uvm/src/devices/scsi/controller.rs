//! [`ScsiController`]: the books of one VM's disks and the drivers of their tables.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;

use super::{disk_step, DiskCall, DiskEvent, DiskInfo, DiskState};
use crate::controller::lock;
use crate::devices::{
    check_host_path, check_mount_path, guest_call, host_call, join_mount, mount_step, refused,
    Deadlines, DeviceError, DiskReservation, MountCall, MountEntry, MountEvent, MountInfo,
    MountPart, Reach, Step,
};
use crate::seams::{cold_disk_slot, DiskConfig, DiskMount, GuestMounts, HostDevices, ScsiSlot};

#[derive(Debug)]
struct Disk {
    slot: ScsiSlot,
    config: DiskConfig,
    state: DiskState,
    /// The state an interrupted call would have led to; see [`crate::devices`].
    pending: Option<DiskState>,
    cold: bool,
    mounts: BTreeMap<String, MountEntry<DiskMount>>,
}

/// What a reservation holds: a mount of the disk at a slot.
#[derive(Debug, Clone)]
struct Held {
    index: u32,
    guest_path: String,
}

#[derive(Debug, Default)]
struct Books {
    /// Hot-pluggable slots: controllers × 64.
    capacity: u32,
    disks: BTreeMap<u32, Disk>,
    by_path: HashMap<PathBuf, u32>,
    reservations: BTreeMap<u64, Held>,
    next_id: u64,
}

impl Books {
    fn disk(&self, index: u32) -> Result<&Disk, DeviceError> {
        self.disks.get(&index).ok_or(DeviceError::WrongDeviceState {
            what: "disk",
            state: "gone",
            event: "use",
        })
    }
    fn disk_mut(&mut self, index: u32) -> Option<&mut Disk> {
        self.disks.get_mut(&index)
    }
    fn held(&self, id: DiskReservation) -> Result<Held, DeviceError> {
        self.reservations
            .get(&id.0)
            .cloned()
            .ok_or(DeviceError::UnknownReservation {
                what: "disk",
                id: id.0,
            })
    }
}

/// Where a new disk goes.
enum Place {
    /// The lowest free slot.
    Hot,
    /// At create: this slot, attached already.
    Cold(ScsiSlot),
}

/// Which teardown calls a pass makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Guest,
    Host,
}

/// The SCSI disks of one VM: slots, reservations, refcounts. See the module documentation.
#[derive(Debug)]
pub struct ScsiController {
    books: Mutex<Books>,
    /// Serialises Map, Unmap and teardown; Reserve and snapshots only take `books`, briefly.
    ops: tokio::sync::Mutex<()>,
    deadlines: Deadlines,
}

impl ScsiController {
    /// A controller for a VM with `controllers` SCSI controllers (64 hot slots each).
    pub fn new(controllers: u8, deadlines: Deadlines) -> ScsiController {
        ScsiController {
            books: Mutex::new(Books {
                capacity: u32::from(controllers) * ScsiSlot::LUNS_PER_CONTROLLER,
                ..Books::default()
            }),
            ops: tokio::sync::Mutex::new(()),
            deadlines,
        }
    }

    /// Reserve a mount of `disk` (no I/O). A read-only disk is always mounted read-only.
    ///
    /// # Errors
    /// [`DeviceError::InvalidArgument`] for a relative host path or a bad guest path,
    /// [`DeviceError::ConfigMismatch`] for a host path in use with another configuration,
    /// [`DeviceError::GuestPathInUse`], [`DeviceError::NoAvailableSlots`], or
    /// [`DeviceError::WrongDeviceState`] for a disk or mount on its way out. Nothing was
    /// reserved then.
    pub fn reserve(
        &self,
        disk: DiskConfig,
        mount: DiskMount,
    ) -> Result<DiskReservation, DeviceError> {
        self.reserve_at(disk, mount, Place::Hot)
    }

    /// Reserve the `index`-th disk given at create, attached cold at [`cold_disk_slot`]`(index)`.
    ///
    /// # Errors
    /// As [`ScsiController::reserve`]; a host path given twice is an invalid argument.
    pub fn reserve_cold(
        &self,
        index: usize,
        disk: DiskConfig,
        mount: DiskMount,
    ) -> Result<DiskReservation, DeviceError> {
        let slot = cold_disk_slot(index).ok_or_else(|| DeviceError::InvalidArgument {
            what: "disks",
            message: format!("disk {index} is past the last slot"),
        })?;
        self.reserve_at(disk, mount, Place::Cold(slot))
    }

    fn reserve_at(
        &self,
        disk: DiskConfig,
        mut mount: DiskMount,
        place: Place,
    ) -> Result<DiskReservation, DeviceError> {
        check_host_path(&disk.host_path)?;
        check_mount_path(&mount.guest_path)?;
        mount.read_only |= disk.read_only;
        let mut b = lock(&self.books);
        let id = b.next_id;
        let path = mount.guest_path.clone();
        let taken_by_another = b.disks.values().any(|d| {
            d.config.host_path != disk.host_path && d.mounts.contains_key(&mount.guest_path)
        });
        if taken_by_another {
            return Err(DeviceError::GuestPathInUse { guest_path: path });
        }
        let index = match (b.by_path.get(&disk.host_path).copied(), place) {
            (Some(_), Place::Cold(_)) => {
                return Err(DeviceError::InvalidArgument {
                    what: "disks",
                    message: format!("{} is given twice", disk.host_path.display()),
                })
            }
            (Some(index), Place::Hot) => {
                let d = b.disk_mut(index).ok_or(DeviceError::ConfigMismatch {
                    host_path: disk.host_path.clone(),
                })?;
                join_disk(d, &disk, mount, id)?;
                index
            }
            (None, place) => {
                let (slot, state) = match place {
                    Place::Hot => (free_slot(&b)?, DiskState::Reserved),
                    Place::Cold(slot) => (slot, DiskState::Attached),
                };
                let index = slot.index();
                if b.disks.contains_key(&index) {
                    return Err(DeviceError::InvalidArgument {
                        what: "disks",
                        message: format!("slot {index} is taken"),
                    });
                }
                let cold = matches!(place, Place::Cold(_));
                let mounts = BTreeMap::from([(path.clone(), MountEntry::reserved(mount, id))]);
                b.by_path.insert(disk.host_path.clone(), index);
                b.disks.insert(
                    index,
                    Disk {
                        slot,
                        config: disk,
                        state,
                        pending: None,
                        cold,
                        mounts,
                    },
                );
                index
            }
        };
        b.reservations.insert(
            id,
            Held {
                index,
                guest_path: path,
            },
        );
        b.next_id += 1;
        Ok(DiskReservation(id))
    }

    /// Attach the reservation's disk (if not yet), then mount it in the guest (if not yet).
    /// Returns the disk's slot. After an error the caller must [`ScsiController::unmap`].
    ///
    /// # Errors
    /// [`DeviceError::UnknownReservation`], [`DeviceError::WrongDeviceState`] (a disk whose
    /// attach failed, a mount that failed before), or the seam's error as
    /// [`DeviceError::Host`] / [`DeviceError::Guest`].
    pub async fn map(
        &self,
        id: DiskReservation,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<ScsiSlot, DeviceError> {
        let _op = self.ops.lock().await;
        let held = lock(&self.books).held(id)?;
        self.disk_once(held.index, DiskEvent::Attach, host, guest)
            .await?;
        let slot = lock(&self.books).disk(held.index)?.slot;
        self.mount_once(held.index, &held.guest_path, MountEvent::Mount, host, guest)
            .await?;
        Ok(slot)
    }

    /// Drop the reservation: at its mount's last reference unmount it in the guest, at the
    /// disk's last mount eject and detach it. Retryable: a failure keeps the reservation, and a
    /// retry resumes at the step that failed.
    ///
    /// # Errors
    /// [`DeviceError::UnknownReservation`], or the failing step's seam error (a busy unmount is
    /// [`DeviceError::Guest`] with [`crate::Rejection::Busy`]).
    pub async fn unmap(
        &self,
        id: DiskReservation,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<(), DeviceError> {
        let _op = self.ops.lock().await;
        let held = lock(&self.books).held(id)?;
        let part = {
            let b = lock(&self.books);
            let mount = b
                .disks
                .get(&held.index)
                .and_then(|d| d.mounts.get(&held.guest_path));
            MountPart::of(mount.map(|m| &m.holders), id.0)
        };
        match part {
            MountPart::Shared => {
                let mut b = lock(&self.books);
                if let Some(m) = b
                    .disk_mut(held.index)
                    .and_then(|d| d.mounts.get_mut(&held.guest_path))
                {
                    m.holders.remove(&id.0);
                }
                b.reservations.remove(&id.0);
                return Ok(());
            }
            MountPart::Last => {
                while self
                    .mount_once(
                        held.index,
                        &held.guest_path,
                        MountEvent::Unmount,
                        host,
                        guest,
                    )
                    .await?
                {}
                if let Some(d) = lock(&self.books).disk_mut(held.index) {
                    d.mounts.remove(&held.guest_path);
                }
            }
            MountPart::Done => {}
        }
        let unused = lock(&self.books)
            .disk(held.index)
            .map(|d| d.mounts.is_empty())
            .unwrap_or(false);
        if unused {
            while self
                .disk_once(held.index, DiskEvent::Remove, host, guest)
                .await?
            {}
            let mut b = lock(&self.books);
            if let Some(d) = b.disks.remove(&held.index) {
                b.by_path.remove(&d.config.host_path);
            }
        }
        lock(&self.books).reservations.remove(&id.0);
        Ok(())
    }

    /// Teardown, guest side: unmount every mount and eject every disk that may be there.
    /// Failures are logged and swallowed; once the guest is found gone its calls are skipped.
    pub async fn teardown_guest(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        reach: &mut Reach,
    ) {
        self.teardown(Phase::Guest, host, guest, reach).await;
    }

    /// Teardown, host side: detach every disk that may be attached, then forget them all.
    /// Failures are logged and swallowed; once the VM is found gone its calls are skipped.
    pub async fn teardown_host(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        reach: &mut Reach,
    ) {
        self.teardown(Phase::Host, host, guest, reach).await;
    }

    async fn teardown(
        &self,
        phase: Phase,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        reach: &mut Reach,
    ) {
        let _op = self.ops.lock().await;
        let indices: Vec<u32> = lock(&self.books).disks.keys().copied().collect();
        for index in indices {
            if phase == Phase::Guest {
                self.teardown_mounts(index, guest, reach).await;
            }
            self.teardown_disk(index, phase, host, guest, reach).await;
        }
        if phase == Phase::Host {
            let mut b = lock(&self.books);
            b.disks.clear();
            b.by_path.clear();
            b.reservations.clear();
        }
    }

    async fn teardown_mounts(&self, index: u32, guest: &dyn GuestMounts, reach: &mut Reach) {
        let paths: Vec<String> = match lock(&self.books).disks.get(&index) {
            Some(d) => d.mounts.keys().cloned().collect(),
            None => return,
        };
        for path in paths {
            loop {
                let Some(state) = lock(&self.books)
                    .disks
                    .get(&index)
                    .and_then(|d| d.mounts.get(&path))
                    .map(MountEntry::teardown_state)
                else {
                    break;
                };
                let to = match mount_step(state, MountEvent::Teardown) {
                    Step::Refuse | Step::Stay => break,
                    Step::Become(to) => to,
                    // Teardown never mounts.
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
                            match guest_call("unmount disk", dl, guest.unmount_disk(&path)).await {
                                Ok(()) => on_success,
                                Err(e) => {
                                    reach.guest_failed("unmount disk", &e);
                                    on_failure
                                }
                            }
                        }
                    }
                };
                if let Some(m) = lock(&self.books)
                    .disk_mut(index)
                    .and_then(|d| d.mounts.get_mut(&path))
                {
                    m.state = to;
                    m.pending = None;
                }
            }
        }
        if let Some(d) = lock(&self.books).disk_mut(index) {
            d.mounts.clear();
        }
    }

    async fn teardown_disk(
        &self,
        index: u32,
        phase: Phase,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        reach: &mut Reach,
    ) {
        loop {
            let Some((state, slot, config)) = lock(&self.books)
                .disks
                .get(&index)
                .map(|d| (d.pending.unwrap_or(d.state), d.slot, d.config.clone()))
            else {
                return;
            };
            let to = match disk_step(state, DiskEvent::Teardown) {
                Step::Refuse | Step::Stay => return,
                Step::Become(to) => to,
                Step::Call { call, .. } if phase == Phase::Guest && !call.on_guest() => return,
                Step::Call {
                    call,
                    on_success,
                    on_failure,
                } => {
                    let reachable = if call.on_guest() {
                        reach.guest
                    } else {
                        reach.host
                    };
                    // A guest step met in the host pass was skipped by a guest pass that found
                    // the guest gone, or never ran: the host goes on without it.
                    if !reachable || (phase == Phase::Host && call.on_guest()) {
                        on_failure
                    } else {
                        match self.disk_call(call, slot, &config, host, guest).await {
                            Ok(()) => on_success,
                            Err(DeviceError::Host { step, source }) => {
                                reach.host_failed(step, &source);
                                on_failure
                            }
                            Err(DeviceError::Guest { step, source }) => {
                                reach.guest_failed(step, &source);
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
            if let Some(d) = lock(&self.books).disk_mut(index) {
                d.state = to;
                d.pending = None;
            }
        }
    }

    /// The disks now, by slot, with their mounts. Never waits behind a Map or Unmap.
    pub fn snapshot(&self) -> Vec<DiskInfo> {
        lock(&self.books)
            .disks
            .values()
            .map(|d| DiskInfo {
                slot: d.slot,
                config: d.config.clone(),
                state: d.state,
                cold: d.cold,
                mounts: d.mounts.values().map(MountInfo::from).collect(),
            })
            .collect()
    }

    /// Whether `id` is a live reservation of `disk` mounted as `mount` (read-only forced as
    /// [`ScsiController::reserve`] forces it).
    pub fn holds(&self, id: DiskReservation, disk: &DiskConfig, mount: &DiskMount) -> bool {
        let mut mount = mount.clone();
        mount.read_only |= disk.read_only;
        let b = lock(&self.books);
        let Ok(held) = b.held(id) else {
            return false;
        };
        b.disks.get(&held.index).is_some_and(|d| {
            d.config == *disk
                && d.mounts
                    .get(&held.guest_path)
                    .is_some_and(|m| m.config == mount && m.holders.contains(&id.0))
        })
    }

    /// Whether any disk has a mount (in any state) at `guest_path`.
    pub fn has_mount_at(&self, guest_path: &str) -> bool {
        lock(&self.books)
            .disks
            .values()
            .any(|d| d.mounts.contains_key(guest_path))
    }

    /// One step of the disk at `index` for `event`; whether its state moved.
    async fn disk_once(
        &self,
        index: u32,
        event: DiskEvent,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<bool, DeviceError> {
        let (state, slot, config) = {
            let b = lock(&self.books);
            let d = b.disk(index)?;
            (d.state, d.slot, d.config.clone())
        };
        let (to, result) = match disk_step(state, event) {
            Step::Refuse => return Err(refused("disk", state.as_str(), event.as_str())),
            Step::Stay => return Ok(false),
            Step::Become(to) => (to, Ok(true)),
            Step::Call {
                call,
                on_success,
                on_failure,
            } => {
                self.set_disk_pending(index, on_success);
                match self.disk_call(call, slot, &config, host, guest).await {
                    Ok(()) => (on_success, Ok(true)),
                    Err(e) => (on_failure, Err(e)),
                }
            }
        };
        if let Some(d) = lock(&self.books).disk_mut(index) {
            d.state = to;
            d.pending = None;
        }
        result
    }

    fn set_disk_pending(&self, index: u32, to: DiskState) {
        if let Some(d) = lock(&self.books).disk_mut(index) {
            d.pending = Some(to);
        }
    }

    async fn disk_call(
        &self,
        call: DiskCall,
        slot: ScsiSlot,
        config: &DiskConfig,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<(), DeviceError> {
        let dl = self.deadlines;
        let on_host = |step: &'static str| move |source| DeviceError::Host { step, source };
        match call {
            DiskCall::Attach => host_call("attach disk", dl.host, host.attach_disk(slot, config))
                .await
                .map_err(on_host("attach disk")),
            DiskCall::Eject => {
                let location = host.disk_location(slot);
                guest_call("eject disk", dl.guest, guest.eject_disk(&location))
                    .await
                    .map_err(|source| DeviceError::Guest {
                        step: "eject disk",
                        source,
                    })
            }
            DiskCall::Detach => host_call("detach disk", dl.host, host.detach_disk(slot))
                .await
                .map_err(on_host("detach disk")),
        }
    }

    /// One step of the mount at `path` on the disk at `index` for `event`; whether it moved.
    async fn mount_once(
        &self,
        index: u32,
        path: &str,
        event: MountEvent,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<bool, DeviceError> {
        let (state, slot, config) = {
            let b = lock(&self.books);
            let d = b.disk(index)?;
            let m = d.mounts.get(path).ok_or(DeviceError::NotFound {
                what: "disk",
                guest_path: path.to_owned(),
            })?;
            (m.state, d.slot, m.config.clone())
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
                if let Some(m) = lock(&self.books)
                    .disk_mut(index)
                    .and_then(|d| d.mounts.get_mut(path))
                {
                    m.pending = Some(on_success);
                }
                let dl = self.deadlines.guest;
                let on_guest =
                    |step: &'static str| move |source| DeviceError::Guest { step, source };
                let r = match call {
                    MountCall::Mount => {
                        let location = host.disk_location(slot);
                        guest_call("mount disk", dl, guest.mount_disk(&location, &config))
                            .await
                            .map_err(on_guest("mount disk"))
                    }
                    MountCall::Unmount => guest_call("unmount disk", dl, guest.unmount_disk(path))
                        .await
                        .map_err(on_guest("unmount disk")),
                };
                match r {
                    Ok(()) => (on_success, Ok(true)),
                    Err(e) => (on_failure, Err(e)),
                }
            }
        };
        if let Some(m) = lock(&self.books)
            .disk_mut(index)
            .and_then(|d| d.mounts.get_mut(path))
        {
            m.state = to;
            m.pending = None;
        }
        result
    }
}

/// Adds reservation `id` on the existing disk `d` as `mount`, if the tables allow.
fn join_disk(
    d: &mut Disk,
    disk: &DiskConfig,
    mount: DiskMount,
    id: u64,
) -> Result<(), DeviceError> {
    if d.config != *disk {
        return Err(DeviceError::ConfigMismatch {
            host_path: disk.host_path.clone(),
        });
    }
    match disk_step(d.state, DiskEvent::Reserve) {
        Step::Refuse => return Err(refused("disk", d.state.as_str(), "reserve")),
        Step::Stay | Step::Become(_) | Step::Call { .. } => {}
    }
    let path = mount.guest_path.clone();
    join_mount(&mut d.mounts, path, mount, id)
}

/// The lowest hot slot no disk holds.
fn free_slot(b: &Books) -> Result<ScsiSlot, DeviceError> {
    (0..b.capacity)
        .find(|i| !b.disks.contains_key(i))
        .and_then(ScsiSlot::from_index)
        .ok_or(DeviceError::NoAvailableSlots {
            capacity: b.capacity,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::MountState;

    #[test]
    fn mount_state_of_a_pending_call_counts_for_teardown() {
        let mut m = MountEntry::reserved(DiskMount::at("/mnt"), 0);
        assert_eq!(m.teardown_state(), MountState::Reserved);
        m.pending = Some(MountState::Mounted);
        assert_eq!(m.teardown_state(), MountState::Mounted);
    }
}
