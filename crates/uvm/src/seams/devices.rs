//! The device seams: disks on SCSI slots and shared directories, host side ([`HostDevices`]) and
//! guest side ([`GuestMounts`]). The sub-controllers in `uvm` decide slots, tags, reservations
//! and refcounts; these traits only attach, detach, mount and unmount.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::{GuestError, HostError};

/// Where a disk sits on the VM's SCSI controllers. `slot = controller × 64 + lun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScsiSlot {
    /// The SCSI controller (0-based; one `virtio-scsi` controller per 64 LUNs).
    pub controller: u8,
    /// The LUN on that controller, below [`ScsiSlot::LUNS_PER_CONTROLLER`].
    pub lun: u8,
}

impl ScsiSlot {
    /// LUNs per SCSI controller.
    pub const LUNS_PER_CONTROLLER: u32 = 64;

    /// The slot's index: `controller × 64 + lun`.
    pub fn index(self) -> u32 {
        u32::from(self.controller) * Self::LUNS_PER_CONTROLLER + u32::from(self.lun)
    }

    /// The slot at `index`; `None` past the last controller a `u8` can number.
    pub fn from_index(index: u32) -> Option<ScsiSlot> {
        let controller = u8::try_from(index / Self::LUNS_PER_CONTROLLER).ok()?;
        // Below 64 by construction.
        let lun = (index % Self::LUNS_PER_CONTROLLER) as u8;
        Some(ScsiSlot { controller, lun })
    }
}

/// A disk image's format on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DiskFormat {
    /// A raw image (or a block device).
    #[default]
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// The host's caching of a disk's I/O (QEMU's `cache=` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DiskCache {
    /// Bypass the host page cache (`O_DIRECT`), writes complete when the device has them.
    None,
    /// The host page cache; the guest's flushes reach the disk.
    #[default]
    Writeback,
    /// The host page cache, every write flushed.
    Writethrough,
    /// The host page cache, the guest's flushes ignored (scratch disks only).
    Unsafe,
}

/// A disk as the host attaches it. Two disks are the same when their host paths are; the rest
/// must then match too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskConfig {
    /// The image file or block device on the host (absolute).
    pub host_path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// Attached read-only (the guest cannot write it, the host opens it read-only).
    pub read_only: bool,
    /// Host caching.
    pub cache: DiskCache,
    /// Pass the guest's discards (TRIM) down to the image.
    pub discard: bool,
}

impl DiskConfig {
    /// A writable raw disk at `host_path` with the default cache and no discard.
    pub fn raw(host_path: impl Into<PathBuf>) -> DiskConfig {
        DiskConfig {
            host_path: host_path.into(),
            format: DiskFormat::Raw,
            read_only: false,
            cache: DiskCache::default(),
            discard: false,
        }
    }
}

/// Where the guest finds a disk the host attached: the host decides, the guest resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DiskLocation {
    /// A SCSI disk on the `controller`-th `virtio-scsi` controller (the guest numbers them in the
    /// order of their PCI addresses), target 0, `lun`.
    Scsi {
        /// The controller, as in [`ScsiSlot::controller`].
        controller: u8,
        /// The LUN the guest finds it at (the backend's choice: QEMU's is the slot's LUN + 1).
        lun: u8,
    },
    /// A `virtio-blk` disk whose serial (`/sys/block/vd*/serial`) is `serial` (cold-plugged disks
    /// of machines without a SCSI controller, such as microvm).
    VirtioBlk {
        /// The serial the host gave the device.
        serial: String,
    },
}

/// How the guest mounts a disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskMount {
    /// The absolute guest path to mount it at (made if missing).
    pub guest_path: String,
    /// The partition to mount: 0 for the whole disk, N for the N-th partition.
    pub partition: u32,
    /// Mount read-only.
    pub read_only: bool,
    /// The filesystem (`ext4`, `xfs`, `vfat`); `None` lets the guest probe it.
    pub fs_type: Option<String>,
    /// Extra mount options (`noatime`, …), passed to the guest's mount as data.
    pub options: Vec<String>,
}

impl DiskMount {
    /// A writable mount of the whole disk at `guest_path`, its filesystem probed.
    pub fn at(guest_path: impl Into<String>) -> DiskMount {
        DiskMount {
            guest_path: guest_path.into(),
            partition: 0,
            read_only: false,
            fs_type: None,
            options: Vec::new(),
        }
    }
}

/// A host directory shared into the guest. Two shares are the same when their host paths are;
/// the rest must then match too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareConfig {
    /// The directory on the host (absolute).
    pub host_path: PathBuf,
    /// Shared read-only: enforced on the host and mounted `ro` in the guest.
    pub read_only: bool,
}

/// How the guest reaches a share; the host decides per share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareTransport {
    /// virtio-fs (`mount -t virtiofs TAG`), served by a `virtiofsd` on the host.
    VirtioFs,
    /// 9p over virtio (`mount -t 9p -o trans=virtio,version=9p2000.L TAG`), served by QEMU.
    NineP,
}

