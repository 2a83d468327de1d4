//! What the security policy costs an exec: `true` run on a VM under
//! `examples/policies/sandbox.rego` against the same on a VM without a policy, both booted
//! alike, one run each in turn (which goes first alternates), after one untimed exec on each.

use std::time::{Duration, Instant};

use uvm::seams::SecurityPolicy;
use uvm_image::Image;
use uvm_vm::{Vm, VmOptions};

use super::stats::Summary;
use super::BenchError;

/// The policy measured.
pub const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");

/// How much to measure.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// Execs on each VM.
    pub execs: usize,
}

impl PolicyOptions {
    /// The counts of a normal run, or of `--quick`.
    pub fn new(quick: bool) -> PolicyOptions {
        PolicyOptions {
            execs: if quick { 40 } else { 100 },
        }
    }
}

/// The samples of one run.
#[derive(Debug, Clone, Default)]
pub struct PolicySamples {
    /// exec `true` under sandbox.rego.
    pub sandbox: Vec<Duration>,
    /// exec `true` without a policy.
    pub none: Vec<Duration>,
}

/// The figures.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    pub sandbox: Summary,
    pub none: Summary,
}

/// Boots both VMs, measures, tears both down (also after a failure).
pub async fn run(
    image: &Image,
    options: &VmOptions,
    opts: &PolicyOptions,
) -> Result<PolicySamples, BenchError> {
    let policed = Vm::new(
        image,
        VmOptions {
            security_policy: Some(SecurityPolicy(SANDBOX.to_owned())),
            ..options.clone()
        },
    );
    let open = Vm::new(
        image,
        VmOptions {
            security_policy: None,
            ..options.clone()
        },
    );
    let measured = async {
        for vm in [&policed, &open] {
            vm.boot().await.map_err(|source| BenchError::Controller {
                what: "start a VM",
                source,
            })?;
            super::measure::exec_true(vm).await?;
        }
        let mut samples = PolicySamples::default();
        for i in 0..opts.execs {
            let order = if i % 2 == 0 {
                [(&policed, true), (&open, false)]
            } else {
                [(&open, false), (&policed, true)]
            };
            for (vm, is_policed) in order {
                let t = Instant::now();
                super::measure::exec_true(vm).await?;
                let took = t.elapsed();
                if is_policed {
                    samples.sandbox.push(took);
                } else {
                    samples.none.push(took);
                }
            }
        }
        Ok::<_, BenchError>(samples)
    };
    let result = measured.await;
    let a = super::measure::teardown(&policed).await;
    let b = super::measure::teardown(&open).await;
    let samples = result?;
    a?;
    b?;
    Ok(samples)
}

impl PolicySamples {
    /// Medians; an error for a measurement without samples.
    pub fn summarize(&self) -> Result<PolicyReport, BenchError> {
        let s = |v: &[Duration], what| Summary::of_durations(v).ok_or(BenchError::NoSamples(what));
        Ok(PolicyReport {
            sandbox: s(&self.sandbox, "exec under a policy")?,
            none: s(&self.none, "exec without a policy")?,
        })
    }
}

/// The goal for exec `true` under sandbox.rego over exec without a policy.
pub const TARGET_POLICY_EXEC_RATIO: f64 = 1.05;

impl PolicyReport {
    /// Median under the policy / median without.
    pub fn ratio(&self) -> f64 {
        self.sandbox.median / self.none.median
    }

    /// The target row.
    pub fn target(&self) -> (&'static str, f64, f64, bool) {
        let r = self.ratio();
        (
            "policy_exec_over_none",
            TARGET_POLICY_EXEC_RATIO,
            r,
            r <= TARGET_POLICY_EXEC_RATIO,
        )
    }

    /// The JSON object under the report's `policy` key.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "exec_true_sandbox_ms": self.sandbox,
            "exec_true_no_policy_ms": self.none,
            "ratio": self.ratio(),
        })
    }

    /// The table's section.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nsecurity policy, exec true (ms)          {:>5} {:>10} {:>10} {:>10}",
            "n", "median", "p90", "max"
        );
        for (name, s) in [
            ("under sandbox.rego", &self.sandbox),
            ("without a policy", &self.none),
        ] {
            let _ = writeln!(
                t,
                "{name:<40} {:>5} {:>10.2} {:>10.2} {:>10.2}",
                s.n, s.median, s.p90, s.max
            );
        }
        let _ = writeln!(
            t,
            "{:<40} {:>16.3}×  (goal ≤ {TARGET_POLICY_EXEC_RATIO}×)",
            "ratio",
            self.ratio()
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_both_rows_and_their_ratio() {
        let d = |ms| vec![Duration::from_millis(ms); 3];
        let r = PolicySamples {
            sandbox: d(21),
            none: d(20),
        }
        .summarize()
        .expect("summary");
        assert!((r.ratio() - 1.05).abs() < 1e-9);
        assert_eq!(r.to_json()["exec_true_no_policy_ms"]["median"], 20.0);
        assert!(r.table().contains("sandbox.rego"));
        assert!(PolicySamples::default().summarize().is_err());
        // The policy measured is the example users read.
        uvm_policy::Policy::compile(SANDBOX).expect("sandbox.rego compiles");
    }
}
