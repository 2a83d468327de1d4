//! The device fakes: [`FakeVm`] keeps what is attached per slot and tag, [`FakeGuest`] what is
//! mounted per guest path, so tests can assert "nothing attached, nothing mounted" after any
//! failure. Scripted failures come from the shared [`super::Script`]; [`FakeGuest::refuse_unmount`]
//! makes an unmount refuse with a kind (a busy mount) until healed.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{Call, FakeGuest, FakeVm};
use crate::controller::lock;
use crate::error::{GuestError, GuestRequest, HostError};
use crate::seams::{
    cold_disk_slot, cold_share_tag, DiskConfig, DiskLocation, DiskMount, GuestMounts, HostDevices,
    ScsiSlot, ShareConfig, ShareMount, ShareTransport, VmConfig,
};
use crate::Rejection;

/// What the fake guest has mounted at one guest path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeMount {
    /// A disk found at this location.
    Disk(DiskLocation, DiskMount),
    /// A share with this tag.
    Share(String, ShareTransport, ShareMount),
}

/// The fake VM's devices.
#[derive(Debug, Default)]
pub(super) struct FakeDevices {
    disks: BTreeMap<ScsiSlot, DiskConfig>,
    shares: BTreeMap<String, ShareConfig>,
    /// Host paths the backend refuses to attach (as one open for writing by another VM).
    refused: std::collections::BTreeSet<std::path::PathBuf>,
}

impl FakeDevices {
    /// What a VM created with `config` has attached cold: its disks at their cold slots, its
    /// shares under their cold tags.
    pub(super) fn cold(config: &VmConfig) -> FakeDevices {
        FakeDevices {
            disks: config
                .disks
                .iter()
                .enumerate()
                .filter_map(|(i, spec)| Some((cold_disk_slot(i)?, spec.disk.clone())))
                .collect(),
            shares: config
                .shares
                .iter()
                .enumerate()
                .map(|(i, spec)| (cold_share_tag(i), spec.share.clone()))
                .collect(),
            refused: std::collections::BTreeSet::new(),
        }
    }
}

/// The fake guest's mounts and scripted refusals.
#[derive(Debug, Default)]
pub(super) struct FakeMounts {
    mounts: BTreeMap<String, FakeMount>,
    ejected: Vec<DiskLocation>,
    unmount_refusals: BTreeMap<String, Rejection>,
}

impl FakeVm {
    /// The disks attached now, by slot.
    pub fn attached_disks(&self) -> BTreeMap<ScsiSlot, DiskConfig> {
        lock(&self.devices).disks.clone()
    }
    /// The shares added now, by tag.
    pub fn added_shares(&self) -> BTreeMap<String, ShareConfig> {
        lock(&self.devices).shares.clone()
    }
    /// Attaching the disk at `host_path` is refused with [`HostError::InvalidInput`], as a
    /// backend refuses an image another VM has open for writing.
    pub fn refuse_disk(&self, host_path: impl Into<std::path::PathBuf>) {
        lock(&self.devices).refused.insert(host_path.into());
    }
    pub(super) fn forget_devices(&self) {
        let mut d = lock(&self.devices);
        d.disks.clear();
        d.shares.clear();
    }
    /// A device call on a VM whose process ended finds it gone.
    pub(super) fn alive(&self) -> Result<(), HostError> {
        if self.has_exited() {
            return Err(HostError::Gone);
        }
        Ok(())
    }
}

impl FakeGuest {
    /// What is mounted now, by guest path.
    pub fn mounts(&self) -> BTreeMap<String, FakeMount> {
        lock(&self.mounts).mounts.clone()
    }
    /// The disks the guest was told to let go of, in order.
    pub fn ejected(&self) -> Vec<DiskLocation> {
        lock(&self.mounts).ejected.clone()
    }
    /// Unmounting `guest_path` is refused with `kind` (e.g. [`Rejection::Busy`]) until
    /// [`FakeGuest::allow_unmount`].
    pub fn refuse_unmount(&self, guest_path: &str, kind: Rejection) {
        lock(&self.mounts)
            .unmount_refusals
            .insert(guest_path.to_owned(), kind);
    }
    /// Unmounting `guest_path` works again.
    pub fn allow_unmount(&self, guest_path: &str) {
        lock(&self.mounts).unmount_refusals.remove(guest_path);
    }

