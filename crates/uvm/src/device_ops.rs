//! The controller's device operations: [`Controller::add_disk`], [`Controller::remove_disk`],
//! [`Controller::add_share`], [`Controller::remove_share`] and the [`Controller::devices`]
//! snapshot, over the sub-controllers in [`crate::devices`].
//!
//! Device operations are Running-only, decided in the VM's table like the other Running-only
//! operations. They are serialised among themselves by `device_lock` (an async lock no reader
//! takes: [`Controller::state`] and [`Controller::devices`] never wait behind an attach), and each
//! races the VM's device token: `terminate_vm` (or the VM exiting by itself) cancels it, the
//! operation's future is dropped at its next await and returns [`ControllerError::Cancelled`], and
//! the terminate tears down what the books say may be there — guest first, host second — before
//! it terminates and releases the VM. So a device operation racing a terminate ends with the VM
//! Terminated and nothing attached.
//!
//! A user's device is named by its guest path. `add_disk` is Reserve + Map; when the Map fails
//! it Unmaps, so nothing is left half-attached, and returns the Map's error (should that cleanup
//! fail too, the leftover stays in the books and in [`Controller::devices`], and
//! `remove_disk` of the same guest path finishes it). Adding the same device at the same guest
//! path again is idempotent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::controller::{lock, Controller, Timeouts};
use crate::devices::network::{NetworkController, NetworkInfo};
use crate::devices::scsi::{DiskInfo, ScsiController};
use crate::devices::shares::{ShareController, ShareInfo};
use crate::devices::vpci::{PciInfo, VpciController};
use crate::devices::{
    check_mount_path, Deadlines, DeviceError, DiskReservation, Reach, ShareReservation,
};
use crate::error::{ControllerError, HostError, SeamError};
use crate::seams::{
    DiskConfig, DiskMount, Guest, GuestMounts, HostDevices, HostVm, PciAddress, ScsiSlot,
    ShareConfig, ShareMount, VmConfig,
};
use crate::state::Operation;

/// The disks and shares of a VM, as [`Controller::devices`] shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Devices {
    /// The disks, by slot, each with its mounts.
    pub disks: Vec<DiskInfo>,
    /// The shares, by tag, each with its mounts.
    pub shares: Vec<ShareInfo>,
}

/// What a device operation works with once admitted: the VM, its books, its device token.
type DeviceGuard = (Arc<dyn HostVm>, Arc<DeviceSet>, CancellationToken);

/// What a user's guest path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attachment {
    Disk(DiskReservation),
    Share(ShareReservation),
}

/// One VM's device books: both sub-controllers and the user's attachments by guest path.
#[derive(Debug)]
pub(crate) struct DeviceSet {
    scsi: ScsiController,
    shares: ShareController,
    pub(crate) network: NetworkController,
    vpci: VpciController,
    deadlines: Deadlines,
    attached: Mutex<BTreeMap<String, Attachment>>,
    /// The devices given at create, in order: mounted by `start_vm`.
    cold: Vec<Attachment>,
}

impl DeviceSet {
    /// The books for `config`, with its disks and shares reserved at their cold slots and tags.
    /// No I/O: a configuration that does not fit fails here, before anything exists.
    pub(crate) fn for_config(
        config: &VmConfig,
        timeouts: Timeouts,
    ) -> Result<DeviceSet, DeviceError> {
        let deadlines = Deadlines {
            host: timeouts.device,
            guest: timeouts.guest_call,
        };
        let mut set = DeviceSet {
            scsi: ScsiController::new(config.scsi_controllers, deadlines),
            shares: ShareController::new(config.no_writable_shares, deadlines),
            network: NetworkController::new(config.network.dns.clone(), deadlines),
            vpci: VpciController::new(deadlines),
            deadlines,
            attached: Mutex::new(BTreeMap::new()),
            cold: Vec::new(),
        };
        for (i, spec) in config.disks.iter().enumerate() {
            let path = spec.mount.guest_path.clone();
            set.claim_path(&path)?;
            let id = set
                .scsi
                .reserve_cold(i, spec.disk.clone(), spec.mount.clone())?;
            set.record(path, Attachment::Disk(id));
        }
        for (i, spec) in config.shares.iter().enumerate() {
            let path = spec.mount.guest_path.clone();
            set.claim_path(&path)?;
            let id = set
                .shares
                .reserve_cold(i, spec.share.clone(), spec.mount.clone())?;
            set.record(path, Attachment::Share(id));
        }
        Ok(set)
    }

