//! Disks and shares on QEMU ([`HostDevices`]). Disks: SCSI on q35 (hot-added through QMP),
//! virtio-blk given at create on microvm (see [`crate::disks`]). Shares: virtio-fs through one
//! virtiofsd each (hot-added on q35 through PCIe root ports), or 9p given at create (see
//! [`crate::shares`]).

use std::time::Duration;

use async_trait::async_trait;
use uvm::seams::{DiskConfig, DiskLocation, HostDevices, ScsiSlot, ShareConfig, ShareTransport};
use uvm::HostError;

use crate::disks::{
    self, blockdev, disk_id, qmp_failure, scsi_hd, Attached, BlockdevAdd, BlockdevDel, DeviceAdd,
};
use crate::error::QemuError;
use crate::hotplug::{DeviceDel, Unplugged};
use crate::qmp::{Command, QmpClient, QmpError};
use crate::vm::{QemuVm, QMP_TIMEOUT};
use crate::Machine;

/// How long a detach waits for QEMU's `DEVICE_DELETED` (a virtio-scsi unplug is immediate;
/// this bounds a QEMU that does not answer).
const DETACH_TIMEOUT: Duration = Duration::from_secs(10);

fn unsupported(operation: &'static str) -> HostError {
    HostError::Unsupported {
        backend: "qemu",
        operation,
    }
}

