//! Changing a running guest's memory: the balloon below the boot size, virtio-mem above it
//! (a VM created with a maximum, q35 only).
//!
//! A size above the boot memory deflates the balloon fully and asks the `virtio-mem-pci` device
//! ([`VIRTIO_MEM_ID`]) for the rest (`qom-set requested-size`); the guest's driver plugs 2 MiB
//! blocks and the kernel onlines them (movable, so they can go again). The call returns once
//! the device's plugged `size` is what was asked — QEMU announces a change with
//! `MEMORY_DEVICE_SIZE_CHANGE`, but throttles that event to one a second per device, so between
//! events the size is looked at again every [`RECHECK`] — or fails typed at [`PLUG_WAIT`]:
//! memory the guest could not
//! give back (in use, or unmovable) leaves the device above the size asked. A size at or below
//! the boot memory unplugs everything first, then sets the balloon's target, which the guest's
//! balloon driver approaches on its own (QEMU takes the target at once).

use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::broadcast::error::RecvError;
use uvm::HostError;

use crate::cmdline::{VIRTIO_MEM_BLOCK, VIRTIO_MEM_ID};
use crate::error::QemuError;
use crate::qmp::Balloon;
use crate::vm::{QemuVm, MEMORY_GRANULARITY, QMP_TIMEOUT};

/// How long the guest may take to plug or unplug what was asked. With the balloon's and QMP's
/// own waits a resize can outlast the controller's 10 s host-call deadline; its `Timeout` (typed
/// too) then comes instead of this one.
pub(crate) const PLUG_WAIT: Duration = Duration::from_secs(8);

/// How often the plugged size is read between (throttled) events.
pub(crate) const RECHECK: Duration = Duration::from_millis(5);

const OP: &str = "update memory";

/// Where the boot memory ends and hot memory begins for a resize to `bytes`: (virtio-mem's
/// requested size, the balloon's target).
pub(crate) fn split(bytes: u64, boot: u64) -> (u64, u64) {
    if bytes > boot {
        (bytes - boot, boot)
    } else {
        (0, bytes)
    }
}

/// What the memory granularity is for a VM with or without hot memory.
pub(crate) fn granularity(hot: bool) -> u64 {
    if hot {
        VIRTIO_MEM_BLOCK
    } else {
        MEMORY_GRANULARITY
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

impl QemuVm {
    /// Resizes the guest to `bytes` (see the module's documentation).
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] for a size outside 1..=maximum or not a multiple of the
    /// granularity; [`HostError::Timeout`] when the guest did not plug or give back in time.
    pub(crate) async fn resize_memory(&self, bytes: u64) -> Result<(), HostError> {
        let boot = self.boot_memory();
        let max = self.max_memory().unwrap_or(boot);
        let step = granularity(self.max_memory().is_some());
        if bytes == 0 || bytes > max {
            return Err(HostError::InvalidInput {
                what: "memory size",
                message: format!(
                    "{bytes} bytes is outside 1..={max} (the VM's {})",
                    if self.max_memory().is_some() {
                        "maximum"
                    } else {
                        "configured memory; create it with a maximum to grow it"
                    }
                ),
            });
        }
        if !bytes.is_multiple_of(step) {
            return Err(HostError::InvalidInput {
                what: "memory size",
                message: format!("{bytes} bytes is not a multiple of {step}"),
            });
        }
        let (hot, balloon) = split(bytes, boot);
        if self.max_memory().is_none() {
            return self.balloon(balloon).await;
        }
        if hot > 0 {
            self.balloon(balloon).await?;
            self.plug(hot).await
        } else {
            self.plug(0).await?;
            self.balloon(balloon).await
        }
    }

    async fn balloon(&self, target: u64) -> Result<(), HostError> {
        let qmp = self.qmp().await?;
        match tokio::time::timeout(QMP_TIMEOUT, qmp.execute(&Balloon { value: target })).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => Err(QemuError::Qmp {
                command: "balloon",
                source,
            }
            .into_host(OP)),
            Err(_) => Err(HostError::Timeout {
                operation: OP,
                after: QMP_TIMEOUT,
            }),
        }
    }

    /// The virtio-mem device's plugged size, bytes.
    async fn plugged(&self) -> Result<u64, HostError> {
        let answer = self
            .qmp_execute(
                "qom-get",
                object(json!({"path": format!("/machine/peripheral/{VIRTIO_MEM_ID}"), "property": "size"})),
            )
            .await?;
        answer.as_u64().ok_or_else(|| HostError::Failed {
            operation: OP,
            source: format!("virtio-mem's size is not a number: {answer}").into(),
        })
    }

    /// Asks for `requested` bytes of hot memory and waits until the guest has plugged exactly
    /// that.
    async fn plug(&self, requested: u64) -> Result<(), HostError> {
        // Subscribe first: the change may be announced before the command's reply.
        let mut events = self.shared().events.subscribe();
        self.qmp_execute(
            "qom-set",
            object(json!({
                "path": format!("/machine/peripheral/{VIRTIO_MEM_ID}"),
                "property": "requested-size",
                "value": requested,
            })),
        )
        .await?;
        let start = Instant::now();
        loop {
            let size = self.plugged().await?;
            if size == requested {
                return Ok(());
            }
            let left = PLUG_WAIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                tracing::warn!(
                    requested,
                    plugged = size,
                    "the guest did not reach the memory size asked for"
                );
                return Err(HostError::Timeout {
                    operation: if size > requested {
                        "update memory: the guest could not give all the memory back"
                    } else {
                        "update memory: the guest did not take all the memory"
                    },
                    after: PLUG_WAIT,
                });
            }
            // An event, or the recheck interval: look again either way.
            match tokio::time::timeout(left.min(RECHECK), events.recv()).await {
                Ok(Err(RecvError::Closed)) => return Err(HostError::Gone),
                Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) | Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_above_the_boot_memory_is_hot_memory_and_below_it_the_balloon() {
        let boot = 256 << 20;
        assert_eq!(split(512 << 20, boot), (256 << 20, boot));
        assert_eq!(split(boot, boot), (0, boot));
        assert_eq!(split(128 << 20, boot), (0, 128 << 20));
        assert_eq!(granularity(true), 2 << 20);
        assert_eq!(granularity(false), MEMORY_GRANULARITY);
    }
}
