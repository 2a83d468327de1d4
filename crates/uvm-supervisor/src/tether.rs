//! Tethering a supervisor to another process (`--tether-to PID`): when that process ends, the
//! supervisor removes its VM as a forced `rm` would. Tests tie their VMs to the test process
//! this way, so that a test killed outright (a timeout, a panic in a harness) leaves no
//! supervisor, QEMU or directory behind. The end is seen through a pidfd (readable once the
//! process has exited): no polling, and no confusion with a later process reusing the pid once
//! the pidfd is open.

use std::os::fd::OwnedFd;

use rustix::process::{Pid, PidfdFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The process to tether to cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot tether the VM to process {pid}")]
pub struct TetherError {
    /// The process.
    pub pid: u32,
    /// Why (no such process, most often).
    #[source]
    pub source: std::io::Error,
}

/// A watched process.
#[derive(Debug)]
pub(crate) struct Tether {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl Tether {
    /// Watches process `pid`; an error if it does not exist (any more).
    pub(crate) fn open(pid: u32) -> Result<Tether, TetherError> {
        let err = |source| TetherError { pid, source };
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| err(std::io::Error::other("not a process id")))?;
        let fd =
            rustix::process::pidfd_open(raw, PidfdFlags::NONBLOCK).map_err(|e| err(e.into()))?;
        // SAFETY: `fd` is an OwnedFd we just opened; the AsyncFd owns it from here, and an
        // OwnedFd's `as_raw_fd` is the same open descriptor for as long as it lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| err(std::io::Error::from(e)))?;
        Ok(Tether { pid, fd })
    }

    /// Resolves once the process has ended.
    pub(crate) async fn ended(self) {
        match self.fd.readable().await {
            Ok(_) => tracing::info!(pid = self.pid, "the tethered process ended"),
            // Cannot happen for a pidfd registered above; end the tether rather than spin.
            Err(e) => {
                tracing::error!(pid = self.pid, error = %e, "cannot watch the tethered process")
            }
        }
    }
}
