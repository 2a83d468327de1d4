//! Host-side accounting of the VM's processes from `/proc`: CPU time (utime + stime) and resident
//! memory of QEMU and vhost-device-vsock together.

use std::time::Duration;

use uvm::seams::HostStats;

/// Usage of one process.
pub(crate) fn process_stats(pid: u32) -> Result<HostStats, procfs::ProcError> {
    let pid = i32::try_from(pid).map_err(|_| procfs::ProcError::NotFound(None))?;
    let process = procfs::process::Process::new(pid)?;
    let stat = process.stat()?;
    let statm = process.statm()?;
    let ticks = procfs::ticks_per_second().max(1);
    let cpu_ticks = stat.utime.saturating_add(stat.stime);
    Ok(HostStats {
        cpu_time: ticks_to_duration(cpu_ticks, ticks),
        rss_bytes: statm.resident.saturating_mul(procfs::page_size()),
        ..HostStats::default()
    })
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let secs = ticks / per_second;
    let rest = ticks % per_second;
    // rest < per_second, so rest * 1e9 / per_second < 1e9 fits.
    let nanos = rest.saturating_mul(1_000_000_000) / per_second;
    Duration::from_secs(secs) + Duration::from_nanos(nanos)
}

/// The sum of two processes' usage.
pub(crate) fn add(a: HostStats, b: HostStats) -> HostStats {
    HostStats {
        cpu_time: a.cpu_time.saturating_add(b.cpu_time),
        rss_bytes: a.rss_bytes.saturating_add(b.rss_bytes),
        ..a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_convert_exactly() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(ticks_to_duration(0, 100), Duration::ZERO);
    }

    #[test]
    fn reads_this_process() {
        let s = process_stats(std::process::id()).expect("own /proc entry");
        assert!(s.rss_bytes > 0);
    }

    #[test]
    fn adds() {
        let a = HostStats {
            cpu_time: Duration::from_secs(1),
            rss_bytes: 10,
            ..HostStats::default()
        };
        assert_eq!(
            add(a, a),
            HostStats {
                cpu_time: Duration::from_secs(2),
                rss_bytes: 20,
                ..HostStats::default()
            }
        );
    }
}