    fn record(&mut self, path: String, attachment: Attachment) {
        lock(&self.attached).insert(path, attachment);
        self.cold.push(attachment);
    }

    /// Refuses a guest path a user's device already holds.
    fn claim_path(&self, guest_path: &str) -> Result<(), DeviceError> {
        let taken = lock(&self.attached).contains_key(guest_path)
            || self.scsi.has_mount_at(guest_path)
            || self.shares.has_mount_at(guest_path);
        if taken {
            return Err(DeviceError::GuestPathInUse {
                guest_path: guest_path.to_owned(),
            });
        }
        Ok(())
    }

    /// Mounts the devices given at create (the host attached them cold), in order.
    pub(crate) async fn mount_cold(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
    ) -> Result<(), DeviceError> {
        for attachment in &self.cold {
            match *attachment {
                Attachment::Disk(id) => {
                    self.scsi.map(id, host, guest).await?;
                }
                Attachment::Share(id) => {
                    self.shares.map(id, host, guest).await?;
                }
            }
        }
        Ok(())
    }

    async fn add_disk(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        disk: DiskConfig,
        mount: DiskMount,
    ) -> Result<ScsiSlot, DeviceError> {
        check_mount_path(&mount.guest_path)?;
        let path = mount.guest_path.clone();
        let existing = lock(&self.attached).get(&path).copied();
        let id = match existing {
            Some(Attachment::Disk(id)) if self.scsi.holds(id, &disk, &mount) => id,
            Some(Attachment::Disk(_) | Attachment::Share(_)) => {
                return Err(DeviceError::GuestPathInUse { guest_path: path })
            }
            None => {
                self.claim_path(&path)?;
                self.scsi.reserve(disk, mount)?
            }
        };
        match self.scsi.map(id, host, guest).await {
            Ok(slot) => {
                lock(&self.attached).insert(path, Attachment::Disk(id));
                Ok(slot)
            }
            Err(e) => {
                self.settle(
                    &path,
                    Attachment::Disk(id),
                    self.scsi.unmap(id, host, guest).await,
                );
                Err(e)
            }
        }
    }

    async fn add_share(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        share: ShareConfig,
        mount: ShareMount,
    ) -> Result<String, DeviceError> {
        check_mount_path(&mount.guest_path)?;
        let path = mount.guest_path.clone();
        let existing = lock(&self.attached).get(&path).copied();
        let id = match existing {
            Some(Attachment::Share(id)) if self.shares.holds(id, &share, &mount) => id,
            Some(Attachment::Disk(_) | Attachment::Share(_)) => {
                return Err(DeviceError::GuestPathInUse { guest_path: path })
            }
            None => {
                self.claim_path(&path)?;
                self.shares.reserve(share, mount)?
            }
        };
        match self.shares.map(id, host, guest).await {
            Ok(tag) => {
                lock(&self.attached).insert(path, Attachment::Share(id));
                Ok(tag)
            }
            Err(e) => {
                let cleanup = self.shares.unmap(id, host, guest).await;
                self.settle(&path, Attachment::Share(id), cleanup);
                Err(e)
            }
        }
    }

    /// After a failed Map and its cleanup Unmap: forget the attachment if the cleanup worked,
    /// keep it (so a remove can finish the job) if it did not.
    fn settle(&self, path: &str, attachment: Attachment, cleanup: Result<(), DeviceError>) {
        match cleanup {
            Ok(()) => {
                lock(&self.attached).remove(path);
            }
            Err(e) => {
                tracing::warn!(guest_path = path, error = %crate::error_chain(&e), "cleaning up after a failed map failed; remove it to retry");
                lock(&self.attached).insert(path.to_owned(), attachment);
            }
        }
    }

    async fn remove_disk(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        guest_path: &str,
    ) -> Result<(), DeviceError> {
        let Some(Attachment::Disk(id)) = lock(&self.attached).get(guest_path).copied() else {
            return Err(DeviceError::NotFound {
                what: "disk",
                guest_path: guest_path.to_owned(),
            });
        };
        self.scsi.unmap(id, host, guest).await?;
        lock(&self.attached).remove(guest_path);
        Ok(())
    }

