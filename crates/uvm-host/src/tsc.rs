//! The host's TSC frequency, for `tsc_early_khz=<kHz>` on a TCG guest's kernel command line, and
//! the other clock arguments such a guest boots with ([`tcg_kernel_args`]).
//!
//! Why: `-M microvm` has no PIT, HPET or ACPI PM timer for the guest kernel to calibrate its TSC
//! against, and its early calibration can then hang the boot (docs/design.md, "The real
//! path"). Under TCG the
//! guest's TSC *is* the host's (QEMU's `rdtsc` helper reads the host counter), so the host can
//! measure it and hand the number over.
//!
//! How: `/sys/devices/system/cpu/cpu0/tsc_freq_khz` where the host kernel exposes it (some
//! distributions' kernels do); otherwise TSC ticks are counted against `CLOCK_MONOTONIC_RAW`
//! over a fixed window (`WINDOW`). Each end of the interval is a clock read bracketed by two `rdtsc`, the tightest
//! of a few tries kept, so the error is a few ppm. (`cpu MHz` in `/proc/cpuinfo` is the core
//! clock, not the TSC.) When the host's clocksource is the TSC, `CLOCK_MONOTONIC_RAW` advances
//! at the host kernel's own calibrated rate, so the result is the host kernel's `tsc_khz`.
//! The result is cached for the life of the process: it does not change.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

/// The host's TSC frequency could not be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot measure the host TSC frequency: {reason}")]
pub struct TscError {
    /// Why not.
    pub reason: String,
}

/// Where some kernels publish their TSC frequency.
const SYSFS_TSC_KHZ: &str = "/sys/devices/system/cpu/cpu0/tsc_freq_khz";

/// How long the calibration counts ticks.
const WINDOW: Duration = Duration::from_millis(50);

/// Plausible TSC frequencies (kHz): anything outside is a broken measurement.
const PLAUSIBLE_KHZ: std::ops::RangeInclusive<u64> = 100_000..=20_000_000;

/// The host's TSC frequency in kHz (what `tsc_early_khz=` takes). Costs one measuring interval the first
/// time, nothing afterwards.
pub fn host_tsc_khz() -> Result<u64, TscError> {
    host_tsc_khz_with(None)
}

/// [`host_tsc_khz`], and when it has to be measured, kept in `cache` for the rest of the host's
/// boot: the file holds `<boot_id> <kHz>` (`/proc/sys/kernel/random/boot_id`), so a later
/// process (every `uvmctl run` is one) reads it instead of measuring again, and a reboot — after
/// which the frequency may differ — invalidates it. The cache is best effort: a missing,
/// unreadable, stale or implausible file means measuring, and a failed write is only logged.
pub fn host_tsc_khz_with(cache: Option<&Path>) -> Result<u64, TscError> {
    static MEASURED: OnceLock<u64> = OnceLock::new();
    if let Some(&khz) = MEASURED.get() {
        return Ok(khz);
    }
    let khz = match from_sysfs(Path::new(SYSFS_TSC_KHZ)) {
        Some(khz) => khz,
        None => {
            let boot = boot_id();
            match cache
                .zip(boot.as_deref())
                .and_then(|(c, b)| from_cache(c, b))
            {
                Some(khz) => khz,
                None => {
                    let khz = calibrate(WINDOW)?;
                    if let (Some(c), Some(b)) = (cache, boot.as_deref()) {
                        if let Err(e) = write_cache(c, b, khz) {
                            tracing::debug!(cache = %c.display(), error = %e, "cannot keep the TSC frequency");
                        }
                    }
                    khz
                }
            }
        }
    };
    Ok(*MEASURED.get_or_init(|| khz))
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string(BOOT_ID).ok()?;
    let id = id.trim();
    (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| id.to_owned())
}

/// The kHz in `cache` if it was measured during the boot `boot_id` and is plausible.
fn from_cache(cache: &Path, boot_id: &str) -> Option<u64> {
    let text = std::fs::read_to_string(cache).ok()?;
    let (id, khz) = text.trim().split_once(' ')?;
    let khz = khz.parse::<u64>().ok()?;
    (id == boot_id && PLAUSIBLE_KHZ.contains(&khz)).then_some(khz)
}

