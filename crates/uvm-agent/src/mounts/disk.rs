//! Disks: find the block device the host attached (by SCSI address or virtio-blk serial, in
//! `/sys`), wait for it on the kernel's uevents, probe its filesystem, mount it; eject it from
//! the SCSI layer before the host removes it.
//!
//! A SCSI address names the `controller`-th virtio-scsi controller by PCI address (the host
//! places them at increasing addresses), target 0, a LUN: the controller's `hostH` is found under
//! its virtio device, the disk at `/sys/bus/scsi/devices/H:0:0:LUN/block/`. A virtio-blk disk
//! is the `vd*` whose `serial` the host set.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::mount;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::uevent::Uevents;
use super::{mount_table, mounted_at, parse_options, path, prepare_mount_point, Decide};
use crate::error::ApiError;
use crate::info;

/// How long a partition may take to appear once its disk has (the kernel scans the partition
/// table right after adding the disk).
const PARTITION_GRACE: Duration = Duration::from_secs(2);

/// Filesystems the guest kernel has and this agent probes for.
pub const FILESYSTEMS: [&str; 3] = ["ext4", "xfs", "vfat"];

/// Where the guest finds a disk (the wire's `DiskLocation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Target 0, `lun`, on the `controller`-th virtio-scsi controller by PCI address.
    Scsi {
        /// The controller.
        controller: u32,
        /// The LUN.
        lun: u32,
    },
    /// The virtio-blk disk with this serial.
    VirtioBlk {
        /// Its serial.
        serial: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Scsi { controller, lun } => {
                write!(f, "the SCSI disk at controller {controller} LUN {lun}")
            }
            Location::VirtioBlk { serial } => write!(f, "the virtio-blk disk {serial:?}"),
        }
    }
}

/// What a mount asks for (the wire's `MountDiskRequest`, checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMount {
    /// Where the disk is.
    pub location: Location,
    /// The guest path, as the host sent it.
    pub guest_path: String,
    /// 0: the whole disk.
    pub partition: u32,
    /// Mount read-only.
    pub read_only: bool,
    /// `None`: probe.
    pub fs_type: Option<String>,
    /// mount(8)-style options.
    pub options: Vec<String>,
    /// How long to wait for the device.
    pub wait: Duration,
}

/// A view of sysfs (the real one at `/sys`; a directory tree in tests).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
    /// Whether a device found in it is opened (in `/dev`) before it counts as there.
    real: bool,
}

impl Default for Sysfs {
    /// The kernel's, at `/sys`, with its devices in `/dev`.
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
            real: true,
        }
    }
}

/// A PCI address (`domain:bus:slot.function`, hex) as a sort key.
fn pci_key(name: &str) -> Option<(u32, u32, u32, u32)> {
    let (domain, rest) = name.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, function) = rest.split_once('.')?;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(slot)?, hex(function)?))
}

impl Sysfs {
    /// A tree at `root` laid out as sysfs is, whose devices are not in `/dev`: a device counts
    /// as there once its entry is (tests).
    pub fn at(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs {
            root: root.into(),
            real: false,
        }
    }