/// How the guest mounts a share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShareMount {
    /// The absolute guest path to mount it at (made if missing).
    pub guest_path: String,
    /// Mount read-only (always, for a read-only share).
    pub read_only: bool,
}

/// A disk given at create: attached cold, mounted once the guest is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// What the host attaches.
    pub disk: DiskConfig,
    /// Where and how the guest mounts it.
    pub mount: DiskMount,
}

/// A share given at create: added cold, mounted once the guest is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    /// What the host shares.
    pub share: ShareConfig,
    /// Where and how the guest mounts it.
    pub mount: ShareMount,
}

/// The slot of the `index`-th disk given at create ([`crate::seams::VmConfig::disks`]): the
/// backend attaches it there cold, the controller reserves it there.
pub fn cold_disk_slot(index: usize) -> Option<ScsiSlot> {
    ScsiSlot::from_index(u32::try_from(index).ok()?)
}

/// The tag of the `index`-th share given at create ([`crate::seams::VmConfig::shares`]).
pub fn cold_share_tag(index: usize) -> String {
    format!("uvm-cold-{index}")
}

/// Disks and shares of one VM on the host. Each call is one device; the controller orders them
/// (guest first on the way out) and keeps the books.
#[async_trait]
pub trait HostDevices: Send + Sync {
    /// Hot-attach `disk` at `slot`.
    ///
    /// # Errors
    /// [`HostError::Unsupported`] where the machine cannot hot-add disks (microvm);
    /// [`HostError::InvalidInput`] for a host path that cannot be attached (missing, a
    /// directory, unreadable, already open for writing elsewhere); or the attach failed.
    async fn attach_disk(&self, slot: ScsiSlot, disk: &DiskConfig) -> Result<(), HostError>;
    /// Remove the disk at `slot` (hot or cold) and wait until the VM has let go of it.
    /// Harmless on a slot with nothing attached.
    ///
    /// # Errors
    /// [`HostError::Timeout`] when the VM did not release the device in time (retryable), or
    /// the removal failed.
    async fn detach_disk(&self, slot: ScsiSlot) -> Result<(), HostError>;
    /// Where the guest finds the disk at `slot` (hot or cold). No I/O.
    fn disk_location(&self, slot: ScsiSlot) -> DiskLocation;
    /// Hot-add the directory `share` under `tag` (unique in the VM).
    ///
    /// # Errors
    /// [`HostError::Unsupported`] where shares cannot be hot-added; [`HostError::InvalidInput`]
    /// for a host path that is not a readable directory; or the add failed.
    async fn add_share(&self, tag: &str, share: &ShareConfig) -> Result<(), HostError>;
    /// Remove the share `tag` (hot or cold) and what serves it. Harmless on an unknown tag.
    ///
    /// # Errors
    /// The removal failed (retryable).
    async fn remove_share(&self, tag: &str) -> Result<(), HostError>;
    /// How the guest reaches the share `tag` (hot or cold). No I/O.
    fn share_transport(&self, tag: &str) -> ShareTransport;
}

/// Mounting disks and shares in the guest. Guest paths are absolute; the guest checks them too.
#[async_trait]
pub trait GuestMounts: Send + Sync {
    /// Wait (under the link's deadline) for the disk at `location` to appear, then mount it.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] with its kind: not found (no such device, partition or
    /// filesystem), invalid argument (a guest path that fails the checks), permission denied,
    /// busy (something already mounted there); or the link failed.
    async fn mount_disk(
        &self,
        location: &DiskLocation,
        mount: &DiskMount,
    ) -> Result<(), GuestError>;
    /// Unmount the disk mounted at `guest_path`.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] busy while something in the guest uses it (retryable; never a
    /// lazy unmount), not found when nothing is mounted there; or the link failed.
    async fn unmount_disk(&self, guest_path: &str) -> Result<(), GuestError>;
    /// Tell the guest the disk at `location` is going away, so it lets go of the device before
    /// the host removes it (hcsshim's `RemoveSCSIDevice`). Harmless when it is already gone.
    ///
    /// # Errors
    /// The guest refused, or the link failed.
    async fn eject_disk(&self, location: &DiskLocation) -> Result<(), GuestError>;
    /// Mount the share `tag`, reached over `transport`.
    ///
    /// # Errors
    /// As [`GuestMounts::mount_disk`].
    async fn mount_share(
        &self,
        tag: &str,
        transport: ShareTransport,
        mount: &ShareMount,
    ) -> Result<(), GuestError>;
    /// Unmount the share mounted at `guest_path`.
    ///
    /// # Errors
    /// As [`GuestMounts::unmount_disk`].
    async fn unmount_share(&self, guest_path: &str) -> Result<(), GuestError>;
}