/// Runs `command` under [`QMP_TIMEOUT`]; the error is QMP's own, a timeout `None`.
async fn execute<C: Command>(qmp: &QmpClient, command: &C) -> Result<C::Output, Option<QmpError>> {
    match tokio::time::timeout(QMP_TIMEOUT, qmp.execute(command)).await {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

fn timed_out(operation: &'static str) -> HostError {
    HostError::Timeout {
        operation,
        after: QMP_TIMEOUT,
    }
}

impl QemuVm {
    /// `blockdev-add` then `device_add`; a failed `device_add` removes the node again.
    async fn hot_add(&self, slot: ScsiSlot, disk: &DiskConfig) -> Result<(), HostError> {
        const OP: &str = "attach disk";
        let qmp = self.qmp().await?;
        let node = disk_id(slot);
        let path = &disk.host_path;
        if let Err(e) = execute(&qmp, &BlockdevAdd(blockdev(&node, disk))).await {
            // A timed-out add may still happen: do not leave the node behind.
            if e.is_none() {
                self.forget_node(&qmp, &node).await;
            }
            return Err(e.map_or_else(
                || timed_out(OP),
                |e| qmp_failure(OP, BlockdevAdd::NAME, path, e),
            ));
        }
        if let Err(e) = execute(&qmp, &DeviceAdd(scsi_hd(slot, &node, disk))).await {
            if e.is_none() {
                let _ = execute(&qmp, &DeviceDel { id: node.clone() }).await;
            }
            self.forget_node(&qmp, &node).await;
            return Err(e.map_or_else(
                || timed_out(OP),
                |e| qmp_failure(OP, DeviceAdd::NAME, path, e),
            ));
        }
        Ok(())
    }

    /// Best effort, on a failure path: remove the block node `node`.
    async fn forget_node(&self, qmp: &QmpClient, node: &str) {
        if let Err(e) = self.delete_node(qmp, node).await {
            tracing::warn!(vm = %self.runtime_dir().display(), node, error = %uvm_util::error_chain(&e), "cannot remove a block node");
        }
    }

    /// `blockdev-del`; a node QEMU does not have is already deleted.
    async fn delete_node(&self, qmp: &QmpClient, node: &str) -> Result<(), HostError> {
        const OP: &str = "detach disk";
        match execute(
            qmp,
            &BlockdevDel {
                node_name: node.to_owned(),
            },
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(Some(QmpError::Command { desc, .. })) if desc.contains("Failed to find node") => {
                Ok(())
            }
            Err(Some(QmpError::Closed)) => Err(HostError::Gone),
            Err(Some(source)) => Err(QemuError::Qmp {
                command: BlockdevDel::NAME,
                source,
            }
            .into_host(OP)),
            Err(None) => Err(timed_out(OP)),
        }
    }

    /// `device_del`, then wait for `DEVICE_DELETED` ([`QemuVm::unplug`], shared with shares),
    /// then `blockdev-del`. A QEMU that is gone has let go of the disk: Ok.
    async fn hot_remove(&self, slot: ScsiSlot) -> Result<(), HostError> {
        const OP: &str = "detach disk";
        let id = disk_id(slot);
        match self.unplug(OP, &id, DETACH_TIMEOUT).await? {
            Unplugged::QemuGone => Ok(()),
            Unplugged::Removed => {
                let qmp = self.qmp().await?;
                self.delete_node(&qmp, &id).await
            }
        }
    }
}

#[async_trait]
impl HostDevices for QemuVm {
    /// q35 only: `blockdev-add` + `device_add scsi-hd` at `slot`. Attaching the same disk at
    /// the same slot again is a no-op.
    async fn attach_disk(&self, slot: ScsiSlot, disk: &DiskConfig) -> Result<(), HostError> {
        if self.machine() == Machine::Microvm {
            return Err(unsupported("hot-adding disks on microvm"));
        }
        if u32::from(slot.lun) >= ScsiSlot::LUNS_PER_CONTROLLER
            || slot.controller >= self.scsi_controllers
        {
            return Err(HostError::InvalidInput {
                what: "SCSI slot",
                message: format!(
                    "controller {} LUN {} does not exist: the VM has {} controller(s) of {} LUNs",
                    slot.controller,
                    slot.lun,
                    self.scsi_controllers,
                    ScsiSlot::LUNS_PER_CONTROLLER
                ),
            });
        }
        disks::check_host_path(disk)?;
        let mut table = self.disks.lock().await;
        if let Some(attached) = table.get(&slot) {
            if attached.config == *disk {
                return Ok(());
            }
            return Err(HostError::InvalidInput {
                what: "SCSI slot",
                message: format!(
                    "controller {} LUN {} holds {} already",
                    slot.controller,
                    slot.lun,
                    attached.config.host_path.display()
                ),
            });
        }
        self.hot_add(slot, disk).await?;
        tracing::info!(slot = slot.index(), path = %disk.host_path.display(), "disk attached");
        table.insert(
            slot,
            Attached {
                config: disk.clone(),
                cold: false,
            },
        );
        Ok(())
    }

    /// Ok for an empty slot, and once QEMU is gone (it has let go of every disk). microvm
    /// cannot unplug its virtio-mmio disks: `Unsupported` there while QEMU runs.
    async fn detach_disk(&self, slot: ScsiSlot) -> Result<(), HostError> {
        let mut table = self.disks.lock().await;
        let Some(attached) = table.get(&slot) else {
            return Ok(());
        };
        if self.machine() == Machine::Microvm {
            if self.qemu_running() {
                return Err(unsupported("removing disks on microvm"));
            }
            // Gone with QEMU.
            table.remove(&slot);
            return Ok(());
        }
        match self.hot_remove(slot).await {
            Ok(()) | Err(HostError::Gone) => {}
            Err(e) => return Err(e),
        }
        tracing::info!(slot = slot.index(), path = %attached.config.host_path.display(), cold = attached.cold, "disk detached");
        table.remove(&slot);
        Ok(())
    }

    fn disk_location(&self, slot: ScsiSlot) -> DiskLocation {
        match self.machine() {
            Machine::Q35 => DiskLocation::Scsi {
                controller: slot.controller,
                lun: disks::scsi_lun(slot),
            },
            Machine::Microvm => DiskLocation::VirtioBlk {
                serial: disks::virtio_blk_serial(slot),
            },
        }
    }

    async fn add_share(&self, tag: &str, share: &ShareConfig) -> Result<(), HostError> {
        self.shares.add(self, tag, share).await
    }

    async fn remove_share(&self, tag: &str) -> Result<(), HostError> {
        self.shares.remove(self, tag).await
    }

    fn share_transport(&self, tag: &str) -> ShareTransport {
        self.shares.transport(tag)
    }
}