    fn entries(&self, dir: &Path) -> Vec<(String, PathBuf)> {
        std::fs::read_dir(self.root.join(dir))
            .map(|d| {
                d.flatten()
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The SCSI host number of the `controller`-th virtio-scsi controller, by PCI address.
    pub fn scsi_host(&self, controller: u32) -> Option<u32> {
        let mut controllers: Vec<((u32, u32, u32, u32), PathBuf)> = self
            .entries(Path::new("bus/virtio/drivers/virtio_scsi"))
            .into_iter()
            .filter(|(name, _)| name.starts_with("virtio"))
            .filter_map(|(_, link)| {
                let device = std::fs::canonicalize(link).ok()?;
                let pci = device.parent()?.file_name()?.to_str()?;
                Some((pci_key(pci)?, device))
            })
            .collect();
        controllers.sort();
        let (_, device) = controllers.get(usize::try_from(controller).ok()?)?;
        std::fs::read_dir(device)
            .ok()?
            .flatten()
            .find_map(|e| e.file_name().to_str()?.strip_prefix("host")?.parse().ok())
    }

    /// Asks the kernel to look for LUN `lun` of target 0 on the `controller`-th controller
    /// (`/sys/class/scsi_host/hostH/scan`): the guest boots with `scsi_mod.scan=manual`, so a
    /// disk attached cold is only found when asked for. Synchronous; finding nothing is no
    /// error. Only on the real sysfs.
    fn scan_scsi(&self, controller: u32, lun: u32) {
        if !self.real {
            return;
        }
        let Some(host) = self.scsi_host(controller) else {
            return;
        };
        let scan = self.root.join(format!("class/scsi_host/host{host}/scan"));
        if let Err(e) = std::fs::write(&scan, format!("0 0 {lun}")) {
            crate::warn!("asking {} for LUN {lun} failed: {e}", scan.display());
        }
    }

    /// The SCSI device directory name (`H:0:0:LUN`) of a SCSI location, when its host exists.
    fn scsi_device(&self, controller: u32, lun: u32) -> Option<String> {
        Some(format!("{}:0:0:{lun}", self.scsi_host(controller)?))
    }

    /// The block device name (`sdb`, `vdc`) of the disk at `location`, once it is there.
    pub fn disk(&self, location: &Location) -> Option<String> {
        match location {
            Location::Scsi { controller, lun } => {
                let device = self.scsi_device(*controller, *lun)?;
                let block = Path::new("bus/scsi/devices").join(device).join("block");
                self.entries(&block)
                    .into_iter()
                    .next()
                    .map(|(name, _)| name)
            }
            Location::VirtioBlk { serial } => self
                .entries(Path::new("block"))
                .into_iter()
                .filter(|(name, _)| name.starts_with("vd"))
                .find(|(_, dir)| {
                    std::fs::read_to_string(dir.join("serial")).is_ok_and(|s| s.trim() == serial)
                })
                .map(|(name, _)| name),
        }
    }

    /// The name of partition `n` of disk `disk`, once it is there.
    pub fn partition(&self, disk: &str, n: u32) -> Option<String> {
        self.entries(&Path::new("block").join(disk))
            .into_iter()
            .find(|(_, dir)| {
                std::fs::read_to_string(dir.join("partition"))
                    .is_ok_and(|p| p.trim().parse() == Ok(n))
            })
            .map(|(name, _)| name)
    }

    /// The `(major, minor)` of block device `name` (a disk or a partition).
    pub fn dev(&self, name: &str) -> Option<(u32, u32)> {
        let text =
            std::fs::read_to_string(self.root.join("class/block").join(name).join("dev")).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// The devices of disk `disk` and of its partitions.
    fn devs_of_disk(&self, disk: &str) -> Vec<(String, (u32, u32))> {
        let mut names = vec![disk.to_owned()];
        names.extend(
            self.entries(&Path::new("block").join(disk))
                .into_iter()
                .filter(|(_, dir)| dir.join("partition").is_file())
                .map(|(name, _)| name),
        );
        names
            .into_iter()
            .filter_map(|n| Some((n.clone(), self.dev(&n)?)))
            .collect()
    }
}

/// The filesystem on the device open as `file`, from its superblock: ext2/3/4 (`0xEF53` at
/// 1080), xfs (`XFSB` at 0), FAT (the boot sector's `0x55AA` with a `FAT` type string).
pub fn probe(file: &File) -> io::Result<Option<&'static str>> {
    let mut head = vec![0u8; 2048];
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read_at(&mut head[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    Ok(probe_bytes(&head))
}

fn probe_bytes(head: &[u8]) -> Option<&'static str> {
    let at = |offset: usize, len: usize| head.get(offset..offset + len);
    if at(1080, 2) == Some(&[0x53, 0xEF]) {
        return Some("ext4");
    }
    if at(0, 4) == Some(b"XFSB") {
        return Some("xfs");
    }
    let boot_signature = at(510, 2) == Some(&[0x55, 0xAA]);
    if boot_signature && (at(54, 3) == Some(b"FAT") || at(82, 3) == Some(b"FAT")) {
        return Some("vfat");
    }
    None
}

/// The block device node of `name` with device number `dev`: devtmpfs's `/dev/<name>`, made
/// when it is missing (a guest without devtmpfs).
fn device_node(name: &str, dev: (u32, u32)) -> Result<PathBuf, ApiError> {
    let node = Path::new("/dev").join(name);
    let wanted = makedev(u64::from(dev.0), u64::from(dev.1));
    match std::fs::metadata(&node) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == wanted => return Ok(node),
        Ok(_) => {
            return Err(ApiError::Mount {
                op: "use the device node",
                target: node.display().to_string(),
                source: io::Error::other("it is not the disk's block device"),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ApiError::Mount {
                op: "examine",
                target: node.display().to_string(),
                source,
            })
        }
    }
    mknod(
        &node,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        wanted,
    )
    .map_err(|e| ApiError::Mount {
        op: "make the device node",
        target: node.display().to_string(),
        source: e.into(),
    })?;
    Ok(node)
}

/// Waits (on uevents, until `deadline`) for `find` to find something in `/sys`.
async fn wait_for<T>(
    events: &Uevents,
    deadline: Instant,
    mut find: impl FnMut() -> Option<T>,
) -> Result<Option<T>, ApiError> {
    loop {
        if let Some(found) = find() {
            return Ok(Some(found));
        }
        match events.next(deadline).await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(source) => {
                return Err(ApiError::Mount {
                    op: "watch the kernel's device events for",
                    target: "the disk".to_owned(),
                    source,
                })
            }
        }
    }
}

/// Whether block device `name` is there *and* opens: its `/sys` entry appears before the
/// kernel has finished adding it (opening it is `ENXIO` until then), and the uevent that
/// announces it comes once it has — so the wait looks again then.
fn opens(sysfs: &Sysfs, name: &str) -> bool {
    if !sysfs.real {
        return true;
    }
    let Some(dev) = sysfs.dev(name) else {
        return false;
    };
    device_node(name, dev).is_ok_and(|node| match File::open(node) {
        Ok(_) => true,
        // Not added yet.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => false,
        // Anything else is for the mount to report.
        Err(_) => true,
    })
}

/// The block device (name) to mount for `req`: the disk, or its partition, once there.
async fn await_device(sysfs: &Sysfs, req: &DiskMount) -> Result<String, ApiError> {
    // Subscribed before the first look, so an arrival in between wakes the wait.
    let events = Uevents::open().map_err(|source| ApiError::Mount {
        op: "subscribe to the kernel's device events for",
        target: req.location.to_string(),
        source,
    })?;
    let deadline = Instant::now() + req.wait;
    // Asked for once its SCSI host is there (a look finds nothing before that).
    let mut scanned = false;
    let disk = wait_for(&events, deadline, || {
        let found = sysfs.disk(&req.location).filter(|d| opens(sysfs, d));
        if let (None, Location::Scsi { controller, lun }) = (&found, &req.location) {
            if !scanned && sysfs.scsi_host(*controller).is_some() {
                sysfs.scan_scsi(*controller, *lun);
                scanned = true;
                return sysfs.disk(&req.location).filter(|d| opens(sysfs, d));
            }
        }
        found
    })
    .await?
    .ok_or_else(|| ApiError::NoDevice {
        what: format!("{} did not appear within {:?}", req.location, req.wait),
    })?;
    if req.partition == 0 {
        return Ok(disk);
    }
    // Not the rest of the disk's wait: a partition the table does not have never comes.
    let deadline = Instant::now() + PARTITION_GRACE;
    wait_for(&events, deadline, || {
        sysfs
            .partition(&disk, req.partition)
            .filter(|p| opens(sysfs, p))
    })
    .await?
    .ok_or_else(|| ApiError::NoDevice {
        what: format!(
            "{} ({disk}) has no partition {}",
            req.location, req.partition
        ),
    })
}

/// The filesystem to mount `node` with: `asked` when the superblock agrees, else the probed one.
fn filesystem(node: &Path, asked: Option<&str>) -> Result<&'static str, ApiError> {
    let shown = || node.display().to_string();
    let asked = match asked {
        None => None,
        Some(fs) => Some(*FILESYSTEMS.iter().find(|k| **k == fs).ok_or_else(|| {
            ApiError::invalid(
                "fs_type",
                format!("{fs:?} is not one of {}", FILESYSTEMS.join(", ")),
            )
        })?),
    };
    let file = File::open(node).map_err(|source| ApiError::Mount {
        op: "open",
        target: shown(),
        source,
    })?;
    let probed = probe(&file).map_err(|source| ApiError::Mount {
        op: "read the superblock of",
        target: shown(),
        source,
    })?;
    match (asked, probed) {
        (_, None) => Err(ApiError::NoFilesystem { device: shown() }),
        (Some(asked), Some(found)) if asked != found => Err(ApiError::invalid(
            "fs_type",
            format!("{} holds {found}, not {asked}", shown()),
        )),
        (_, Some(found)) => Ok(found),
    }
}

/// Waits for the disk, then mounts it at its guest path (made when missing). A retry of a mount
/// already in place is a success; anything else mounted there is [`ApiError::Busy`].
///
/// # Errors
/// [`ApiError::InvalidArgument`] for a guest path, type or options that fail the checks;
/// [`ApiError::NoDevice`] / [`ApiError::NoFilesystem`] when the device, its partition or a
/// filesystem is missing; [`ApiError::Busy`]; [`ApiError::Mount`] with the kernel's reason.
pub async fn mount_disk(sysfs: &Sysfs, req: &DiskMount, decide: Decide) -> Result<(), ApiError> {
    const FIELD: &str = "guest_path";
    let target = path::check_mount_point(FIELD, &req.guest_path)?;
    let options = parse_options(req.read_only, &req.options)?;
    let name = await_device(sysfs, req).await?;
    let sysfs = sysfs.clone();
    let req = req.clone();
    tokio::task::spawn_blocking(move || {
        let dev = sysfs.dev(&name).ok_or_else(|| ApiError::NoDevice {
            what: format!("{} ({name}) went away", req.location),
        })?;
        let node = device_node(&name, dev)?;
        let fs = filesystem(&node, req.fs_type.as_deref())?;
        let target = prepare_mount_point(FIELD, &target)?;
        decide(&target.path)?;
        if let Some(there) = mounted_at(&mount_table()?, &target.path) {
            if there.dev == dev {
                return Ok(());
            }
            return Err(ApiError::Busy {
                what: format!("something is mounted at {} already", req.guest_path),
            });
        }
        let data = (!options.data.is_empty()).then_some(options.data.as_str());
        mount(
            Some(&node),
            &target.syscall_path(),
            Some(fs),
            options.flags,
            data,
        )
        .map_err(|e| {
            let source = io::Error::from(e);
            match e {
                Errno::EACCES | Errno::EROFS if !req.read_only => ApiError::Mount {
                    op: "mount (the disk is read-only: mount it read-only)",
                    target: req.guest_path.clone(),
                    source,
                },
                _ => ApiError::Mount {
                    op: "mount",
                    target: format!("{} ({fs}) at {}", node.display(), req.guest_path),
                    source,
                },
            }
        })?;
        info!(
            "mounted {} ({}, {fs}{}) at {}",
            req.location,
            node.display(),
            if req.read_only { ", read-only" } else { "" },
            req.guest_path
        );
        Ok(())
    })
    .await
    .map_err(|e| ApiError::Mount {
        op: "mount",
        target: "the disk".to_owned(),
        source: io::Error::other(e),
    })?
}

/// Unmounts the disk at `guest_path` (never lazily; in use is [`ApiError::Busy`]).
///
/// # Errors
/// As [`super::unmount`].
pub async fn unmount_disk(guest_path: String) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || super::unmount("guest_path", &guest_path))
        .await
        .map_err(|e| ApiError::Mount {
            op: "unmount",
            target: "the disk".to_owned(),
            source: io::Error::other(e),
        })?
}

