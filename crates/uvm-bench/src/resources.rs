//! Memory hot-add on one q35 VM created with a maximum, through the controller: the time
//! `update_memory` to boot + 256 MiB takes to return (it returns once virtio-mem reports the
//! guest has plugged it all), then until the guest's `MemTotal` shows it (the agent's stats,
//! polled every 2 ms), and `update_memory` back to the boot size (unplugged). Rounds alternate
//! growing and shrinking on the same VM, after one untimed round.

use std::time::{Duration, Instant};

use uvm_image::Image;
use uvm_qemu::Machine;
use uvm_vm::{Vm, VmOptions};

use super::stats::Summary;
use super::BenchError;

/// What is added each round, MiB.
pub const GROW_MIB: u64 = 256;

/// How much to measure.
#[derive(Debug, Clone)]
pub struct ResourceOptions {
    /// Grow/shrink rounds.
    pub rounds: usize,
}

impl ResourceOptions {
    /// The counts of a normal run, or of `--quick`.
    pub fn new(quick: bool) -> ResourceOptions {
        ResourceOptions {
            rounds: if quick { 4 } else { 8 },
        }
    }
}

/// The samples of one run.
#[derive(Debug, Clone, Default)]
pub struct ResourceSamples {
    /// `update_memory(boot + 256 MiB)` → returned (plugged).
    pub grow: Vec<Duration>,
    /// The same start → the guest's `MemTotal` up by 256 MiB.
    pub visible: Vec<Duration>,
    /// `update_memory(boot)` → returned (unplugged).
    pub shrink: Vec<Duration>,
}

/// The figures.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceReport {
    pub grow: Summary,
    pub visible: Summary,
    pub shrink: Summary,
}

fn failed(what: &'static str) -> impl FnOnce(uvm::ControllerError) -> BenchError {
    move |source| BenchError::Controller { what, source }
}

/// Measures memory hot-add on q35 (refused elsewhere: microvm has no virtio-mem).
pub async fn run(
    image: &Image,
    options: &VmOptions,
    opts: &ResourceOptions,
) -> Result<ResourceSamples, BenchError> {
    if options.machine != Machine::Q35 {
        return Err(BenchError::Guest {
            message: "memory hot-add is measured on q35 only".to_owned(),
        });
    }
    let boot_mib = options.memory_mib.next_multiple_of(2);
    let mut options = options.clone();
    options.memory_mib = boot_mib;
    options.max_memory_mib = Some(boot_mib + GROW_MIB);
    let vm = Vm::new(image, options);
    let measured = async {
        vm.boot().await.map_err(failed("start a VM"))?;
        let c = &vm.controller;
        let mem_total = || async {
            c.guest_stats()
                .await
                .map(|s| s.mem_total_bytes)
                .map_err(failed("read the guest's memory"))
        };
        let mut samples = ResourceSamples::default();
        for round in 0..=opts.rounds {
            let before = mem_total().await?;
            let t = Instant::now();
            c.update_memory((boot_mib + GROW_MIB) << 20)
                .await
                .map_err(failed("grow the guest's memory"))?;
            let grown = t.elapsed();
            let deadline = t + Duration::from_secs(30);
            while mem_total().await? < before + ((GROW_MIB - 1) << 20) {
                if Instant::now() > deadline {
                    return Err(BenchError::Timeout {
                        what: "the guest's MemTotal to grow",
                        after: Duration::from_secs(30),
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let visible = t.elapsed();
            let t = Instant::now();
            c.update_memory(boot_mib << 20)
                .await
                .map_err(failed("shrink the guest's memory"))?;
            let shrunk = t.elapsed();
            // Round 0 is the untimed warm-up.
            if round > 0 {
                samples.grow.push(grown);
                samples.visible.push(visible);
                samples.shrink.push(shrunk);
            }
        }
        Ok::<_, BenchError>(samples)
    };
    let result = measured.await;
    super::measure::teardown(&vm).await?;
    result
}

impl ResourceSamples {
    /// Medians; an error for a measurement without samples.
    pub fn summarize(&self) -> Result<ResourceReport, BenchError> {
        let s = |v: &[Duration], what| Summary::of_durations(v).ok_or(BenchError::NoSamples(what));
        Ok(ResourceReport {
            grow: s(&self.grow, "memory grow")?,
            visible: s(&self.visible, "memory visible")?,
            shrink: s(&self.shrink, "memory shrink")?,
        })
    }
}

impl ResourceReport {
    /// The JSON object under the report's `resources` key.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "grow_mib": GROW_MIB,
            "update_memory_grow_ms": self.grow,
            "update_memory_visible_ms": self.visible,
            "update_memory_shrink_ms": self.shrink,
        })
    }

    /// The table's section.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nmemory hot-add, +{GROW_MIB} MiB (ms)        {:>5} {:>10} {:>10} {:>10}",
            "n", "median", "p90", "max"
        );
        for (name, s) in [
            ("update_memory → plugged", &self.grow),
            ("  → the guest's MemTotal shows it", &self.visible),
            ("update_memory back → unplugged", &self.shrink),
        ] {
            let _ = writeln!(
                t,
                "{name:<40} {:>5} {:>10.1} {:>10.1} {:>10.1}",
                s.n, s.median, s.p90, s.max
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_each_row() {
        let d = |ms| vec![Duration::from_millis(ms); 3];
        let r = ResourceSamples {
            grow: d(100),
            visible: d(120),
            shrink: d(200),
        }
        .summarize()
        .expect("summary");
        assert_eq!(r.to_json()["update_memory_visible_ms"]["median"], 120.0);
        assert!(r.table().contains("MemTotal"));
        assert!(ResourceSamples::default().summarize().is_err());
    }
}
