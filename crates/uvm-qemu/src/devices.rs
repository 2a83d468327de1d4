//! Disks and shares on QEMU ([`HostDevices`]). Not built yet: every attach is a typed
//! `Unsupported`, and a VM given devices at create is refused (see `QemuBackend::check`), so
//! nothing is ever silently left out.

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

    async fn add_share(&self, _tag: &str, _share: &ShareConfig) -> Result<(), HostError> {
        Err(unsupported("add_share"))
    }

    /// Nothing can be added yet, so there is nothing to remove.
    async fn remove_share(&self, _tag: &str) -> Result<(), HostError> {
        Ok(())
    }

    fn share_transport(&self, _tag: &str) -> ShareTransport {
        ShareTransport::VirtioFs
    }
}
