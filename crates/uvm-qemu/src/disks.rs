//! Disks on QEMU: what the command line and QMP say about them, as pure functions, and the
//! books of one VM's attached disks.
//!
//! q35: `VmConfig::scsi_controllers` `virtio-scsi-pci` controllers, cold-plugged at fixed,
//! increasing PCI addresses ([`SCSI_FIRST_PCI_SLOT`] + controller) so that the guest, which
//! numbers SCSI hosts by probe order, finds controller N as the N-th by PCI address. A disk at
//! slot (controller, lun) is a `scsi-hd` on bus `scsi<controller>.0`, channel 0, scsi-id 0,
//! LUN lun + 1 ([`scsi_lun`]) — hot-added with QMP `blockdev-add` + `device_add`, removed with `device_del`
//! (awaiting `DEVICE_DELETED`) + `blockdev-del`. microvm: no PCI and no hotplug: disks given at
//! create are `virtio-blk-device`s on virtio-mmio, with the serial `uvm-disk-<slot index>` the
//! guest finds them by.
//!
//! Every image is opened with QEMU's image locking on (OFD locks): a second QEMU that wants to
//! write an image another one writes is refused, and that refusal becomes
//! [`HostError::InvalidInput`].

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};
use uvm::seams::{cold_disk_slot, DiskCache, DiskConfig, DiskFormat, DiskSpec, ScsiSlot};
use uvm::HostError;

use crate::qmp::{Command, Empty, QmpError};
use crate::Machine;

/// The PCI slot (on `pcie.0`) of SCSI controller 0; controller N sits at this + N. Far above
/// the slots QEMU hands out to devices without an address (1, 2, …) and below ICH9's 0x1f.
pub const SCSI_FIRST_PCI_SLOT: u8 = 0x10;
/// Most SCSI controllers a q35 VM gets (slots 0x10..=0x1e).
pub const MAX_SCSI_CONTROLLERS: u8 = 15;

/// The qdev id of the disk at `slot` (also its block node's name: QEMU keeps the two apart).
pub(crate) fn disk_id(slot: ScsiSlot) -> String {
    format!("disk{}", slot.index())
}

/// The serial of a virtio-blk disk at `slot` (at most 20 bytes: virtio-blk's limit).
pub(crate) fn virtio_blk_serial(slot: ScsiSlot) -> String {
    format!("uvm-disk-{}", slot.index())
}

fn scsi_bus(controller: u8) -> String {
    format!("scsi{controller}.0")
}

/// The checks of a disk's host path, as QEMU (running as us) will open it.
///
/// # Errors
/// [`HostError::InvalidInput`] (`what`: `disk`) for a relative path, a path that does not
/// exist, a directory, something neither a regular file nor a block device, a file this user
/// cannot read — or cannot write, for a writable disk.
pub fn check_host_path(disk: &DiskConfig) -> Result<(), HostError> {
    let path = &disk.host_path;
    let shown = path.display();
    if !path.is_absolute() {
        return Err(invalid(format!("{shown} is not an absolute path")));
    }
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => invalid(format!("{shown} does not exist")),
        _ => invalid(format!("{shown} cannot be examined: {e}")),
    })?;
    if meta.is_dir() {
        return Err(invalid(format!(
            "{shown} is a directory, not a disk image (share it instead)"
        )));
    }
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(invalid(format!(
            "{shown} is neither a regular file nor a block device"
        )));
    }
    let mut open = std::fs::OpenOptions::new();
    open.read(true).write(!disk.read_only);
    open.open(path).map_err(|e| {
        let access = if disk.read_only {
            "readable"
        } else {
            "readable and writable (attach it read-only?)"
        };
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => invalid(format!("{shown} is not {access}")),
            _ => invalid(format!("{shown} cannot be opened: {e}")),
        }
    })?;
    Ok(())
}

fn invalid(message: String) -> HostError {
    HostError::InvalidInput {
        what: "disk",
        message,
    }
}

