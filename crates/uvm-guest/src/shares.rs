//! Shares through the agent's `MountShare` and `UnmountShare` requests (capability `shares`).
//!
//! A mount may wait in the guest for a hot-added device to appear: the agent is given three
//! quarters of the call deadline for that, so that its own "no such device" answer (a typed
//! `NotFound`) arrives before the host gives up on the call.

use uvm::seams::{GuestConnection as _, ShareMount, ShareTransport};
use uvm::{GuestError, GuestRequest};
use uvm_agent_proto::agent::{
    MountShareRequest, ShareTransport as WireTransport, UnmountShareRequest,
};
use uvm_agent_proto::{capabilities, MAX_DEVICE_WAIT_MS};

use crate::link::VsockGuest;

fn require_shares(link: &VsockGuest, operation: &'static str) -> Result<(), GuestError> {
    if link.capabilities().has(capabilities::SHARES) {
        Ok(())
    } else {
        Err(GuestError::Unsupported { operation })
    }
}

/// `MountShare`: mount `tag` at `mount.guest_path`.
pub(crate) async fn mount(
    link: &VsockGuest,
    tag: &str,
    transport: ShareTransport,
    mount: &ShareMount,
) -> Result<(), GuestError> {
    let client = link.client()?;
    require_shares(link, "mounting shares")?;
    let timeout = link.shared.cfg.call_timeout;
    let wait_ms = u32::try_from(timeout.as_millis() * 3 / 4)
        .unwrap_or(u32::MAX)
        .min(MAX_DEVICE_WAIT_MS);
    let request = MountShareRequest {
        tag: tag.to_owned(),
        transport: match transport {
            ShareTransport::VirtioFs => WireTransport::VIRTIO_FS,
            ShareTransport::NineP => WireTransport::NINE_P,
        }
        .into(),
        guest_path: mount.guest_path.clone(),
        read_only: mount.read_only,
        wait_ms,
        ..MountShareRequest::default()
    };
    link.call(
        GuestRequest::MountShare,
        Some(timeout),
        client.mount_share(VsockGuest::ctx(), &request),
    )
    .await?;
    Ok(())
}

/// `UnmountShare`: unmount the share at `guest_path` (busy is a typed `Busy`, never lazy).
pub(crate) async fn unmount(link: &VsockGuest, guest_path: &str) -> Result<(), GuestError> {
    let client = link.client()?;
    require_shares(link, "unmounting shares")?;
    let request = UnmountShareRequest {
        guest_path: guest_path.to_owned(),
        ..UnmountShareRequest::default()
    };
    link.call(
        GuestRequest::UnmountShare,
        Some(link.shared.cfg.call_timeout),
        client.unmount_share(VsockGuest::ctx(), &request),
    )
    .await?;
    Ok(())
}
