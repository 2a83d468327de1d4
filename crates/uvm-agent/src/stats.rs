//! `GuestStats`: memory, CPU time and process count, parsed from `/proc/meminfo`, `/proc/stat`
//! and `/proc/uptime`. The parsers take text so that they are tested on samples.

use std::path::Path;

use uvm_agent_proto::agent::GuestStatsResponse;

use crate::error::ApiError;

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut parts = rest.split_whitespace();
            let value: u64 = parts.next()?.parse().ok()?;
            let factor = match parts.next() {
                Some("kB") => 1024,
                None => 1,
                Some(_) => return None,
            };
            value.checked_mul(factor)
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// CPU time summed over all CPUs, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTimes {
    /// user + nice.
    pub user_ns: u64,
    /// system + irq + softirq.
    pub system_ns: u64,
    /// idle + iowait.
    pub idle_ns: u64,
}

/// The aggregate `cpu` line of a `/proc/stat` text; its unit is `ticks_per_second` (USER_HZ).
pub fn parse_cpu_times(text: &str, ticks_per_second: u64) -> Option<CpuTimes> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let get = |i: usize| ticks.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal …
    if ticks.len() < 4 || ticks_per_second == 0 {
        return None;
    }
    let to_ns = |t: u64| {
        u64::try_from(u128::from(t) * 1_000_000_000 / u128::from(ticks_per_second))
            .unwrap_or(u64::MAX)
    };
    Some(CpuTimes {
        user_ns: to_ns(get(0).saturating_add(get(1))),
        system_ns: to_ns(get(2).saturating_add(get(5)).saturating_add(get(6))),
        idle_ns: to_ns(get(3).saturating_add(get(4))),
    })
}

/// The first field of `/proc/uptime` (`"12.34 56.78"`), in nanoseconds.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac_ns: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().ok()? * 10u64.pow(9 - frac.len() as u32)
    };
    secs.checked_mul(1_000_000_000)?.checked_add(frac_ns)
}

/// Numeric entries of a `/proc` directory: the processes.
pub fn count_processes(proc_dir: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(proc_dir)? {
        let name = entry?.file_name();
        if name
            .to_str()
            .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        {
            n += 1;
        }
    }
    Ok(n)
}

fn read(path: &str) -> Result<String, ApiError> {
    std::fs::read_to_string(path).map_err(|source| ApiError::Proc {
        what: path.to_owned(),
        source,
    })
}

fn unparsable(what: &str) -> ApiError {
    ApiError::Proc {
        what: what.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected format"),
    }
}

/// Reads the guest's `/proc` into a `GuestStatsResponse`.
pub fn collect() -> Result<GuestStatsResponse, ApiError> {
    let (mem_total, mem_available) =
        parse_meminfo(&read("/proc/meminfo")?).ok_or_else(|| unparsable("/proc/meminfo"))?;
    let cpu = parse_cpu_times(
        &read("/proc/stat")?,
        rustix::param::clock_ticks_per_second(),
    )
    .ok_or_else(|| unparsable("/proc/stat"))?;
    let uptime = parse_uptime(&read("/proc/uptime")?).ok_or_else(|| unparsable("/proc/uptime"))?;
    let processes = count_processes(Path::new("/proc")).map_err(|source| ApiError::Proc {
        what: "/proc".into(),
        source,
    })?;
    let mut out = GuestStatsResponse::new();
    out.mem_total_bytes = mem_total;
    out.mem_available_bytes = mem_available;
    out.cpu_user_ns = cpu.user_ns;
    out.cpu_system_ns = cpu.system_ns;
    out.cpu_idle_ns = cpu.idle_ns;
    out.uptime_ns = uptime;
    out.processes = processes;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:         246384 kB\nMemFree:          200000 kB\n\
                           MemAvailable:     210992 kB\nBuffers:               0 kB\n";

    const STAT: &str = "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 5 25 500 10 1 1 0 0 0\n\
                        intr 12345\nctxt 999\nprocesses 77\nprocs_running 1\n";

    #[test]
    fn meminfo_is_read_in_bytes() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            Some((246_384 * 1024, 210_992 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: x kB\nMemAvailable: 1 kB\n"), None);
    }

    #[test]
    fn cpu_line_sums_into_user_system_idle() {
        let cpu = parse_cpu_times(STAT, 100).expect("parses");
        assert_eq!(
            cpu,
            CpuTimes {
                user_ns: 1_050_000_000,
                system_ns: 550_000_000,
                idle_ns: 10_200_000_000,
            }
        );
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4\n", 100), None);
        assert_eq!(parse_cpu_times(STAT, 0), None);
    }

    #[test]
    fn uptime_keeps_its_fraction_exactly() {
        assert_eq!(parse_uptime("12.34 56.78\n"), Some(12_340_000_000));
        assert_eq!(parse_uptime("7 1"), Some(7_000_000_000));
        assert_eq!(parse_uptime("0.000000001 0"), Some(1));
        assert_eq!(parse_uptime("1.-2 0"), None);
        assert_eq!(parse_uptime(""), None);
    }

    #[test]
    fn processes_are_the_numeric_proc_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["1", "42", "self", "x1"] {
            std::fs::create_dir(dir.path().join(name)).expect("mkdir");
        }
        assert_eq!(count_processes(dir.path()).expect("count"), 2);
    }

    #[test]
    fn this_machine_has_stats() {
        let stats = collect().expect("/proc is readable here");
        assert!(stats.mem_total_bytes > 0);
        assert!(stats.uptime_ns > 0);
        assert!(stats.processes > 0);
    }
}
