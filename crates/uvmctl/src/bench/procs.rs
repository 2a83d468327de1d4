//! What `/proc` says about processes: resident memory, and which processes still mention a VM's
//! runtime directory on their command line (a leak check after teardown).

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

pub use uvm_qemu::processes_mentioning;

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
    fn mib_converts_bytes() {
        assert_eq!(mib(3 << 20), 3.0);
    }
}
