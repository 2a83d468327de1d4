//! The benchmark's results: one [`BenchReport`], printed as one flat JSON object
//! ([`BenchReport::to_json`]) or as a readable table ([`BenchReport::table`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::phases::{Phases, PHASE_NAMES};
use super::stats::Summary;

/// `start_over_floor` target: the controller adds at most 5 % to a raw QEMU boot.
pub const TARGET_START_OVER_FLOOR: f64 = 1.05;
/// Exec of `true`, median, under TCG.
pub const TARGET_EXEC_TRUE_MS: f64 = 10.0;
/// terminate_vm, median.
pub const TARGET_TERMINATE_MS: f64 = 200.0;

/// The exec of `true`, RPC by RPC (see `rpc.rs`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakdownSummary {
    pub rpc_roundtrip: Summary,
    pub exec_process: Summary,
    pub read_output: Summary,
    pub wait_process: Summary,
    pub total: Summary,
    pub pipelined: Summary,
    /// One `/bin/true` forked, run and reaped by a shell inside the guest (no RPC at all).
    pub guest_process: Summary,
}

/// Everything one `uvmctl bench` run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// UTC, ISO 8601.
    pub date: String,
    /// `tcg` or `kvm`.
    pub accelerator: String,
    /// `q35` or `microvm`.
    pub machine: String,
    /// The guest kernel flavour (`ours` or `debian`).
    pub kernel: Option<String>,
    /// `qemu-system-x86_64 --version`, first line.
    pub qemu: Option<String>,
    pub host_cpus: usize,
    /// `/proc/loadavg` (1, 5, 15 min) when the run started and when it ended: other work on
    /// the machine skews every number here.
    pub loadavg: Option<[f64; 3]>,
    pub loadavg_end: Option<[f64; 3]>,
    pub iterations: usize,
    pub quick: bool,
    /// Guest size.
    pub memory_mib: u64,
    pub cpus: u32,
    pub floor: Summary,
    pub start: Summary,
    /// Per pair (each start right after its floor): start / floor, and start − floor in ms.
    /// Pairing cancels slow drifts of the machine that medians of 5–20 boots do not.
    pub paired_ratio: Summary,
    pub paired_overhead: Summary,
    pub exec_true: Summary,
    pub exec_1mib: Summary,
    pub terminate: Summary,
    pub qemu_rss_mib: f64,
    pub vsock_rss_mib: f64,
    /// This process's RSS growth per VM in the largest density run.
    pub controller_rss_mib: Option<f64>,
    /// (K, MiB): QEMU + vhost-device-vsock PSS per VM with the largest density run's K VMs
    /// Running at once.
    pub pss_per_vm_mib: Option<(usize, f64)>,
    /// K → seconds until all K VMs were Running.
    pub density: BTreeMap<usize, f64>,
    /// Per-phase medians of the floor's boots and of the controller's (`total_ms`: their sum).
    pub phases_floor: Phases,
    pub phases_start: Phases,
    pub exec_breakdown: BreakdownSummary,
    /// The long-lived path, when measured (in the JSON as `api`).
    pub api: Option<super::api::ApiReport>,
    /// Disks and shares, when measured (in the JSON as `devices`).
    pub devices: Option<super::devices::DeviceReport>,
    /// Memory hot-add, when measured (in the JSON as `resources`).
    pub resources: Option<super::resources::ResourceReport>,
    /// exec under sandbox.rego against none, when measured (in the JSON as `policy`).
    pub policy: Option<super::policy::PolicyReport>,
    /// TCP through the NICs against a veth alone, NIC hot-add (in the JSON as `network`).
    pub network: Option<super::network::NetworkReport>,
    /// Wall time of the whole run.
    pub elapsed_s: f64,
    /// Every sample, in ms, by measurement (in the JSON as `samples_ms`).
    pub samples: BTreeMap<String, Vec<f64>>,
}

impl BenchReport {
    /// The controller's share, as the target measures it: the median over the floor/start
    /// pairs of start / floor. Each start runs right after its floor, so the pair sees the same
    /// machine; the ratio of the two medians, taken over different boots, scattered three
    /// times as much here (its medians can land in different modes of a bimodal boot time).
    pub fn start_over_floor(&self) -> f64 {
        self.paired_ratio.median
    }

    /// Median start over median floor (reported beside [`Self::start_over_floor`]).
    pub fn start_over_floor_of_medians(&self) -> f64 {
        if self.floor.median > 0.0 {
            self.start.median / self.floor.median
        } else {
            f64::NAN
        }
    }