    async fn remove_share(
        &self,
        host: &dyn HostDevices,
        guest: &dyn GuestMounts,
        guest_path: &str,
    ) -> Result<(), DeviceError> {
        let Some(Attachment::Share(id)) = lock(&self.attached).get(guest_path).copied() else {
            return Err(DeviceError::NotFound {
                what: "share",
                guest_path: guest_path.to_owned(),
            });
        };
        self.shares.unmap(id, host, guest).await?;
        lock(&self.attached).remove(guest_path);
        Ok(())
    }

    async fn add_pci(
        &self,
        host: &dyn HostVm,
        guest: &dyn Guest,
        address: PciAddress,
    ) -> Result<String, DeviceError> {
        // The same device again is its reservation; a new one is probed first.
        let id = match self.vpci.reservation(address) {
            Some(id) => id,
            None => {
                let location = crate::devices::host_call(
                    "probe PCI device",
                    self.deadlines.host,
                    host.probe_pci(address),
                )
                .await
                .map_err(|source| DeviceError::Host {
                    step: "probe PCI device",
                    source,
                })?;
                self.vpci.reserve(address, location)
            }
        };
        if let Err(e) = self.vpci.add(&id, host, guest).await {
            // A failed host add is gone already; a failed guest wait left the host side. A
            // refusal (a device a previous call left AssignedInvalid) changed nothing.
            let refused = matches!(e, DeviceError::WrongDeviceState { .. });
            let left = !refused && self.vpci.snapshot().into_iter().any(|d| d.id == id);
            if let Err(undo) = match left {
                true => self.vpci.remove(&id, host).await,
                false => Ok(()),
            } {
                tracing::warn!(id, error = %crate::error_chain(&undo), "removing a PCI device after a failed add failed; remove it to retry");
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Setup of the network: the NICs the backend plugged cold, then the resolver.
    pub(crate) async fn configure_network(
        &self,
        host: &dyn HostVm,
        guest: &dyn Guest,
    ) -> Result<(), DeviceError> {
        self.network.setup(host, guest).await
    }

    /// Everything down, guest first, host second; tolerant of either being gone. Afterwards the
    /// books are empty. NICs go first (a guest losing its network mid-way is harmless, a disk
    /// losing its filesystem is not), and once the VM is gone they are only forgotten: the
    /// backend's release removes what carried them.
    pub(crate) async fn teardown(&self, host: &dyn HostVm, guest: &dyn Guest, mut reach: Reach) {
        if reach.host {
            if let Err(e) = self.network.teardown(host, guest, &mut reach).await {
                tracing::warn!(error = %crate::error_chain(&e), "network teardown incomplete; the VM's release removes the rest");
            }
        }
        self.network.forget();
        self.scsi.teardown_guest(host, guest, &mut reach).await;
        self.shares.teardown_guest(guest, &mut reach).await;
        self.scsi.teardown_host(host, guest, &mut reach).await;
        self.shares.teardown_host(host, &mut reach).await;
        self.vpci.teardown(host, &mut reach).await;
        lock(&self.attached).clear();
    }

    fn snapshot(&self) -> Devices {
        Devices {
            disks: self.scsi.snapshot(),
            shares: self.shares.snapshot(),
        }
    }
}

impl DeviceError {
    /// As a start step's error: the seam error it carries, or (for a controller-side refusal,
    /// which a fresh VM's cold devices do not meet) the refusal as a failed host step.
    pub(crate) fn into_seam(self) -> SeamError {
        match self {
            DeviceError::Host { source, .. } => SeamError::Host(source),
            DeviceError::Guest { source, .. } => SeamError::Guest(source),
            other @ (DeviceError::InvalidArgument { .. }
            | DeviceError::NoAvailableSlots { .. }
            | DeviceError::ConfigMismatch { .. }
            | DeviceError::GuestPathInUse { .. }
            | DeviceError::WritableShareRefused { .. }
            | DeviceError::WrongDeviceState { .. }
            | DeviceError::UnknownReservation { .. }
            | DeviceError::UnknownNic { .. }
            | DeviceError::UnknownDevice { .. }
            | DeviceError::Incomplete { .. }
            | DeviceError::NotFound { .. }) => SeamError::Host(HostError::Failed {
                operation: "set up devices",
                source: Box::new(other),
            }),
        }
    }
}

impl Controller {
    /// Hot-add `disk` and mount it in the guest as `mount`: Reserve, then Map (attach, then
    /// mount). Returns its slot. Running only. A failed Map is undone (Unmap) before the error
    /// returns; the same disk at the same guest path again is a no-op.
    ///
    /// # Errors
    /// [`ControllerError::WrongState`] outside Running; [`ControllerError::Device`] with the
    /// reason (a bad path, [`DeviceError::NoAvailableSlots`], [`DeviceError::ConfigMismatch`],
    /// [`DeviceError::GuestPathInUse`], or the host's or guest's error — a disk the host cannot
    /// attach, e.g. one attached writable elsewhere, is [`HostError::InvalidInput`]);
    /// [`ControllerError::Cancelled`] when a terminate cut it short.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "add_disk", guest_path = %mount.guest_path))]
    pub async fn add_disk(
        &self,
        disk: DiskConfig,
        mount: DiskMount,
    ) -> Result<ScsiSlot, ControllerError> {
        let op = Operation::AddDisk;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.add_disk(&*vm, &*guest, disk, mount);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Unmount the disk at `guest_path` and, at its last mount, eject and detach it. Running
    /// only. Retryable: a failure (a busy mount, a host that did not let go) leaves the disk in
    /// the state it reached, and another call resumes from there.
    ///
    /// # Errors
    /// [`ControllerError::WrongState`] outside Running; [`ControllerError::Device`] with
    /// [`DeviceError::NotFound`] when no disk is mounted there, or the failing step's error (a
    /// busy mount is the guest's [`crate::Rejection::Busy`]); [`ControllerError::Cancelled`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "remove_disk", guest_path))]
    pub async fn remove_disk(&self, guest_path: &str) -> Result<(), ControllerError> {
        let op = Operation::RemoveDisk;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.remove_disk(&*vm, &*guest, guest_path);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Hot-add the directory `share` and mount it in the guest as `mount`. Returns its tag
    /// (unique in the VM, never reused). Running only. As [`Controller::add_disk`]: a failed Map
    /// is undone; the same share at the same guest path again is a no-op.
    ///
    /// # Errors
    /// As [`Controller::add_disk`], and [`DeviceError::WritableShareRefused`] for a writable
    /// share on a VM created with `no_writable_shares`.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "add_share", guest_path = %mount.guest_path))]
    pub async fn add_share(
        &self,
        share: ShareConfig,
        mount: ShareMount,
    ) -> Result<String, ControllerError> {
        let op = Operation::AddShare;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.add_share(&*vm, &*guest, share, mount);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Unmount the share at `guest_path` and, at its last mount, remove it from the VM.
    /// Running only; retryable as [`Controller::remove_disk`].
    ///
    /// # Errors
    /// As [`Controller::remove_disk`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "remove_share", guest_path))]
    pub async fn remove_share(&self, guest_path: &str) -> Result<(), ControllerError> {
        let op = Operation::RemoveShare;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.remove_share(&*vm, &*guest, guest_path);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Hot-add a NIC for every interface of the network namespace at `netns` (the CNI model:
    /// someone else made it, with a veth, addresses, routes and MTU), each plugged then
    /// configured in the guest, the primary first. All or nothing. Returns the new NICs' ids.
    /// Running only.
    ///
    /// # Errors
    /// [`ControllerError::WrongState`] outside Running; [`ControllerError::Device`] with the
    /// host's refusal of the namespace ([`HostError::InvalidInput`]: missing, not a network
    /// namespace, no usable interface — nothing changed), the network's state
    /// ([`DeviceError::WrongDeviceState`]), or the failing step's error (every NIC of the call
    /// unwound); [`ControllerError::Cancelled`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "add_nics", netns = %netns.display()))]
    pub async fn add_nics(&self, netns: &std::path::Path) -> Result<Vec<String>, ControllerError> {
        let op = Operation::AddNic;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.network.add_nics(netns, &*vm, &*guest);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Deconfigure the NIC `id` in the guest and unplug it (its tap and filters go). Running
    /// only; retryable.
    ///
    /// # Errors
    /// [`ControllerError::WrongState`] outside Running; [`ControllerError::Device`] with
    /// [`DeviceError::UnknownNic`] or the failing step's error; [`ControllerError::Cancelled`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "remove_nic", nic = id))]
    pub async fn remove_nic(&self, id: &str) -> Result<(), ControllerError> {
        let op = Operation::RemoveNic;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.network.remove_nic(id, &*vm, &*guest);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Assign the host PCI device at `address` to the VM (VFIO): the backend's probe first,
    /// which refuses what the host cannot do before anything changes, then Reserve (the same
    /// device is the same reservation) and AddToVM (reference-counted). Returns the device's id.
    /// Running only. A failed add is removed again where it left something (AssignedInvalid).
    ///
    /// # Errors
    /// [`ControllerError::WrongState`]; [`ControllerError::Device`] with the probe's
    /// [`HostError::Unsupported`] (no IOMMU groups, …) or [`HostError::InvalidInput`] (no such
    /// device, not bound to vfio-pci), or the failing step's error; [`ControllerError::Cancelled`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "add_pci_device", address = %address))]
    pub async fn add_pci_device(&self, address: PciAddress) -> Result<String, ControllerError> {
        let op = Operation::AddPciDevice;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let guest = self.inner.guest.clone();
        let work = devices.add_pci(&*vm, &*guest, address);
        self.until_cancelled(op, &cancel, work).await
    }

    /// Drop one reference on the assigned device `id`; at the last, remove it from the VM.
    /// Running only; retryable (a failed removal leaves it AssignedInvalid).
    ///
    /// # Errors
    /// [`ControllerError::WrongState`]; [`ControllerError::Device`] with
    /// [`DeviceError::UnknownDevice`] or the host's error; [`ControllerError::Cancelled`].
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "remove_pci_device", id))]
    pub async fn remove_pci_device(&self, id: &str) -> Result<(), ControllerError> {
        let op = Operation::RemovePciDevice;
        let _dev = self.inner.device_lock.lock().await;
        let (vm, devices, cancel) = self.device_guard(op)?;
        let work = devices.vpci.remove(id, &*vm);
        self.until_cancelled(op, &cancel, work).await
    }

    /// The VM's disks and shares with their mounts and states, for inspect. Empty before create
    /// and once Terminated. Never waits behind another operation.
    pub fn devices(&self) -> Devices {
        let devices = self.core().devices.clone();
        devices.map(|d| d.snapshot()).unwrap_or_default()
    }

    /// The VM's network and its NICs with their states, for inspect. NotConfigured before the
    /// start; never waits behind another operation.
    pub fn network(&self) -> NetworkInfo {
        let devices = self.core().devices.clone();
        devices.map(|d| d.network.snapshot()).unwrap_or_default()
    }

    /// The PCI devices assigned to the VM, for inspect. Never waits behind another operation.
    pub fn pci_devices(&self) -> Vec<PciInfo> {
        let devices = self.core().devices.clone();
        devices.map(|d| d.vpci.snapshot()).unwrap_or_default()
    }

    /// Guard for device operations: Running, and the VM, its books and its device token.
    fn device_guard(&self, operation: Operation) -> Result<DeviceGuard, ControllerError> {
        let vm = self.running_vm(operation)?;
        let core = self.core();
        let devices = core
            .devices
            .clone()
            .ok_or_else(|| self.wrong_state(operation, core.machine.state()))?;
        Ok((vm, devices, core.device_cancel.clone()))
    }

    async fn until_cancelled<T>(
        &self,
        operation: Operation,
        cancel: &CancellationToken,
        work: impl std::future::Future<Output = Result<T, DeviceError>>,
    ) -> Result<T, ControllerError> {
        tokio::select! {
            biased;
            () = cancel.cancelled() => Err(ControllerError::Cancelled {
                id: self.inner.id.clone(),
                operation,
            }),
            r = work => r.map_err(|source| ControllerError::Device {
                id: self.inner.id.clone(),
                operation,
                source,
            }),
        }
    }

    /// Terminate's first step: cancel device operations (done by the caller), then tear every
    /// device down, guest first (only if connected), host second (only if the VM was started).
    pub(crate) async fn teardown_devices(&self, vm: Option<&Arc<dyn HostVm>>, vm_started: bool) {
        let devices = self.core().devices.clone();
        let (Some(devices), Some(vm)) = (devices, vm) else {
            return;
        };
        let _dev = self.inner.device_lock.lock().await;
        let reach = Reach {
            guest: vm_started && self.inner.guest.health() == crate::seams::LinkHealth::Connected,
            host: vm_started,
        };
        devices.teardown(&**vm, &*self.inner.guest, reach).await;
    }
}
