//! Disk mounts over the agent's `MountDisk` / `UnmountDisk` / `EjectDisk`. A mount waits in the
//! guest for its device (the agent watches uevents): the agent is given most of the call's
//! deadline for that, so that it answers "not found" before the host gives up on the call.

use uvm::seams::{DiskLocation, DiskMount};
use uvm::{GuestError, GuestRequest};
use uvm_agent_proto::agent::{
    disk_location, DiskLocation as WireLocation, EjectDiskRequest, MountDiskRequest, ScsiAddress,
    UnmountDiskRequest,
};
use uvm_agent_proto::MAX_DEVICE_WAIT_MS;

use crate::link::VsockGuest;

fn wire_location(location: &DiskLocation) -> WireLocation {
    let kind = match location {
        DiskLocation::Scsi { controller, lun } => disk_location::Kind::Scsi(ScsiAddress {
            controller: u32::from(*controller),
            lun: u32::from(*lun),
            ..ScsiAddress::default()
        }),
        DiskLocation::VirtioBlk { serial } => disk_location::Kind::VirtioBlkSerial(serial.clone()),
    };
    WireLocation {
        kind: Some(kind),
        ..WireLocation::default()
    }
}

pub(crate) async fn mount(
    link: &VsockGuest,
    location: &DiskLocation,
    mount: &DiskMount,
) -> Result<(), GuestError> {
    let client = link.client()?;
    let t = link.shared.cfg.call_timeout;
    // Three quarters of the call for the device to appear, the rest for the mount itself.
    let wait_ms = u32::try_from(t.as_millis() * 3 / 4)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_DEVICE_WAIT_MS);
    let request = MountDiskRequest {
        location: Some(wire_location(location)).into(),
        guest_path: mount.guest_path.clone(),
        partition: mount.partition,
        read_only: mount.read_only,
        fs_type: mount.fs_type.clone().unwrap_or_default(),
        options: mount.options.clone(),
        wait_ms,
        ..MountDiskRequest::default()
    };
    link.call(
        GuestRequest::MountDisk,
        Some(t),
        client.mount_disk(VsockGuest::ctx(), &request),
    )
    .await?;
    Ok(())
}

pub(crate) async fn unmount(link: &VsockGuest, guest_path: &str) -> Result<(), GuestError> {
    let client = link.client()?;
    let t = link.shared.cfg.call_timeout;
    let request = UnmountDiskRequest {
        guest_path: guest_path.to_owned(),
        ..UnmountDiskRequest::default()
    };
    link.call(
        GuestRequest::UnmountDisk,
        Some(t),
        client.unmount_disk(VsockGuest::ctx(), &request),
    )
    .await?;
    Ok(())
}

pub(crate) async fn eject(link: &VsockGuest, location: &DiskLocation) -> Result<(), GuestError> {
    let client = link.client()?;
    let t = link.shared.cfg.call_timeout;
    let request = EjectDiskRequest {
        location: Some(wire_location(location)).into(),
        ..EjectDiskRequest::default()
    };
    link.call(
        GuestRequest::EjectDisk,
        Some(t),
        client.eject_disk(VsockGuest::ctx(), &request),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_go_on_the_wire_as_scsi_addresses_or_serials() {
        let scsi = wire_location(&DiskLocation::Scsi {
            controller: 2,
            lun: 63,
        });
        assert!(matches!(
            scsi.kind,
            Some(disk_location::Kind::Scsi(ref a)) if a.controller == 2 && a.lun == 63
        ));
        let blk = wire_location(&DiskLocation::VirtioBlk {
            serial: "uvm-disk-3".into(),
        });
        assert!(matches!(
            blk.kind,
            Some(disk_location::Kind::VirtioBlkSerial(ref s)) if s == "uvm-disk-3"
        ));
    }
}
