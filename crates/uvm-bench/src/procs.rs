//! What `/proc` says about the memory of processes: resident and proportional set sizes.

/// `VmRSS` of process `pid` in bytes; `None` if it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    vm_rss(procfs::process::Process::new(pid).ok()?)
}

/// This process's `VmRSS` in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    vm_rss(procfs::process::Process::myself().ok()?)
}

/// Proportional set size of process `pid` in bytes: its private pages plus its share of the
/// pages it maps together with other processes (QEMU's binary and libraries, the guest kernel
/// and initramfs in the page cache); `None` if it is gone.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let pid = i32::try_from(pid).ok()?;
    let rollup = procfs::process::Process::new(pid)
        .ok()?
        .smaps_rollup()
        .ok()?;
    rollup
        .memory_map_rollup
        .0
        .first()?
        .extension
        .map
        .get("Pss")
        .copied()
}

fn vm_rss(process: procfs::process::Process) -> Option<u64> {
    process.status().ok()?.vmrss?.checked_mul(1024)
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
    fn this_process_has_a_proportional_set_size_no_larger_than_its_rss() {
        let me = std::process::id();
        let pss = pss_bytes(me).expect("pss");
        assert!(pss > 0);
        // Both read at slightly different moments: allow the heap to grow a little between.
        assert!(pss <= rss_bytes(me).expect("rss") + (4 << 20));
        assert_eq!(pss_bytes(u32::MAX), None);
    }

    #[test]
    fn mib_converts_bytes() {
        assert_eq!(mib(3 << 20), 3.0);
    }
}
