//! Hot-plugging through QMP: `chardev-add`/`chardev-remove`, `device_add`, and `device_del`
//! followed by the wait for QEMU's `DEVICE_DELETED` — the guest must let go of a device before
//! QEMU removes it, which on a PCIe root port takes the guest's attention-button delay (5 s in
//! Linux's pciehp) at least.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::broadcast::error::RecvError;
use uvm::HostError;

use crate::error::QemuError;
use crate::qmp::{Command, Empty, QmpError};
use crate::vm::{QemuVm, QMP_TIMEOUT};

/// How long a hot-unplug may take: the guest's 5 s attention-button delay, and TCG is slow.
pub(crate) const UNPLUG_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Serialize)]
pub(crate) struct DeviceAdd {
    pub driver: &'static str,
    pub id: String,
    /// The device's properties (`bus`, `chardev`, `tag`, …).
    #[serde(flatten)]
    pub props: Map<String, Value>,
}
impl Command for DeviceAdd {
    const NAME: &'static str = "device_add";
    type Output = Empty;
}

/// How often `unplug` asks again while the guest is still powering a fresh slot up.
const UNPLUG_RETRY: Duration = Duration::from_millis(100);

/// QMP `device_del`: ask for the device's removal (`DEVICE_DELETED` says it happened).
#[derive(Serialize)]
pub(crate) struct DeviceDel {
    pub id: String,
}
impl Command for DeviceDel {
    const NAME: &'static str = "device_del";
    type Output = Empty;
}

/// `chardev-add` of a unix socket QEMU connects to (a vhost-user backend's).
#[derive(Serialize)]
pub(crate) struct ChardevAdd {
    pub id: String,
    pub backend: Value,
}
impl ChardevAdd {
    pub(crate) fn unix_client(id: String, path: &std::path::Path) -> ChardevAdd {
        ChardevAdd {
            id,
            backend: serde_json::json!({
                "type": "socket",
                "data": {
                    "addr": { "type": "unix", "data": { "path": path.display().to_string() } },
                    "server": false,
                },
            }),
        }
    }
}
impl Command for ChardevAdd {
    const NAME: &'static str = "chardev-add";
    type Output = Value;
}

#[derive(Serialize)]
pub(crate) struct ChardevRemove {
    pub id: String,
}
impl Command for ChardevRemove {
    const NAME: &'static str = "chardev-remove";
    type Output = Empty;
}

#[derive(Serialize)]
struct QomList {
    path: &'static str,
}
#[derive(Deserialize)]
struct QomProperty {
    name: String,
}
impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Output = Vec<QomProperty>;
}

/// How a QMP command ended, with QEMU's refusal kept apart from the connection's failure.
pub(crate) enum Qmp<T> {
    Done(T),
    /// QEMU refused: its error class and description.
    Refused {
        class: String,
        desc: String,
    },
}

/// What a hot-unplug found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unplugged {
    /// QEMU removed the device (or had none by that id).
    Removed,
    /// QEMU is gone, and its devices with it.
    QemuGone,
}

impl QemuVm {
    /// Run `command` for `operation` under [`QMP_TIMEOUT`]; a closed connection is `Gone`.
    pub(crate) async fn qmp_run<C: Command>(
        &self,
        operation: &'static str,
        command: &C,
    ) -> Result<Qmp<C::Output>, HostError> {
        let qmp = self.qmp().await?;
        match tokio::time::timeout(QMP_TIMEOUT, qmp.execute(command)).await {
            Ok(Ok(out)) => Ok(Qmp::Done(out)),
            Ok(Err(QmpError::Command { class, desc, .. })) => Ok(Qmp::Refused { class, desc }),
            Ok(Err(source)) => Err(QemuError::Qmp {
                command: C::NAME,
                source,
            }
            .into_host(operation)),
            Err(_) => Err(HostError::Timeout {
                operation,
                after: QMP_TIMEOUT,
            }),
        }
    }