/// The `blockdev-add` arguments (also `-blockdev`'s JSON) of `disk` as node `node`: a format
/// node (`raw`/`qcow2`) over a protocol node (`file`, or `host_device` for a block device) with
/// locking on.
pub(crate) fn blockdev(node: &str, disk: &DiskConfig) -> Value {
    let (direct, no_flush) = match disk.cache {
        DiskCache::None => (true, false),
        DiskCache::Writeback | DiskCache::Writethrough => (false, false),
        DiskCache::Unsafe => (false, true),
    };
    let cache = json!({ "direct": direct, "no-flush": no_flush });
    let discard = if disk.discard { "unmap" } else { "ignore" };
    let is_block = std::fs::metadata(&disk.host_path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let format = match disk.format {
        DiskFormat::Raw => "raw",
        DiskFormat::Qcow2 => "qcow2",
    };
    json!({
        "driver": format,
        "node-name": node,
        "read-only": disk.read_only,
        "discard": discard,
        "cache": cache,
        "file": {
            "driver": if is_block { "host_device" } else { "file" },
            "node-name": format!("{node}-file"),
            "filename": disk.host_path.to_string_lossy(),
            "read-only": disk.read_only,
            "locking": "on",
            "discard": discard,
            "cache": cache,
        },
    })
}

/// The SCSI LUN of the disk at `slot`: one above the slot's, so that LUN 0 stays empty. The
/// guest boots with `scsi_mod.scan=manual` (no bus scan: [`crate::FAST_BOOT_ARGS`]), and under
/// it Linux ignores virtio-scsi's hotplug event for a LUN 0 (that event rescans the whole
/// target, which manual scanning skips) while it adds any other LUN directly.
pub(crate) fn scsi_lun(slot: ScsiSlot) -> u8 {
    slot.lun + 1
}

/// The `device_add` arguments of a `scsi-hd` for `disk` at `slot` over node `node`.
pub(crate) fn scsi_hd(slot: ScsiSlot, node: &str, disk: &DiskConfig) -> Value {
    let mut device = json!({
        "driver": "scsi-hd",
        "id": node,
        "drive": node,
        "bus": scsi_bus(slot.controller),
        "channel": 0,
        "scsi-id": 0,
        "lun": scsi_lun(slot),
    });
    if disk.cache == DiskCache::Writethrough {
        device["write-cache"] = json!("off");
    }
    device
}

/// The QEMU arguments of the disks of a VM: its SCSI controllers (q35), then each disk given
/// at create at its cold slot.
pub(crate) fn command_line(machine: Machine, controllers: u8, disks: &[DiskSpec]) -> Vec<String> {
    let mut args = Vec::new();
    if machine == Machine::Q35 {
        for c in 0..controllers {
            args.push("-device".to_owned());
            args.push(format!(
                "virtio-scsi-pci,id=scsi{c},addr={:#04x}.0",
                SCSI_FIRST_PCI_SLOT + c
            ));
        }
    }
    for (i, spec) in disks.iter().enumerate() {
        // `check_cold` refused what has no slot.
        let Some(slot) = cold_disk_slot(i) else {
            continue;
        };
        let node = disk_id(slot);
        args.push("-blockdev".to_owned());
        args.push(blockdev(&node, &spec.disk).to_string());
        let writethrough = if spec.disk.cache == DiskCache::Writethrough {
            ",write-cache=off"
        } else {
            ""
        };
        args.push("-device".to_owned());
        args.push(match machine {
            Machine::Q35 => format!(
                "scsi-hd,id={node},drive={node},bus={},channel=0,scsi-id=0,lun={}{writethrough}",
                scsi_bus(slot.controller),
                scsi_lun(slot)
            ),
            Machine::Microvm => format!(
                "virtio-blk-device,id={node},drive={node},serial={}{writethrough}",
                virtio_blk_serial(slot)
            ),
        });
    }
    args
}

/// The checks of the disks given at create: each has a slot on the VM's controllers and a
/// host path QEMU can open. Two of them may not share an image.
///
/// # Errors
/// [`HostError::InvalidInput`] for too many controllers, a disk beyond the last controller, a
/// path that fails [`check_host_path`], or an image given twice.
pub fn check_cold(machine: Machine, controllers: u8, disks: &[DiskSpec]) -> Result<(), HostError> {
    if machine == Machine::Q35 && controllers > MAX_SCSI_CONTROLLERS {
        return Err(HostError::InvalidInput {
            what: "SCSI controllers",
            message: format!("{controllers} is above the maximum of {MAX_SCSI_CONTROLLERS}"),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (i, spec) in disks.iter().enumerate() {
        let slot = cold_disk_slot(i).ok_or_else(|| invalid(format!("disk {i} has no slot")))?;
        if machine == Machine::Q35 && slot.controller >= controllers {
            return Err(invalid(format!(
                "disk {i} needs SCSI controller {}, and the VM has {controllers}",
                slot.controller
            )));
        }
        check_host_path(&spec.disk)?;
        if !seen.insert(spec.disk.host_path.clone()) {
            return Err(invalid(format!(
                "{} is given twice",
                spec.disk.host_path.display()
            )));
        }
    }
    Ok(())
}

/// What QEMU's refusal of `command` for `path` means to the caller: an image another QEMU has
/// open for writing (QEMU's image locking) is bad input, anything else a failed `operation`.
pub(crate) fn qmp_failure(
    operation: &'static str,
    command: &'static str,
    path: &Path,
    source: QmpError,
) -> HostError {
    match &source {
        QmpError::Command { desc, .. } if is_lock_refusal(desc) => invalid(format!(
            "{} is in use: another VM (or process) has it open for writing ({desc})",
            path.display()
        )),
        QmpError::Closed => HostError::Gone,
        _ => crate::error::QemuError::Qmp { command, source }.into_host(operation),
    }
}

/// Whether QEMU's error text is its image-locking refusal (`Failed to get "write" lock`,
/// `Failed to get shared "write" lock`).
pub(crate) fn is_lock_refusal(text: &str) -> bool {
    text.contains("Failed to get") && text.contains("lock")
}

/// A disk QEMU has, hot or cold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attached {
    pub config: DiskConfig,
    /// Given at create (on the command line).
    pub cold: bool,
}

/// The disks of one VM by slot. The attach and detach of one VM run one at a time (their
/// lock is held across the QMP exchange), so the books and QEMU agree.
pub(crate) type DiskTable = tokio::sync::Mutex<HashMap<ScsiSlot, Attached>>;

/// The books of a VM created with `disks`.
pub(crate) fn cold_table(disks: &[DiskSpec]) -> HashMap<ScsiSlot, Attached> {
    disks
        .iter()
        .enumerate()
        .filter_map(|(i, spec)| {
            Some((
                cold_disk_slot(i)?,
                Attached {
                    config: spec.disk.clone(),
                    cold: true,
                },
            ))
        })
        .collect()
}

/// QMP `blockdev-add` with the arguments of [`blockdev`].
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct BlockdevAdd(pub Value);
impl Command for BlockdevAdd {
    const NAME: &'static str = "blockdev-add";
    type Output = Empty;
}

/// QMP `device_add` with the arguments of [`scsi_hd`].
#[derive(Serialize)]
#[serde(transparent)]
pub(crate) struct DeviceAdd(pub Value);
impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Output = Empty;
}

/// QMP `blockdev-del`: remove a node (and the children made with it).
#[derive(Serialize)]
pub(crate) struct BlockdevDel {
    #[serde(rename = "node-name")]
    pub node_name: String,
}
impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Output = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm::seams::DiskMount;

    fn spec(path: &Path) -> DiskSpec {
        DiskSpec {
            disk: DiskConfig::raw(path),
            mount: DiskMount::at("/mnt/d"),
        }
    }

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(1 << 20).expect("size");
        f
    }

    #[test]
    fn a_missing_path_a_directory_and_a_relative_path_are_invalid_input() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            (dir.path().join("nope.img"), "does not exist"),
            (dir.path().to_path_buf(), "is a directory"),
            ("rel.img".into(), "not an absolute path"),
        ];
        for (path, says) in cases {
            let e = check_host_path(&DiskConfig::raw(&path)).expect_err("refused");
            assert!(
                matches!(&e, HostError::InvalidInput { what: "disk", message } if message.contains(says)),
                "{path:?}: {e:?}"
            );
        }
        let chr = check_host_path(&DiskConfig::raw("/dev/null")).expect_err("a char device");
        assert!(
            matches!(&chr, HostError::InvalidInput { message, .. } if message.contains("neither")),
            "{chr:?}"
        );
    }

    #[test]
    fn an_unreadable_file_is_invalid_input_unless_we_are_root() {
        use std::os::unix::fs::PermissionsExt;
        let f = image();
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let refused = check_host_path(&DiskConfig::raw(f.path()));
        if rustix::process::geteuid().is_root() {
            // Root opens it anyway, and so would QEMU.
            assert!(refused.is_ok(), "{refused:?}");
        } else {
            assert!(
                matches!(&refused, Err(HostError::InvalidInput { message, .. }) if message.contains("not readable")),
                "{refused:?}"
            );
        }
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        check_host_path(&DiskConfig::raw(f.path())).expect("a readable image passes");
    }

    #[test]
    fn blockdev_is_a_format_node_over_a_locked_file_node() {
        let f = image();
        let mut disk = DiskConfig::raw(f.path());
        disk.read_only = true;
        disk.discard = true;
        disk.cache = DiskCache::None;
        let v = blockdev("disk3", &disk);
        assert_eq!(v["driver"], "raw");
        assert_eq!(v["node-name"], "disk3");
        assert_eq!(v["read-only"], true);
        assert_eq!(v["discard"], "unmap");
        assert_eq!(v["cache"], json!({"direct": true, "no-flush": false}));
        assert_eq!(v["file"]["driver"], "file");
        assert_eq!(v["file"]["node-name"], "disk3-file");
        assert_eq!(v["file"]["locking"], "on");
        assert_eq!(v["file"]["read-only"], true);
        assert_eq!(v["file"]["filename"], f.path().to_string_lossy().as_ref());
        disk.format = DiskFormat::Qcow2;
        disk.cache = DiskCache::Unsafe;
        disk.discard = false;
        let v = blockdev("disk3", &disk);
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(v["discard"], "ignore");
        assert_eq!(v["cache"], json!({"direct": false, "no-flush": true}));
    }

    #[test]
    fn scsi_hd_sits_at_its_slot_with_writethrough_as_write_cache_off() {
        let slot = ScsiSlot {
            controller: 1,
            lun: 5,
        };
        let mut disk = DiskConfig::raw("/i.img");
        let v = scsi_hd(slot, &disk_id(slot), &disk);
        assert_eq!(
            v,
            json!({"driver": "scsi-hd", "id": "disk69", "drive": "disk69", "bus": "scsi1.0",
                   "channel": 0, "scsi-id": 0, "lun": 6})
        );
        disk.cache = DiskCache::Writethrough;
        assert_eq!(scsi_hd(slot, "disk69", &disk)["write-cache"], "off");
    }

    #[test]
    fn q35_gets_controllers_at_increasing_pci_slots_and_cold_disks_at_their_slots() {
        let f = image();
        let args = command_line(Machine::Q35, 2, &[spec(f.path()), spec(f.path())]);
        let devices: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            devices,
            [
                "virtio-scsi-pci,id=scsi0,addr=0x10.0",
                "virtio-scsi-pci,id=scsi1,addr=0x11.0",
                "scsi-hd,id=disk0,drive=disk0,bus=scsi0.0,channel=0,scsi-id=0,lun=1",
                "scsi-hd,id=disk1,drive=disk1,bus=scsi0.0,channel=0,scsi-id=0,lun=2",
            ]
        );
        let blockdevs: Vec<Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).expect("JSON"))
            .collect();
        assert_eq!(blockdevs.len(), 2);
        assert_eq!(blockdevs[1]["node-name"], "disk1");
    }

    #[test]
    fn microvm_gets_no_controllers_and_virtio_blk_disks_with_their_serials() {
        let f = image();
        let args = command_line(Machine::Microvm, 1, &[spec(f.path())]);
        let devices: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "-device")
            .map(|w| w[1].as_str())
            .collect();
        assert_eq!(
            devices,
            ["virtio-blk-device,id=disk0,drive=disk0,serial=uvm-disk-0"]
        );
    }

    #[test]
    fn cold_disks_beyond_the_controllers_or_given_twice_are_refused() {
        let f = image();
        let one = [spec(f.path())];
        assert!(matches!(
            check_cold(Machine::Q35, 0, &one),
            Err(HostError::InvalidInput { what: "disk", .. })
        ));
        check_cold(Machine::Q35, 1, &one).expect("fits");
        check_cold(Machine::Microvm, 0, &one).expect("microvm needs no controller");
        assert!(matches!(
            check_cold(Machine::Q35, 1, &[spec(f.path()), spec(f.path())]),
            Err(HostError::InvalidInput { message, .. }) if message.contains("twice")
        ));
        assert!(matches!(
            check_cold(Machine::Q35, MAX_SCSI_CONTROLLERS + 1, &[]),
            Err(HostError::InvalidInput {
                what: "SCSI controllers",
                ..
            })
        ));
    }

    #[test]
    fn qemus_lock_refusal_is_invalid_input() {
        let refused = QmpError::Command {
            command: "device_add",
            class: "GenericError".into(),
            desc: "Failed to get \"write\" lock".into(),
        };
        let e = qmp_failure("attach disk", "device_add", Path::new("/i.img"), refused);
        assert!(
            matches!(&e, HostError::InvalidInput { what: "disk", message } if message.contains("in use")),
            "{e:?}"
        );
        let other = QmpError::Command {
            command: "device_add",
            class: "GenericError".into(),
            desc: "Bus 'scsi0.0' not found".into(),
        };
        assert!(matches!(
            qmp_failure("attach disk", "device_add", Path::new("/i.img"), other),
            HostError::Failed {
                operation: "attach disk",
                ..
            }
        ));
    }
}