    fn mount(&self, request: GuestRequest, path: &str, mount: FakeMount) -> Result<(), GuestError> {
        self.connected()?;
        let mut m = lock(&self.mounts);
        if m.mounts.contains_key(path) {
            return Err(GuestError::Rejected {
                request,
                kind: Rejection::Busy,
                message: format!("{path} is already a mount point"),
            });
        }
        m.mounts.insert(path.to_owned(), mount);
        Ok(())
    }

    fn unmount(&self, request: GuestRequest, path: &str) -> Result<(), GuestError> {
        self.connected()?;
        let mut m = lock(&self.mounts);
        if let Some(kind) = m.unmount_refusals.get(path) {
            return Err(GuestError::Rejected {
                request,
                kind: *kind,
                message: format!("scripted refusal to unmount {path}"),
            });
        }
        match m.mounts.remove(path) {
            Some(_) => Ok(()),
            None => Err(GuestError::Rejected {
                request,
                kind: Rejection::NotFound,
                message: format!("nothing is mounted at {path}"),
            }),
        }
    }
}

#[async_trait]
impl HostDevices for FakeVm {
    async fn attach_disk(&self, slot: ScsiSlot, disk: &DiskConfig) -> Result<(), HostError> {
        self.script.host(Call::AttachDisk).await?;
        self.alive()?;
        let mut d = lock(&self.devices);
        if d.refused.contains(&disk.host_path) {
            return Err(HostError::InvalidInput {
                what: "disk",
                message: format!(
                    "{} is attached writable to another VM",
                    disk.host_path.display()
                ),
            });
        }
        if d.disks.contains_key(&slot) {
            return Err(HostError::InvalidInput {
                what: "slot",
                message: format!("slot {} is taken", slot.index()),
            });
        }
        d.disks.insert(slot, disk.clone());
        Ok(())
    }
    async fn detach_disk(&self, slot: ScsiSlot) -> Result<(), HostError> {
        self.script.host(Call::DetachDisk).await?;
        self.alive()?;
        lock(&self.devices).disks.remove(&slot);
        Ok(())
    }
    fn disk_location(&self, slot: ScsiSlot) -> DiskLocation {
        DiskLocation::Scsi {
            controller: slot.controller,
            lun: slot.lun,
        }
    }
    async fn add_share(&self, tag: &str, share: &ShareConfig) -> Result<(), HostError> {
        self.script.host(Call::AddShare).await?;
        self.alive()?;
        let mut d = lock(&self.devices);
        if d.shares.contains_key(tag) {
            return Err(HostError::InvalidInput {
                what: "tag",
                message: format!("tag {tag} is taken"),
            });
        }
        d.shares.insert(tag.to_owned(), share.clone());
        Ok(())
    }
    async fn remove_share(&self, tag: &str) -> Result<(), HostError> {
        self.script.host(Call::RemoveShare).await?;
        self.alive()?;
        lock(&self.devices).shares.remove(tag);
        Ok(())
    }
    fn share_transport(&self, _tag: &str) -> ShareTransport {
        ShareTransport::VirtioFs
    }
}

#[async_trait]
impl GuestMounts for FakeGuest {
    async fn mount_disk(
        &self,
        location: &DiskLocation,
        mount: &DiskMount,
    ) -> Result<(), GuestError> {
        self.script.guest(Call::MountDisk).await?;
        self.mount(
            GuestRequest::MountDisk,
            &mount.guest_path,
            FakeMount::Disk(location.clone(), mount.clone()),
        )
    }
    async fn unmount_disk(&self, guest_path: &str) -> Result<(), GuestError> {
        self.script.guest(Call::UnmountDisk).await?;
        self.unmount(GuestRequest::UnmountDisk, guest_path)
    }
    async fn eject_disk(&self, location: &DiskLocation) -> Result<(), GuestError> {
        self.script.guest(Call::EjectDisk).await?;
        self.connected()?;
        lock(&self.mounts).ejected.push(location.clone());
        Ok(())
    }
    async fn mount_share(
        &self,
        tag: &str,
        transport: ShareTransport,
        mount: &ShareMount,
    ) -> Result<(), GuestError> {
        self.script.guest(Call::MountShare).await?;
        self.mount(
            GuestRequest::MountShare,
            &mount.guest_path,
            FakeMount::Share(tag.to_owned(), transport, mount.clone()),
        )
    }
    async fn unmount_share(&self, guest_path: &str) -> Result<(), GuestError> {
        self.script.guest(Call::UnmountShare).await?;
        self.unmount(GuestRequest::UnmountShare, guest_path)
    }
}
