//! The fake guest's power-off: `shutdown` records the call and, when told which VM it runs in
//! ([`FakeGuest::obey_shutdown`]), makes that VM end as a guest power-off does; otherwise the
//! guest accepts the request and ignores it (what a hung or unwilling guest does).

use std::sync::Arc;

use async_trait::async_trait;

use super::{Call, FakeGuest, FakeVm};
use crate::controller::lock;
use crate::error::GuestError;
use crate::seams::GuestPower;
use crate::state::VmExit;

/// How a fake VM powered off by its guest ends (QEMU's reason for it).
pub const GUEST_SHUTDOWN_REASON: &str = "guest-shutdown";

impl FakeGuest {
    /// From now on a `shutdown` powers `vm` off.
    pub fn obey_shutdown(&self, vm: Arc<FakeVm>) {
        lock(&self.state).powers_off = Some(vm);
    }
    /// From now on a `shutdown` is accepted and ignored: the VM runs on.
    pub fn ignore_shutdown(&self) {
        lock(&self.state).powers_off = None;
    }
}

#[async_trait]
impl GuestPower for FakeGuest {
    async fn shutdown(&self) -> Result<(), GuestError> {
        self.script.guest(Call::Shutdown).await?;
        let vm = lock(&self.state).powers_off.clone();
        if let Some(vm) = vm {
            vm.exit(VmExit {
                code: Some(0),
                signal: None,
                reason: Some(GUEST_SHUTDOWN_REASON.into()),
            });
        }
        Ok(())
    }
}