    /// `device_del` the device `id`, then wait (up to `deadline`) for its `DEVICE_DELETED`.
    /// Harmless on a device QEMU does not have; a `device_del` already pending is waited for.
    ///
    /// # Errors
    /// [`HostError::Timeout`] when the guest did not let go in time (retryable);
    /// [`HostError::Failed`] when QEMU refused otherwise.
    pub(crate) async fn unplug(
        &self,
        operation: &'static str,
        id: &str,
        deadline: Duration,
    ) -> Result<Unplugged, HostError> {
        // Subscribe first: the event may come before the command's reply.
        let mut events = self.shared().events.subscribe();
        let start = Instant::now();
        let del = DeviceDel { id: id.to_owned() };
        loop {
            match self.qmp_run(operation, &del).await {
                Err(HostError::Gone) => return Ok(Unplugged::QemuGone),
                Err(e) => return Err(e),
                Ok(Qmp::Done(Empty {})) => break,
                Ok(Qmp::Refused { class, .. }) if class == "DeviceNotFound" => {
                    return Ok(Unplugged::Removed)
                }
                // QEMU refuses a second request while the guest has not answered the first.
                Ok(Qmp::Refused { desc, .. })
                    if desc.contains("already in the process of unplug") =>
                {
                    break
                }
                // A slot plugged moments ago: the guest's pciehp is still powering it up (its
                // power indicator blinks for about a second). Ask again until the deadline.
                Ok(Qmp::Refused { desc, .. }) if desc.contains("power indicator blinking") => {
                    let left = deadline.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(HostError::Timeout {
                            operation,
                            after: deadline,
                        });
                    }
                    tokio::time::sleep(UNPLUG_RETRY.min(left)).await;
                }
                Ok(Qmp::Refused { class, desc }) => {
                    return Err(refused(operation, "device_del", &class, &desc))
                }
            }
        }
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Ok(event)) => {
                    let deleted = event.name == "DEVICE_DELETED"
                        && event.data.get("device").and_then(Value::as_str) == Some(id);
                    if deleted {
                        return Ok(Unplugged::Removed);
                    }
                }
                // Events were missed: ask instead.
                Ok(Err(RecvError::Lagged(_))) => {
                    if let Some(gone) = self.device_absent(operation, id).await? {
                        return Ok(gone);
                    }
                }
                Ok(Err(RecvError::Closed)) => return Ok(Unplugged::QemuGone),
                Err(_) => {
                    // A last look: the event may have been lost with a reconnect.
                    if let Some(gone) = self.device_absent(operation, id).await? {
                        return Ok(gone);
                    }
                    return Err(HostError::Timeout {
                        operation,
                        after: deadline,
                    });
                }
            }
        }
    }

    /// `Some` when QEMU no longer has the device `id` (or is gone), from `qom-list`.
    async fn device_absent(
        &self,
        operation: &'static str,
        id: &str,
    ) -> Result<Option<Unplugged>, HostError> {
        let list = QomList {
            path: "/machine/peripheral",
        };
        match self.qmp_run(operation, &list).await {
            Err(HostError::Gone) => Ok(Some(Unplugged::QemuGone)),
            Err(e) => Err(e),
            Ok(Qmp::Done(props)) => {
                Ok((!props.iter().any(|p| p.name == id)).then_some(Unplugged::Removed))
            }
            Ok(Qmp::Refused { class, desc }) => Err(refused(operation, "qom-list", &class, &desc)),
        }
    }
}

impl QemuVm {
    /// Run the QMP command `execute` with `arguments` and return what QEMU answers (the memory
    /// and vCPU changes use it; probes and benchmarks too). The backend's books do not follow
    /// what it does: a device added this way is unknown to `HostDevices`.
    ///
    /// # Errors
    /// [`HostError::Failed`] when QEMU refuses; [`HostError::Gone`], [`HostError::Timeout`] or
    /// [`HostError::Io`] as for any QMP command.
    pub async fn qmp_execute(
        &self,
        execute: &str,
        arguments: Map<String, Value>,
    ) -> Result<Value, HostError> {
        const OP: &str = "run a QMP command";
        let qmp = self.qmp().await?;
        match tokio::time::timeout(
            QMP_TIMEOUT,
            qmp.execute_value(execute, Value::Object(arguments)),
        )
        .await
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(QmpError::Command { class, desc, .. })) => {
                Err(refused(OP, "(raw)", &class, &desc))
            }
            Ok(Err(source)) => Err(QemuError::Qmp {
                command: "(raw)",
                source,
            }
            .into_host(OP)),
            Err(_) => Err(HostError::Timeout {
                operation: OP,
                after: QMP_TIMEOUT,
            }),
        }
    }
}

/// QEMU's refusal of `command` as the seam's error.
pub(crate) fn refused(
    operation: &'static str,
    command: &'static str,
    class: &str,
    desc: &str,
) -> HostError {
    QemuError::Qmp {
        command,
        source: QmpError::Command {
            command,
            class: class.to_owned(),
            desc: desc.to_owned(),
        },
    }
    .into_host(operation)
}