    /// (name, target, value, met) for each target, the long-lived path's too when measured.
    pub fn targets(&self) -> Vec<(&'static str, f64, f64, bool)> {
        let sof = self.start_over_floor();
        let mut targets = vec![
            (
                "start_over_floor",
                TARGET_START_OVER_FLOOR,
                sof,
                sof <= TARGET_START_OVER_FLOOR,
            ),
            (
                "exec_true_ms_median",
                TARGET_EXEC_TRUE_MS,
                self.exec_true.median,
                self.exec_true.median <= TARGET_EXEC_TRUE_MS,
            ),
            (
                "terminate_ms_median",
                TARGET_TERMINATE_MS,
                self.terminate.median,
                self.terminate.median <= TARGET_TERMINATE_MS,
            ),
        ];
        if let Some(api) = &self.api {
            targets.extend(api.targets());
        }
        if let Some(devices) = &self.devices {
            targets.extend(devices.targets());
        }
        if let Some(policy) = &self.policy {
            targets.push(policy.target());
        }
        targets
    }

    /// One flat JSON object: `<measure>_ms_{median,p90,max,min}` for every timed measurement,
    /// `start_over_floor`, memory in MiB, `density` (K → seconds), `phases`, `exec_breakdown`,
    /// `targets`, and the context (date, accelerator, kernel, QEMU, host).
    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("date".into(), json!(self.date));
        o.insert("accelerator".into(), json!(self.accelerator));
        o.insert("machine".into(), json!(self.machine));
        o.insert("kernel".into(), json!(self.kernel));
        o.insert("qemu".into(), json!(self.qemu));
        o.insert("host_cpus".into(), json!(self.host_cpus));
        o.insert("loadavg".into(), json!(self.loadavg));
        o.insert("loadavg_end".into(), json!(self.loadavg_end));
        o.insert("iterations".into(), json!(self.iterations));
        o.insert("quick".into(), json!(self.quick));
        o.insert("guest_memory_mib".into(), json!(self.memory_mib));
        o.insert("guest_cpus".into(), json!(self.cpus));
        for (name, s) in [
            ("floor", &self.floor),
            ("start", &self.start),
            ("exec_true", &self.exec_true),
            ("exec_1mib", &self.exec_1mib),
            ("terminate", &self.terminate),
        ] {
            insert_summary(&mut o, name, s);
        }
        o.insert(
            "start_over_floor".into(),
            json!(round(self.start_over_floor(), 3)),
        );
        o.insert(
            "start_over_floor_paired_median".into(),
            json!(round(self.paired_ratio.median, 3)),
        );
        o.insert(
            "start_over_floor_of_medians".into(),
            json!(round(self.start_over_floor_of_medians(), 3)),
        );
        insert_summary(&mut o, "start_minus_floor", &self.paired_overhead);
        o.insert("qemu_rss_mib".into(), json!(round(self.qemu_rss_mib, 1)));
        o.insert("vsock_rss_mib".into(), json!(round(self.vsock_rss_mib, 1)));
        o.insert(
            "controller_rss_mib".into(),
            json!(self.controller_rss_mib.map(|v| round(v, 2))),
        );
        o.insert(
            "pss_per_vm_mib".into(),
            json!(self.pss_per_vm_mib.map(|(_, v)| round(v, 1))),
        );
        o.insert(
            "pss_per_vm_k".into(),
            json!(self.pss_per_vm_mib.map(|(k, _)| k)),
        );
        let density: Map<String, Value> = self
            .density
            .iter()
            .map(|(k, s)| (k.to_string(), json!(round(*s, 3))))
            .collect();
        o.insert("density".into(), Value::Object(density));
        o.insert(
            "phases".into(),
            json!({
                "floor": phases_json(&self.phases_floor),
                "start": phases_json(&self.phases_start),
            }),
        );
        let mut breakdown = Map::new();
        let b = &self.exec_breakdown;
        for (name, s) in [
            ("rpc_roundtrip", &b.rpc_roundtrip),
            ("exec_process", &b.exec_process),
            ("read_output", &b.read_output),
            ("wait_process", &b.wait_process),
            ("total", &b.total),
            ("pipelined", &b.pipelined),
            ("guest_process", &b.guest_process),
        ] {
            insert_summary(&mut breakdown, name, s);
        }
        o.insert("exec_breakdown".into(), Value::Object(breakdown));
        let targets: Map<String, Value> = self
            .targets()
            .iter()
            .map(|(name, target, value, met)| {
                (
                    (*name).to_owned(),
                    json!({"target": target, "value": round(*value, 3), "met": met}),
                )
            })
            .collect();
        o.insert("targets".into(), Value::Object(targets));
        o.insert(
            "api".into(),
            self.api
                .as_ref()
                .map_or(Value::Null, super::api::ApiReport::to_json),
        );
        o.insert(
            "devices".into(),
            self.devices
                .as_ref()
                .map_or(Value::Null, super::devices::DeviceReport::to_json),
        );
        o.insert(
            "resources".into(),
            self.resources
                .as_ref()
                .map_or(Value::Null, super::resources::ResourceReport::to_json),
        );
        o.insert(
            "policy".into(),
            self.policy
                .as_ref()
                .map_or(Value::Null, super::policy::PolicyReport::to_json),
        );
        o.insert(
            "network".into(),
            self.network
                .as_ref()
                .map_or(Value::Null, super::network::NetworkReport::to_json),
        );
        o.insert("elapsed_s".into(), json!(round(self.elapsed_s, 1)));
        let samples: Map<String, Value> = self
            .samples
            .iter()
            .map(|(k, v)| {
                let rounded: Vec<f64> = v.iter().map(|x| round(*x, 2)).collect();
                (k.clone(), json!(rounded))
            })
            .collect();
        o.insert("samples_ms".into(), Value::Object(samples));
        Value::Object(o)
    }

    /// A readable table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let kernel = self.kernel.as_deref().unwrap_or("unknown");
        let _ = writeln!(
            t,
            "uvmctl bench — {} — accel {} — machine {} — kernel {} — guest {} MiB, {} vCPU — {} host CPUs",
            self.date, self.accelerator, self.machine, kernel, self.memory_mib, self.cpus, self.host_cpus
        );
        if let Some(q) = &self.qemu {
            let _ = writeln!(t, "{q}");
        }
        let _ = writeln!(
            t,
            "\n{:<34} {:>5} {:>10} {:>10} {:>10}",
            "measurement (ms)", "n", "median", "p90", "max"
        );
        let b = &self.exec_breakdown;
        for (name, s) in [
            ("floor (raw QEMU → ready line)", &self.floor),
            ("start (create_vm → Running)", &self.start),
            ("start − floor, paired", &self.paired_overhead),
            ("exec `true`", &self.exec_true),
            ("exec 1 MiB stdout", &self.exec_1mib),
            ("terminate (→ Terminated, reaped)", &self.terminate),
            ("  RPC round trip (GuestStats)", &b.rpc_roundtrip),
            ("  `true`: ExecProcess", &b.exec_process),
            ("  `true`: ReadOutput ×2 to EOF", &b.read_output),
            ("  `true`: WaitProcess", &b.wait_process),
            ("  `true`: all four RPCs", &b.total),
            ("  `true`: read ∥ wait pipelined", &b.pipelined),
            ("  guest only: sh runs /bin/true", &b.guest_process),
        ] {
            let _ = writeln!(
                t,
                "{name:<34} {:>5} {:>10.1} {:>10.1} {:>10.1}",
                s.n, s.median, s.p90, s.max
            );
        }
        let _ = writeln!(
            t,
            "\nboot phases, per-phase medians (ms){:>11} {:>10}",
            "floor", "start"
        );
        let (f, s) = (self.phases_floor.values(), self.phases_start.values());
        for (i, name) in PHASE_NAMES.iter().enumerate() {
            let _ = writeln!(t, "  {name:<33} {:>10.1} {:>10.1}", f[i], s[i]);
        }
        let _ = writeln!(
            t,
            "  {:<33} {:>10.1} {:>10.1}",
            "sum", self.phases_floor.total_ms, self.phases_start.total_ms
        );
        let _ = writeln!(t, "\nmemory (MiB; RSS unless named)");
        let _ = writeln!(
            t,
            "  QEMU, idle VM                    {:>10.1}",
            self.qemu_rss_mib
        );
        let _ = writeln!(
            t,
            "  vhost-device-vsock               {:>10.1}",
            self.vsock_rss_mib
        );
        match self.controller_rss_mib {
            Some(c) => {
                let _ = writeln!(t, "  controller, per VM               {c:>10.2}");
            }
            None => {
                let _ = writeln!(t, "  controller, per VM               {:>10}", "n/a");
            }
        }
        if let Some((k, pss)) = self.pss_per_vm_mib {
            let label = format!("PSS per VM, {k} running");
            let _ = writeln!(t, "  {label:<32} {pss:>10.1}");
        }
        let _ = writeln!(t, "\ndensity (s until all Running)");
        for (k, secs) in &self.density {
            let _ = writeln!(t, "  K = {k:<28} {secs:>10.2}");
        }
        if let Some(api) = &self.api {
            t.push_str(&api.table());
        }
        if let Some(devices) = &self.devices {
            t.push_str(&devices.table());
        }
        if let Some(resources) = &self.resources {
            t.push_str(&resources.table());
        }
        if let Some(policy) = &self.policy {
            t.push_str(&policy.table());
        }
        if let Some(network) = &self.network {
            t.push_str(&network.table());
        }
        let _ = writeln!(t, "\ntargets");
        for (name, target, value, met) in self.targets() {
            let verdict = if met { "met" } else { "MISSED" };
            let _ = writeln!(t, "  {name:<24} {value:>9.3} ≤ {target:<7} {verdict}");
        }
        let _ = writeln!(
            t,
            "  (start_over_floor is the median of start/floor per pair; median start / median floor: {:.3})",
            self.start_over_floor_of_medians()
        );
        let load = |l: Option<[f64; 3]>| l.map_or("n/a".to_owned(), |l| format!("{:.2}", l[0]));
        let _ = writeln!(
            t,
            "\nwhole run: {:.1} s; load average {} at the start, {} at the end",
            self.elapsed_s,
            load(self.loadavg),
            load(self.loadavg_end)
        );
        t
    }
}