/// Writes `<boot_id> <kHz>` to `cache` through a temporary file and a rename, so that a
/// concurrent reader sees the old file or the new one, never half of one.
fn write_cache(cache: &Path, boot_id: &str, khz: u64) -> std::io::Result<()> {
    let dir = cache.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}",
        cache
            .file_name()
            .map_or_else(|| "tsc".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    std::fs::write(&tmp, format!("{boot_id} {khz}\n"))?;
    std::fs::rename(&tmp, cache).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The frequency (kHz) of the local APIC timer QEMU emulates under TCG: its APIC bus runs at a
/// fixed 1 GHz (`APIC_BUS_CYCLE_NS` = 1; a guest that calibrates measures 999.4 MHz here).
pub const TCG_APIC_TIMER_KHZ: u64 = 1_000_000;

/// The kernel command-line arguments that give a guest under TCG a sound clock, whichever
/// kernel and machine:
/// - `tsc_early_khz=<host kHz>`: microvm has no PIT, HPET or PM timer to calibrate against and
///   the boot can hang without it; on q35 the calibration under TCG can be off by ≈0.1 %.
/// - `tsc=reliable`: with 2+ vCPUs the guest's TSC synchronisation check fails under TCG, and
///   the guest falls back to the HPET on q35 (an emulated MMIO read per clock read) or to
///   jiffies (4 ms resolution) on microvm. Under TCG every vCPU's TSC is the host's, which is
///   synchronised, so the check is moot.
/// - `lapic_timer_khz=`[`TCG_APIC_TIMER_KHZ`]: TCG offers no TSC-deadline timer, so a kernel
///   calibrates its local APIC timer against another timer for 100 ms of every boot. Our
///   kernel takes the frequency from this argument instead (kernel/patches/0001-…); a kernel
///   without the patch ignores it and calibrates.
///
/// Not for KVM, where the guest's TSC is virtualised (and kvmclock is the clocksource) and the
/// APIC timer has a TSC-deadline mode that needs no calibration.
pub fn tcg_kernel_args() -> Result<String, TscError> {
    tcg_kernel_args_with(None)
}

/// [`tcg_kernel_args`], with the TSC frequency kept in `tsc_cache` as [`host_tsc_khz_with`] does.
pub fn tcg_kernel_args_with(tsc_cache: Option<&Path>) -> Result<String, TscError> {
    Ok(format!(
        "tsc_early_khz={} tsc=reliable lapic_timer_khz={TCG_APIC_TIMER_KHZ}",
        host_tsc_khz_with(tsc_cache)?
    ))
}

/// A plausible value from a `tsc_freq_khz`-style file, if there is one.
fn from_sysfs(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|khz| PLAUSIBLE_KHZ.contains(khz))
}

/// kHz from `ticks` TSC ticks in `nanos` nanoseconds, rounded to the nearest kHz.
fn khz_from(ticks: u64, nanos: u64) -> Option<u64> {
    if nanos == 0 {
        return None;
    }
    // ticks / ns = GHz; × 1e6 = kHz. u128: ticks × 1e6 overflows u64 after ≈5 h at 1 GHz.
    let khz = (u128::from(ticks) * 1_000_000 + u128::from(nanos) / 2) / u128::from(nanos);
    u64::try_from(khz).ok()
}

/// One (TSC, clock) pair.
#[derive(Debug, Clone, Copy)]
struct Sample {
    tsc: u64,
    nanos: u64,
}

#[cfg(target_arch = "x86_64")]
fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter and has no memory effects; every x86-64 CPU has it, and
    // Linux leaves it enabled for user space (CR4.TSD clear) unless a process opts out through
    // prctl(PR_SET_TSC), which this crate never does.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn monotonic_raw_nanos() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicRaw);
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The tightest of a few `rdtsc; clock_gettime; rdtsc` brackets, the TSC taken mid-bracket.
#[cfg(target_arch = "x86_64")]
fn sample() -> Sample {
    let mut best: Option<(u64, Sample)> = None;
    for _ in 0..8 {
        let before = rdtsc();
        let nanos = monotonic_raw_nanos();
        let after = rdtsc();
        let width = after.wrapping_sub(before);
        if best.is_none_or(|(w, _)| width < w) {
            let tsc = before.wrapping_add(width / 2);
            best = Some((width, Sample { tsc, nanos }));
        }
    }
    best.map_or(
        Sample {
            tsc: rdtsc(),
            nanos: monotonic_raw_nanos(),
        },
        |(_, s)| s,
    )
}

