//! Clocks the agent reads: `CLOCK_BOOTTIME` for boot milestones and log stamps, and the wall
//! clock, which the host may correct at handshake (a guest without an RTC starts in 1970).

use std::time::Duration;

use rustix::time::{ClockId, Timespec};

/// Time since the guest kernel booted (`CLOCK_BOOTTIME`, includes suspend).
pub fn boottime() -> Duration {
    to_duration(rustix::time::clock_gettime(ClockId::Boottime))
}

/// The wall clock, as nanoseconds since the Unix epoch (0 before 1970).
pub fn realtime_ns() -> u64 {
    let d = to_duration(rustix::time::clock_gettime(ClockId::Realtime));
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sets the wall clock to `unix_ns` if it is off by more than `tolerance`; returns whether it
/// changed it.
pub fn correct_realtime(unix_ns: u64, tolerance: Duration) -> rustix::io::Result<bool> {
    let now = realtime_ns();
    if now.abs_diff(unix_ns) <= u64::try_from(tolerance.as_nanos()).unwrap_or(u64::MAX) {
        return Ok(false);
    }
    let ts = Timespec {
        tv_sec: i64::try_from(unix_ns / 1_000_000_000).unwrap_or(i64::MAX),
        tv_nsec: (unix_ns % 1_000_000_000) as _,
    };
    rustix::time::clock_settime(ClockId::Realtime, ts)?;
    Ok(true)
}

fn to_duration(ts: Timespec) -> Duration {
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// Nanoseconds in a `Duration`, saturating.
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Boot milestones reported by `Handshake` (`BootMarks`).
#[derive(Debug, Default)]
pub struct BootTimes {
    /// `CLOCK_BOOTTIME` when the agent started: kernel boot until /init.
    pub agent_start: Duration,
    /// Time spent loading kernel modules, in ns.
    pub modules_ns: std::sync::atomic::AtomicU64,
    /// `CLOCK_BOOTTIME` when the ready line was sent, in ns (0: not yet).
    pub ready_at_ns: std::sync::atomic::AtomicU64,
}

impl BootTimes {
    /// Milestones of an agent that started at `agent_start` (a `CLOCK_BOOTTIME` reading).
    pub fn new(agent_start: Duration) -> Self {
        BootTimes {
            agent_start,
            ..BootTimes::default()
        }
    }

    /// Records that the ready line went out now.
    pub fn mark_ready(&self) {
        self.ready_at_ns
            .store(nanos(boottime()), std::sync::atomic::Ordering::Relaxed);
    }

    /// Agent start until ready, in ns (0 while not ready).
    pub fn init_to_ready_ns(&self) -> u64 {
        let ready = self.ready_at_ns.load(std::sync::atomic::Ordering::Relaxed);
        if ready == 0 {
            0
        } else {
            ready.saturating_sub(nanos(self.agent_start))
        }
    }
}
