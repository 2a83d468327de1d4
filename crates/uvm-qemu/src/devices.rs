//! Disks and shares on QEMU ([`HostDevices`]). Shares are built (module `shares`); disks not
//! yet: every attach is a typed `Unsupported`, and a VM given disks at create is refused (see
//! `QemuBackend::check`), so nothing is ever silently left out.

use async_trait::async_trait;
use uvm::seams::{DiskConfig, DiskLocation, HostDevices, ScsiSlot, ShareConfig, ShareTransport};
use uvm::HostError;

use crate::vm::QemuVm;
use crate::Machine;

fn unsupported(operation: &'static str) -> HostError {
    HostError::Unsupported {
        backend: "qemu",
        operation,
    }
}

#[async_trait]
impl HostDevices for QemuVm {
    async fn attach_disk(&self, _slot: ScsiSlot, _disk: &DiskConfig) -> Result<(), HostError> {
        Err(unsupported("attach_disk"))
    }

    /// Nothing can be attached yet, so there is nothing to detach.
    async fn detach_disk(&self, _slot: ScsiSlot) -> Result<(), HostError> {
        Ok(())
    }

    fn disk_location(&self, slot: ScsiSlot) -> DiskLocation {
        match self.machine() {
            Machine::Q35 => DiskLocation::Scsi {
                controller: slot.controller,
                lun: slot.lun,
            },
            Machine::Microvm => DiskLocation::VirtioBlk {
                serial: format!("uvm-disk-{}", slot.index()),
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
