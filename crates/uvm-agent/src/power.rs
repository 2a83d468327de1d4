//! Powering the VM off: what `Shutdown` does, and what PID 1 does instead of exiting (an init
//! that exits panics the kernel).

use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

use crate::{error, info};

/// What `Shutdown` does after replying.
#[derive(Debug, Clone)]
pub enum ShutdownAction {
    /// Power the VM off (the agent is PID 1).
    PowerOff,
    /// Exit the agent process (a non-init agent, for development).
    Exit,
    /// Only notify (tests).
    Notify(std::sync::Arc<tokio::sync::Notify>),
}

/// How long after the `Shutdown` reply the VM goes down: the reply must leave first.
pub const SHUTDOWN_GRACE: Duration = Duration::from_millis(200);

/// Flushes filesystems and powers off; never returns. If the kernel refuses, sleeps forever
/// rather than exit.
pub fn power_off() -> ! {
    info!("powering off");
    rustix::fs::sync();
    // Give the console and host log writers a moment to drain the last lines.
    std::thread::sleep(Duration::from_millis(50));
    let Err(e) = reboot(RebootMode::RB_POWER_OFF);
    error!("reboot(RB_POWER_OFF) failed: {e}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Carries out `action` [`SHUTDOWN_GRACE`] from now, after a `sync`.
pub fn schedule(action: &ShutdownAction) {
    rustix::fs::sync();
    let action = action.clone();
    tokio::spawn(async move {
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        match action {
            ShutdownAction::PowerOff => {
                // Blocking for good: fine, nothing else matters now.
                power_off()
            }
            ShutdownAction::Exit => {
                info!("shutdown requested: exiting");
                std::process::exit(0)
            }
            ShutdownAction::Notify(notify) => notify.notify_one(),
        }
    });
}