fn insert_summary(o: &mut Map<String, Value>, name: &str, s: &Summary) {
    o.insert(format!("{name}_ms_median"), json!(round(s.median, 2)));
    o.insert(format!("{name}_ms_p90"), json!(round(s.p90, 2)));
    o.insert(format!("{name}_ms_max"), json!(round(s.max, 2)));
    o.insert(format!("{name}_ms_min"), json!(round(s.min, 2)));
    o.insert(format!("{name}_n"), json!(s.n));
}

fn phases_json(p: &Phases) -> Value {
    let mut o = Map::new();
    for (key, v) in [
        ("host_setup_ms", p.host_setup_ms),
        ("firmware_ms", p.firmware_ms),
        ("kernel_ms", p.kernel_ms),
        ("agent_init_ms", p.agent_init_ms),
        ("handshake_ms", p.handshake_ms),
        ("other_ms", p.other_ms),
        ("total_ms", p.total_ms),
    ] {
        o.insert(key.into(), json!(round(v, 1)));
    }
    Value::Object(o)
}

/// `v` rounded to `digits` decimals (NaN and infinities become JSON null through serde_json).
fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC, proleptic Gregorian).
pub fn iso8601_utc(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(i64::MAX);
    let rem = unix_secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The headline figures of several reports (one per kernel, run one after the other in one
/// invocation) side by side.
pub fn comparison_table(reports: &[BenchReport]) -> String {
    let mut t = String::new();
    let _ = write!(t, "\n{:<34}", "side by side (medians)");
    for r in reports {
        let _ = write!(t, " {:>12}", r.kernel.as_deref().unwrap_or("?"));
    }
    t.push('\n');
    let row = |t: &mut String, name: &str, value: &dyn Fn(&BenchReport) -> String| {
        let _ = write!(t, "{name:<34}");
        for r in reports {
            let _ = write!(t, " {:>12}", value(r));
        }
        t.push('\n');
    };
    row(&mut t, "floor (ms)", &|r| format!("{:.0}", r.floor.median));
    row(&mut t, "start (ms)", &|r| format!("{:.0}", r.start.median));
    row(&mut t, "start_over_floor", &|r| {
        format!("{:.3}", r.start_over_floor())
    });
    for (i, name) in PHASE_NAMES.iter().enumerate() {
        row(&mut t, &format!("  start phase: {name}"), &|r| {
            format!("{:.1}", r.phases_start.values()[i])
        });
    }
    row(&mut t, "exec `true` (ms)", &|r| {
        format!("{:.1}", r.exec_true.median)
    });
    row(&mut t, "exec 1 MiB stdout (ms)", &|r| {
        format!("{:.0}", r.exec_1mib.median)
    });
    row(&mut t, "terminate (ms)", &|r| {
        format!("{:.1}", r.terminate.median)
    });
    row(&mut t, "QEMU RSS, idle VM (MiB)", &|r| {
        format!("{:.1}", r.qemu_rss_mib)
    });
    row(&mut t, "PSS per VM, all running (MiB)", &|r| {
        r.pss_per_vm_mib
            .map_or("n/a".into(), |(k, v)| format!("{v:.1} (K={k})"))
    });
    if let Some(k) = reports.iter().filter_map(|r| r.density.keys().max()).min() {
        row(&mut t, &format!("density K={k} (s)"), &|r| {
            r.density.get(k).map_or("n/a".into(), |s| format!("{s:.2}"))
        });
    }
    row(&mut t, "load average at the start", &|r| {
        r.loadavg.map_or("n/a".into(), |l| format!("{:.2}", l[0]))
    });
    t
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn s(median: f64) -> Summary {
        Summary::of(&[median * 0.9, median, median * 1.2]).expect("samples")
    }

    pub(crate) fn sample_report() -> BenchReport {
        let phases = Phases {
            host_setup_ms: 10.0,
            firmware_ms: 300.0,
            kernel_ms: 1500.0,
            agent_init_ms: 100.0,
            handshake_ms: 20.0,
            other_ms: 1.0,
            total_ms: 1931.0,
        };
        BenchReport {
            date: "2025-01-02T03:04:05Z".into(),
            accelerator: "tcg".into(),
            machine: "q35".into(),
            kernel: Some("debian".into()),
            qemu: Some("QEMU emulator version 10.0.2".into()),
            host_cpus: 2,
            loadavg: Some([0.5, 0.4, 0.3]),
            loadavg_end: Some([0.6, 0.4, 0.3]),
            iterations: 5,
            quick: true,
            memory_mib: 256,
            cpus: 1,
            floor: s(1900.0),
            start: s(1931.0),
            paired_ratio: s(1.01),
            paired_overhead: s(25.0),
            exec_true: s(8.0),
            exec_1mib: s(40.0),
            terminate: s(120.0),
            qemu_rss_mib: 250.0,
            vsock_rss_mib: 5.0,
            controller_rss_mib: Some(0.3),
            pss_per_vm_mib: Some((8, 90.0)),
            density: [(1, 2.0), (2, 3.5), (4, 7.0)].into_iter().collect(),
            phases_floor: Phases {
                handshake_ms: 0.0,
                other_ms: 0.0,
                total_ms: 1910.0,
                ..phases
            },
            phases_start: phases,
            exec_breakdown: BreakdownSummary {
                rpc_roundtrip: s(1.0),
                exec_process: s(3.0),
                read_output: s(3.0),
                wait_process: s(1.0),
                total: s(8.0),
                pipelined: s(7.0),
                guest_process: s(3.0),
            },
            api: Some(super::super::api::ApiReport {
                create_start: s(1000.0),
                in_process_boot: s(950.0),
                create_over_boot: s(1.05),
                api_exec_true: s(6.0),
                in_process_exec_true: s(5.0),
                supervisor_rss_mib: 9.5,
                ps_vms: 8,
                ps: s(4.0),
                copy_mib: 100.0,
                cp_in_mb_s: 80.0,
                cat_in_mb_s: 60.0,
                cp_out_mb_s: 90.0,
                cat_out_mb_s: 70.0,
            }),
            devices: None,
            resources: None,
            policy: None,
            network: None,
            elapsed_s: 95.0,
            samples: [("floor".to_owned(), vec![1900.0, 1910.5])]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn json_is_one_flat_object_with_the_required_fields() {
        let v = sample_report().to_json();
        let o = v.as_object().expect("an object");
        for key in [
            "floor_ms_median",
            "floor_ms_p90",
            "floor_ms_max",
            "start_ms_median",
            "start_ms_p90",
            "start_ms_max",
            "start_over_floor",
            "start_over_floor_paired_median",
            "start_over_floor_of_medians",
            "start_minus_floor_ms_median",
            "exec_true_ms_median",
            "exec_true_ms_p90",
            "exec_true_ms_max",
            "exec_1mib_ms_median",
            "exec_1mib_ms_p90",
            "exec_1mib_ms_max",
            "terminate_ms_median",
            "terminate_ms_p90",
            "terminate_ms_max",
            "qemu_rss_mib",
            "vsock_rss_mib",
            "controller_rss_mib",
            "pss_per_vm_mib",
            "pss_per_vm_k",
        ] {
            assert!(
                o[key].is_number(),
                "{key} is not a number: {:?}",
                o.get(key)
            );
        }
        for key in ["date", "accelerator", "kernel"] {
            assert!(o[key].is_string(), "{key}");
        }
        assert_eq!(o["accelerator"], "tcg");
        assert_eq!(o["start_over_floor"], json!(1.01));
        assert_eq!(
            o["start_over_floor_of_medians"],
            json!(round(1931.0 / 1900.0, 3))
        );
        assert_eq!(o["density"], json!({"1": 2.0, "2": 3.5, "4": 7.0}));
        assert_eq!(o["samples_ms"], json!({"floor": [1900.0, 1910.5]}));
    }

    #[test]
    fn json_carries_phases_breakdown_and_targets() {
        let v = sample_report().to_json();
        for side in ["floor", "start"] {
            let p = &v["phases"][side];
            for key in [
                "host_setup_ms",
                "firmware_ms",
                "kernel_ms",
                "agent_init_ms",
                "handshake_ms",
                "other_ms",
                "total_ms",
            ] {
                assert!(p[key].is_number(), "phases.{side}.{key}");
            }
        }
        assert_eq!(v["phases"]["start"]["kernel_ms"], json!(1500.0));
        assert!(v["exec_breakdown"]["rpc_roundtrip_ms_median"].is_number());
        assert!(v["exec_breakdown"]["total_ms_p90"].is_number());
        assert_eq!(v["targets"]["terminate_ms_median"]["met"], json!(true));
        assert_eq!(v["targets"]["exec_true_ms_median"]["target"], json!(10.0));
        assert_eq!(v["targets"]["start_over_floor"]["met"], json!(true));
    }

    #[test]
    fn json_carries_the_long_lived_rows_and_their_targets() {
        let v = sample_report().to_json();
        let api = &v["api"];
        assert_eq!(api["create_start_ms"]["median"], json!(1000.0));
        assert_eq!(api["api_exec_over_in_process"], json!(1.2));
        assert_eq!(api["create_start_over_boot"], json!(1.05));
        assert_eq!(api["supervisor_rss_mib"], json!(9.5));
        assert_eq!(api["ps_vms"], json!(8));
        assert_eq!(api["cp_in_mb_s"], json!(80.0));
        assert_eq!(api["exec_cat_out_mb_s"], json!(70.0));
        assert_eq!(v["targets"]["api_exec_over_in_process"]["met"], json!(true));
        assert_eq!(v["targets"]["create_start_over_boot"]["target"], json!(1.1));
        assert_eq!(v["targets"]["supervisor_rss_mib"]["met"], json!(true));
        assert_eq!(v["targets"]["ps_ms_median"]["met"], json!(true));
    }

    #[test]
    fn a_run_without_the_long_lived_path_has_a_null_api_and_only_the_core_targets() {
        let mut r = sample_report();
        r.api = None;
        let v = r.to_json();
        assert!(v["api"].is_null());
        assert_eq!(r.targets().len(), 3);
        assert!(!r.table().contains("long-lived"));
    }

    #[test]
    fn json_serializes_to_one_line_and_parses_back() {
        let text = serde_json::to_string(&sample_report().to_json()).expect("serializes");
        assert!(!text.contains('\n'));
        let back: Value = serde_json::from_str(&text).expect("parses");
        assert!(back.is_object());
    }

    #[test]
    fn missed_targets_are_reported() {
        let mut r = sample_report();
        r.paired_ratio = s(1.06);
        r.exec_true = s(25.0);
        let t = r.targets();
        assert!(!t[0].3, "start_over_floor should be missed");
        assert!(!t[1].3, "exec should be missed");
        assert!(r.table().contains("MISSED"));
    }

    #[test]
    fn table_names_every_measurement() {
        let t = sample_report().table();
        for needle in [
            "floor",
            "start",
            "exec `true`",
            "terminate",
            "K = 4",
            "QEMU, idle VM",
            "PSS per VM, 8 running",
            "uvmctl create --start",
            "exec `true` over the API",
            "uvmctl ps, 8 VMs",
            "MB/s",
        ] {
            assert!(t.contains(needle), "{needle} missing from\n{t}");
        }
    }

    #[test]
    fn dates_are_utc_iso8601() {
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601_utc(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
