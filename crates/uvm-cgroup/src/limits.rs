//! CPU limits as the cgroup files spell them: pure conversions.
//!
//! A limit is in 1/10000 of the VM's vCPUs (10000: no cap), as hcsshim's `UpdateCPULimits`
//! takes it; the quota is that share of `cpus` full CPUs per [`PERIOD_US`]. A weight is cgroup
//! v2's `cpu.weight` (1–10000, default 100); v1's `cpu.shares` gets the same ratio to its
//! default of 1024 (as systemd converts it).

/// The CFS period every VM's quota is counted in, µs.
pub const PERIOD_US: u64 = 100_000;
/// The kernel's smallest quota, µs.
pub const MIN_QUOTA_US: u64 = 1_000;
/// No cap.
pub const NO_LIMIT: u32 = 10_000;
/// cgroup v2's weight range and default.
pub const WEIGHT_MIN: u32 = 1;
pub const WEIGHT_MAX: u32 = 10_000;
pub const WEIGHT_DEFAULT: u32 = 100;

/// The quota per [`PERIOD_US`] of `limit` (1/10000 of `cpus` CPUs), `None` for no cap.
pub fn quota_us(limit: u32, cpus: u32) -> Option<u64> {
    if limit >= NO_LIMIT {
        return None;
    }
    let quota = PERIOD_US * u64::from(cpus.max(1)) * u64::from(limit) / u64::from(NO_LIMIT);
    Some(quota.max(MIN_QUOTA_US))
}

/// v2's `cpu.max`: `"<quota> <period>"` or `"max <period>"`.
pub fn cpu_max(limit: u32, cpus: u32) -> String {
    match quota_us(limit, cpus) {
        Some(q) => format!("{q} {PERIOD_US}"),
        None => format!("max {PERIOD_US}"),
    }
}

/// v1's `cpu.cfs_quota_us`: the quota, or `-1` for no cap.
pub fn cfs_quota_us(limit: u32, cpus: u32) -> String {
    quota_us(limit, cpus).map_or_else(|| "-1".to_owned(), |q| q.to_string())
}

/// v1's `cpu.shares` for a v2 weight.
pub fn shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / u64::from(WEIGHT_DEFAULT)).clamp(2, 262_144)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_is_a_share_of_all_the_vm_cpus() {
        assert_eq!(quota_us(5_000, 1), Some(50_000));
        assert_eq!(quota_us(5_000, 4), Some(200_000));
        assert_eq!(quota_us(2_500, 2), Some(50_000));
        assert_eq!(cpu_max(2_000, 1), "20000 100000");
        assert_eq!(cfs_quota_us(2_000, 1), "20000");
    }

    #[test]
    fn the_full_limit_is_no_cap_and_a_tiny_one_is_the_kernel_minimum() {
        assert_eq!(quota_us(NO_LIMIT, 8), None);
        assert_eq!(cpu_max(NO_LIMIT, 1), "max 100000");
        assert_eq!(cfs_quota_us(NO_LIMIT, 1), "-1");
        assert_eq!(quota_us(1, 1), Some(MIN_QUOTA_US));
    }

    #[test]
    fn weights_map_onto_shares_with_the_same_ratio_to_the_default() {
        assert_eq!(shares(WEIGHT_DEFAULT), 1024);
        assert_eq!(shares(200), 2048);
        assert_eq!(shares(WEIGHT_MIN), 10);
        assert_eq!(shares(WEIGHT_MAX), 102_400);
    }
}
