//! What `/proc` says about processes: resident memory, and which processes still mention a VM's
//! runtime directory on their command line (a leak check after teardown).

use std::path::Path;

/// `VmRSS` of process `pid` in bytes (`/proc/<pid>/status`); `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// This process's `VmRSS` in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_ascii_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

/// Processes (other than this one) whose command line mentions `dir`.
pub fn processes_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| contains(&cmdline, needle))
        })
        .collect();
    pids.sort_unstable();
    pids
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Bytes in MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tqemu\nVmPeak:\t  900 kB\nVmRSS:\t  256000 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(256_000 * 1024));
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(self_rss_bytes().is_some_and(|b| b > 0));
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn a_directory_nobody_mentions_has_no_processes() {
        assert!(processes_mentioning(Path::new("/nonexistent/uvm-bench-none-XYZ")).is_empty());
        assert!(!contains(b"abc", b""));
        assert!(contains(
            b"--vm\0guest-cid=3,socket=/tmp/uvm-a/vhost.sock",
            b"/tmp/uvm-a"
        ));
    }

    #[test]
    fn mib_converts_bytes() {
        assert_eq!(mib(3 << 20), 3.0);
    }
}