/// Lets go of the disk at `location` before the host removes it: a SCSI disk is deleted from
/// the SCSI layer (`…/H:0:0:LUN/delete`), refused while it or a partition is mounted; a
/// virtio-blk disk needs nothing. A disk that is not there is fine.
///
/// # Errors
/// [`ApiError::Busy`] while mounted; [`ApiError::Mount`] when the kernel refuses.
pub fn eject_disk(sysfs: &Sysfs, location: &Location) -> Result<(), ApiError> {
    let Location::Scsi { controller, lun } = location else {
        return Ok(());
    };
    let Some(device) = sysfs.scsi_device(*controller, *lun) else {
        return Ok(());
    };
    let dir = sysfs.root.join("bus/scsi/devices").join(&device);
    if !dir.exists() {
        return Ok(());
    }
    if let Some(disk) = sysfs.disk(location) {
        let table = mount_table()?;
        for (name, dev) in sysfs.devs_of_disk(&disk) {
            if let Some(m) = table.iter().find(|m| m.dev == dev) {
                return Err(ApiError::Busy {
                    what: format!(
                        "{location} ({name}) is still mounted at {}",
                        m.mount_point.display()
                    ),
                });
            }
        }
    }
    match std::fs::write(dir.join("delete"), "1") {
        Ok(()) => {
            info!("ejected {location} ({device})");
            Ok(())
        }
        // Deleted meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ApiError::Mount {
            op: "eject",
            target: location.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysfs with virtio-scsi controllers at `pci` slots (SCSI hosts numbered in the order
    /// given, as a kernel probing them in another order would), a disk `sdb` with partition 1
    /// at host-of-controller-1:0:0:3, and a virtio-blk `vda` with serial `uvm-disk-7`.
    fn fake_sysfs(pci: &[&str]) -> (tempfile::TempDir, Sysfs) {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let drivers = root.join("bus/virtio/drivers/virtio_scsi");
        std::fs::create_dir_all(&drivers).expect("mkdir");
        for (host, addr) in pci.iter().enumerate() {
            let virtio = root.join(format!("devices/pci0000:00/{addr}/virtio{host}"));
            std::fs::create_dir_all(virtio.join(format!("host{host}"))).expect("mkdir");
            symlink(&virtio, drivers.join(format!("virtio{host}"))).expect("link");
        }
        std::fs::create_dir_all(drivers.join("module")).expect("not a controller");
        let sd = root.join("devices/pci0000:00/x/virtio/host/target/1:0:0:3/block/sdb");
        std::fs::create_dir_all(sd.join("sdb1")).expect("mkdir");
        std::fs::write(sd.join("sdb1/partition"), "1\n").expect("write");
        std::fs::create_dir_all(root.join("bus/scsi/devices/1:0:0:3/block")).expect("mkdir");
        symlink(&sd, root.join("bus/scsi/devices/1:0:0:3/block/sdb")).expect("link");
        std::fs::create_dir_all(root.join("block")).expect("mkdir");
        symlink(&sd, root.join("block/sdb")).expect("link");
        for (name, dev) in [("sdb", "8:16"), ("sdb1", "8:17")] {
            let class = root.join("class/block").join(name);
            std::fs::create_dir_all(&class).expect("mkdir");
            std::fs::write(class.join("dev"), format!("{dev}\n")).expect("write");
        }
        std::fs::create_dir_all(root.join("block/vda")).expect("mkdir");
        std::fs::write(root.join("block/vda/serial"), "uvm-disk-7\n").expect("write");
        let sysfs = Sysfs::at(root);
        (dir, sysfs)
    }

    #[test]
    fn controllers_are_numbered_by_pci_address_not_by_probe_order() {
        // The kernel probed 0000:00:11.0 first (host0): it is still controller 1.
        let (_dir, sysfs) = fake_sysfs(&["0000:00:11.0", "0000:00:10.0"]);
        assert_eq!(sysfs.scsi_host(0), Some(1));
        assert_eq!(sysfs.scsi_host(1), Some(0));
        assert_eq!(sysfs.scsi_host(2), None);
    }

    #[test]
    fn a_scsi_disk_is_found_at_its_host_target_0_and_lun() {
        let (_dir, sysfs) = fake_sysfs(&["0000:00:10.0", "0000:00:11.0"]);
        let at = |controller, lun| sysfs.disk(&Location::Scsi { controller, lun });
        assert_eq!(at(1, 3).as_deref(), Some("sdb"));
        assert_eq!(at(1, 4), None);
        assert_eq!(at(0, 3), None);
        assert_eq!(sysfs.partition("sdb", 1).as_deref(), Some("sdb1"));
        assert_eq!(sysfs.partition("sdb", 2), None);
        assert_eq!(sysfs.dev("sdb1"), Some((8, 17)));
        let devs = sysfs.devs_of_disk("sdb");
        assert_eq!(
            devs,
            [("sdb".to_owned(), (8, 16)), ("sdb1".to_owned(), (8, 17))]
        );
    }

    #[test]
    fn a_virtio_blk_disk_is_found_by_its_serial() {
        let (_dir, sysfs) = fake_sysfs(&[]);
        let serial = |s: &str| Location::VirtioBlk {
            serial: s.to_owned(),
        };
        assert_eq!(sysfs.disk(&serial("uvm-disk-7")).as_deref(), Some("vda"));
        assert_eq!(sysfs.disk(&serial("uvm-disk-8")), None);
    }

    #[test]
    fn ejecting_a_disk_that_is_not_there_or_virtio_blk_is_harmless() {
        let (_dir, sysfs) = fake_sysfs(&["0000:00:10.0"]);
        eject_disk(
            &sysfs,
            &Location::Scsi {
                controller: 0,
                lun: 9,
            },
        )
        .expect("not there");
        eject_disk(
            &sysfs,
            &Location::Scsi {
                controller: 5,
                lun: 0,
            },
        )
        .expect("no controller");
        eject_disk(
            &sysfs,
            &Location::VirtioBlk {
                serial: "uvm-disk-7".into(),
            },
        )
        .expect("virtio-blk");
    }

    fn superblock(fs: &str) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        match fs {
            "ext4" => b[1080..1082].copy_from_slice(&[0x53, 0xEF]),
            "xfs" => b[..4].copy_from_slice(b"XFSB"),
            "fat32" => {
                b[82..90].copy_from_slice(b"FAT32   ");
                b[510..512].copy_from_slice(&[0x55, 0xAA]);
            }
            "fat16" => {
                b[54..59].copy_from_slice(b"FAT16");
                b[510..512].copy_from_slice(&[0x55, 0xAA]);
            }
            _ => {}
        }
        b
    }

    #[test]
    fn superblocks_tell_ext4_xfs_and_fat_apart_from_nothing() {
        assert_eq!(probe_bytes(&superblock("ext4")), Some("ext4"));
        assert_eq!(probe_bytes(&superblock("xfs")), Some("xfs"));
        assert_eq!(probe_bytes(&superblock("fat32")), Some("vfat"));
        assert_eq!(probe_bytes(&superblock("fat16")), Some("vfat"));
        assert_eq!(probe_bytes(&superblock("none")), None);
        assert_eq!(probe_bytes(&[]), None);
        // A FAT type string without the boot signature is not FAT.
        let mut half = superblock("fat32");
        half[510] = 0;
        assert_eq!(probe_bytes(&half), None);
    }

    #[test]
    fn an_asked_type_must_be_known_and_match_the_superblock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("ext4.img");
        std::fs::write(&image, superblock("ext4")).expect("write");
        assert_eq!(filesystem(&image, None).expect("probed"), "ext4");
        assert_eq!(filesystem(&image, Some("ext4")).expect("agrees"), "ext4");
        assert!(matches!(
            filesystem(&image, Some("xfs")),
            Err(ApiError::InvalidArgument { reason, .. }) if reason.contains("holds ext4, not xfs")
        ));
        assert!(matches!(
            filesystem(&image, Some("ntfs")),
            Err(ApiError::InvalidArgument {
                field: "fs_type",
                ..
            })
        ));
        let blank = dir.path().join("blank.img");
        std::fs::write(&blank, vec![0u8; 4096]).expect("write");
        assert!(matches!(
            filesystem(&blank, None),
            Err(ApiError::NoFilesystem { .. })
        ));
    }

    #[tokio::test]
    async fn a_disk_that_never_appears_is_not_found_after_the_wait() {
        let (_dir, sysfs) = fake_sysfs(&["0000:00:10.0"]);
        let req = DiskMount {
            location: Location::Scsi {
                controller: 0,
                lun: 1,
            },
            guest_path: "/mnt/never".into(),
            partition: 0,
            read_only: false,
            fs_type: None,
            options: Vec::new(),
            wait: Duration::from_millis(50),
        };
        assert!(matches!(
            await_device(&sysfs, &req).await,
            Err(ApiError::NoDevice { what }) if what.contains("did not appear")
        ));
    }

    #[tokio::test]
    async fn a_present_disk_is_found_at_once_and_a_missing_partition_is_not_found() {
        let (_dir, sysfs) = fake_sysfs(&["0000:00:10.0", "0000:00:11.0"]);
        let mut req = DiskMount {
            location: Location::Scsi {
                controller: 1,
                lun: 3,
            },
            guest_path: "/mnt/d".into(),
            partition: 1,
            read_only: false,
            fs_type: None,
            options: Vec::new(),
            wait: Duration::from_secs(30),
        };
        assert_eq!(await_device(&sysfs, &req).await.expect("there"), "sdb1");
        req.partition = 0;
        assert_eq!(await_device(&sysfs, &req).await.expect("there"), "sdb");
        req.partition = 2;
        assert!(matches!(
            await_device(&sysfs, &req).await,
            Err(ApiError::NoDevice { what }) if what.contains("no partition 2")
        ));
    }
}
