//! What `/proc` says about processes: resident memory, and which processes still mention a VM's
//! runtime directory on their command line (a leak check after teardown).

use std::path::Path;

/// `VmRSS` of process `pid` in bytes; `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    vm_rss(procfs::process::Process::new(pid).ok()?)
}

/// This process's `VmRSS` in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    vm_rss(procfs::process::Process::myself().ok()?)
}

fn vm_rss(process: procfs::process::Process) -> Option<u64> {
    process.status().ok()?.vmrss?.checked_mul(1024)
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