/// Counts TSC ticks against `CLOCK_MONOTONIC_RAW` over `window`.
#[cfg(target_arch = "x86_64")]
fn calibrate(window: Duration) -> Result<u64, TscError> {
    let start = sample();
    std::thread::sleep(window);
    let end = sample();
    let ticks = end.tsc.wrapping_sub(start.tsc);
    let nanos = end.nanos.saturating_sub(start.nanos);
    khz_from(ticks, nanos)
        .filter(|khz| PLAUSIBLE_KHZ.contains(khz))
        .ok_or_else(|| TscError {
            reason: format!("{ticks} TSC ticks in {nanos} ns is not a plausible frequency"),
        })
}

#[cfg(not(target_arch = "x86_64"))]
fn calibrate(_window: Duration) -> Result<u64, TscError> {
    Err(TscError {
        reason: "the host is not x86-64".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        // 2.596138 GHz for 50 ms.
        assert_eq!(khz_from(129_806_900, 50_000_000), Some(2_596_138));
        // Rounds to nearest.
        assert_eq!(khz_from(1_499, 1_000), Some(1_499_000));
        assert_eq!(khz_from(3, 2_000_000), Some(2));
        assert_eq!(khz_from(5, 2_000_000), Some(3));
        assert_eq!(khz_from(1, 0), None);
    }

    #[test]
    fn the_cache_is_read_only_for_the_same_boot_and_a_plausible_value() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("sub/host-tsc-khz");
        assert_eq!(from_cache(&cache, "boot-a"), None, "no file yet");
        write_cache(&cache, "boot-a", 2_596_138).unwrap();
        assert_eq!(std::fs::read_to_string(&cache).unwrap(), "boot-a 2596138\n");
        assert_eq!(from_cache(&cache, "boot-a"), Some(2_596_138));
        assert_eq!(from_cache(&cache, "boot-b"), None, "another boot");
        for bad in ["boot-a 12", "boot-a fast", "boot-a", "", "boot-a 2596138 9"] {
            std::fs::write(&cache, bad).unwrap();
            assert_eq!(from_cache(&cache, "boot-a"), None, "{bad:?}");
        }
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["host-tsc-khz"]);
    }

    #[test]
    fn this_host_has_a_boot_id() {
        let id = boot_id().unwrap();
        assert_eq!(id.len(), 36, "{id:?}");
    }

    #[test]
    fn sysfs_value_is_used_only_when_plausible() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tsc_freq_khz");
        assert_eq!(from_sysfs(&file), None);
        std::fs::write(&file, "2596138\n").unwrap();
        assert_eq!(from_sysfs(&file), Some(2_596_138));
        std::fs::write(&file, "0\n").unwrap();
        assert_eq!(from_sysfs(&file), None);
        std::fs::write(&file, "fast").unwrap();
        assert_eq!(from_sysfs(&file), None);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn calibration_agrees_with_itself_and_is_cached() {
        let a = calibrate(WINDOW).unwrap();
        let b = calibrate(WINDOW).unwrap();
        assert!(PLAUSIBLE_KHZ.contains(&a), "{a} kHz");
        // Two measurements within 0.1 % of each other (they are typically within a few ppm;
        // the slack is for a loaded CI machine).
        assert!(a.abs_diff(b) * 1000 <= a, "{a} kHz vs {b} kHz");
        let host = host_tsc_khz().unwrap();
        eprintln!("host TSC: {host} kHz (calibrations: {a}, {b})");
        assert!(host.abs_diff(a) * 1000 <= a, "{host} kHz vs {a} kHz");
        assert_eq!(host_tsc_khz().unwrap(), host);
        assert_eq!(
            tcg_kernel_args().unwrap(),
            format!("tsc_early_khz={host} tsc=reliable lapic_timer_khz=1000000")
        );
    }
}
