//! The backend's own errors, and how they become the seam's [`HostError`].

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use uvm::HostError;

use crate::qmp::QmpError;

/// Why starting or driving the VM's processes failed.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A machine name other than `q35` or `microvm`.
    #[error("unknown machine {name:?} (expected q35 or microvm)")]
    UnknownMachine {
        /// The name that was given.
        name: String,
    },
    /// A process could not be spawned.
    #[error("cannot spawn {program}")]
    Spawn {
        /// The program that could not be spawned.
        program: PathBuf,
        /// Why spawning failed.
        #[source]
        source: std::io::Error,
    },
    /// A process exited before it was ready.
    #[error("{process} exited during start ({status}); its output ends with: {output}")]
    ExitedEarly {
        /// Which process: `vhost-device-vsock` or `qemu`.
        process: &'static str,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log (stdout and stderr), for the reason it gave.
        output: String,
    },
    /// A process did not become ready in time.
    #[error("{process} was not ready after {after:?}")]
    NotReady {
        /// Which process: `vhost-device-vsock` or `qemu`.
        process: &'static str,
        /// How long it was given to become ready.
        after: Duration,
    },
    /// `terminate`/`release` stopped the start.
    #[error("the start was stopped by terminate or release")]
    Stopped,
    /// Talking QMP failed.
    #[error("QMP {command} failed")]
    Qmp {
        /// The QMP command that failed (`qmp_capabilities`, `quit`, `balloon`, …).
        command: &'static str,
        /// How it failed.
        #[source]
        source: QmpError,
    },
    /// An OS call failed.
    #[error("{operation} failed")]
    Io {
        /// What the call was for.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The supervisor thread ended without an answer (it panicked).
    #[error("the supervisor thread of the VM ended unexpectedly")]
    SupervisorLost,
}

impl QemuError {
    /// The seam error for this failure of `operation`.
    pub(crate) fn into_host(self, operation: &'static str) -> HostError {
        match self {
            QemuError::Spawn { source, .. } => HostError::Io { operation, source },
            QemuError::Io { source, .. } => HostError::Io { operation, source },
            QemuError::NotReady { after, .. } => HostError::Timeout { operation, after },
            QemuError::Qmp {
                source: QmpError::Closed,
                ..
            } => HostError::Gone,
            other => HostError::Failed {
                operation,
                source: Box::new(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_the_seam_variants() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(matches!(
            QemuError::Spawn {
                program: "qemu".into(),
                source: io
            }
            .into_host("start VM"),
            HostError::Io {
                operation: "start VM",
                ..
            }
        ));
        assert!(matches!(
            QemuError::NotReady {
                process: "qemu",
                after: Duration::from_secs(1)
            }
            .into_host("start VM"),
            HostError::Timeout { after, .. } if after == Duration::from_secs(1)
        ));
        assert!(matches!(
            QemuError::Qmp {
                command: "quit",
                source: QmpError::Closed
            }
            .into_host("terminate VM"),
            HostError::Gone
        ));
        let refused = QemuError::Qmp {
            command: "balloon",
            source: QmpError::Command {
                command: "balloon",
                class: "DeviceNotActive".into(),
                desc: "No balloon device has been activated".into(),
            },
        }
        .into_host("update memory");
        assert!(
            matches!(&refused, HostError::Failed { operation: "update memory", .. }
                if uvm_util::error_chain(&refused).contains("No balloon device")),
            "{refused:?}"
        );
    }
}
