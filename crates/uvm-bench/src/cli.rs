//! The `uvmctl bench` command line: arguments, and printing the report (JSON or a table) and
//! the plot.

use std::path::PathBuf;

use clap::ValueEnum;
use uvm_image::KernelFlavor;
use uvm_qemu::{Accel, Machine};

use super::{BenchError, BenchOptions};

/// `uvmctl bench` arguments.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Floor/start pairs (default 20, also with --quick: the start/floor ratio needs them).
    #[arg(long)]
    pub iterations: Option<usize>,
    /// Execs of each kind (default 50; 20 with --quick).
    #[arg(long)]
    pub exec_iterations: Option<usize>,
    /// Fewer execs and density up to 4 VMs: under a minute on 2 cores.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object on stdout instead of a table (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Density runs: how many VMs to start at once, comma-separated (default 1,2,4,8; 1,2,4
    /// with --quick).
    #[arg(long, value_delimiter = ',')]
    pub density: Option<Vec<usize>>,
    /// Write the boot-phase plot (PNG) here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Guest kernel flavour (default: UVM_KERNEL, else ours when built, else Debian's). Several,
    /// comma-separated (`ours,debian`): the whole benchmark once per kernel, one after the
    /// other, then their figures side by side (with --json: `{"kernels": {name: report}}`).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub kernel: Vec<KernelArg>,
    /// Accelerator: KVM only where the CPU advertises vmx/svm (auto), or forced.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Machine model: q35 (PCIe, hotplug) or microvm (qboot, virtio-mmio, fastest boot).
    #[arg(long, value_enum, default_value_t = MachineArg::Q35)]
    pub machine: MachineArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// Virtual CPUs per guest.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Appended to the guest kernel command line (floor and controller alike).
    #[arg(long, default_value = "")]
    pub append: String,
    /// No progress lines on stderr.
    #[arg(long)]
    pub silent: bool,
    /// Leave out the long-lived path (`uvmctl create --start`, exec over the API, the
    /// supervisor's memory, `ps` with 8 VMs, `cp` of 100 MiB).
    #[arg(long)]
    pub no_api: bool,
    /// Leave out disks and shares (hot-add → mounted against the bare QMP path, reads on a
    /// disk and a share against the host; q35 only).
    #[arg(long)]
    pub no_devices: bool,
    /// Leave out memory hot-add (`update_memory` +256 MiB on a VM with a maximum; q35 only).
    #[arg(long)]
    pub no_resources: bool,
    /// Leave out the security policy's cost (exec `true` under sandbox.rego against a VM
    /// without a policy).
    #[arg(long)]
    pub no_policy: bool,
    /// Leave out networking (TCP round trips and throughput through a namespace NIC and
    /// user-mode against a veth alone, NIC hot-add; needs root).
    #[arg(long)]
    pub no_network: bool,
}

/// `--kernel`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KernelArg {
    Ours,
    Debian,
}

/// `--machine`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MachineArg {
    Q35,
    Microvm,
}

/// `--accel`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl BenchArgs {
    /// The options of each run these arguments ask for: one per `--kernel` (one when none).
    pub fn runs(&self) -> Vec<BenchOptions> {
        if self.kernel.is_empty() {
            return vec![self.options(None)];
        }
        self.kernel.iter().map(|k| self.options(Some(*k))).collect()
    }

    /// The options of a run on `kernel` (`None`: the default kernel).
    pub fn options(&self, kernel: Option<KernelArg>) -> BenchOptions {
        let mut o = BenchOptions::new(self.quick);
        if let Some(n) = self.iterations {
            o.iterations = n.max(1);
        }
        if let Some(n) = self.exec_iterations {
            o.exec_iterations = n.max(1);
        }
        if let Some(d) = &self.density {
            o.density = d.iter().copied().filter(|k| *k > 0).collect();
        }
        o.kernel = kernel.map(|k| match k {
            KernelArg::Ours => KernelFlavor::Ours,
            KernelArg::Debian => KernelFlavor::Debian,
        });
        o.vm.accel = match self.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        };
        o.vm.machine = match self.machine {
            MachineArg::Q35 => Machine::Q35,
            MachineArg::Microvm => Machine::Microvm,
        };
        o.vm.memory_mib = self.memory;
        o.vm.cpus = self.cpus;
        o.vm.extra_cmdline = self.append.clone();
        o.progress = !self.silent;
        // The long-lived path runs this very binary's `create`, `ps`, `exec` and `cp`.
        o.api = if self.no_api {
            None
        } else {
            std::env::current_exe()
                .ok()
                .map(|uvmctl| super::api::ApiOptions::new(uvmctl, self.quick))
        };
        if self.no_devices {
            o.devices = None;
        }
        if self.no_resources {
            o.resources = None;
        }
        if self.no_policy {
            o.policy = None;
        }
        if self.no_network {
            o.network = None;
        }
        o
    }
}

/// Runs the benchmark (once per kernel asked for) and prints its report; the exit code is 0
/// (missed targets are results).
pub async fn run(args: BenchArgs) -> Result<u8, BenchError> {
    let runs = args.runs();
    let several = runs.len() > 1;
    let mut reports = Vec::with_capacity(runs.len());
    for options in &runs {
        let report = super::run(options).await?;
        if let Some(path) = &args.plot {
            let path = if several {
                plot_path_for(path, report.kernel.as_deref().unwrap_or("unknown"))
            } else {
                path.clone()
            };
            let title = format!(
                "boot phases, median ms: {} / {} / kernel {} / {}",
                report.accelerator,
                report.machine,
                report.kernel.as_deref().unwrap_or("?"),
                report.date.get(..10).unwrap_or(&report.date)
            );
            super::plot::write_phase_plot(
                &path,
                &title,
                &report.phases_floor,
                &report.phases_start,
            )?;
            if !args.json {
                println!("plot written to {}", path.display());
            }
        }
        if !args.json {
            print!("{}", report.table());
        }
        reports.push(report);
    }
    if args.json {
        if several {
            let kernels: serde_json::Map<String, serde_json::Value> = reports
                .iter()
                .map(|r| (r.kernel.clone().unwrap_or_default(), r.to_json()))
                .collect();
            println!("{}", serde_json::json!({ "kernels": kernels }));
        } else if let Some(report) = reports.first() {
            println!("{}", report.to_json());
        }
    } else if several {
        print!("{}", super::report::comparison_table(&reports));
    }
    Ok(0)
}

/// `dir/name.png` → `dir/name-<kernel>.png`, one plot per kernel.
fn plot_path_for(path: &std::path::Path, kernel: &str) -> PathBuf {
    let stem = path.file_stem().map_or_else(
        || "boot-phases".to_owned(),
        |s| s.to_string_lossy().into_owned(),
    );
    let ext = path
        .extension()
        .map_or_else(|| "png".to_owned(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}-{kernel}.{ext}"))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn quick_json_with_density_and_kernel_parse() {
        let cli = Cli::parse_from([
            "bench",
            "--quick",
            "--json",
            "--density",
            "1,2,4,8",
            "--kernel",
            "debian",
            "--plot",
            "docs/boot-phases.png",
        ]);
        let runs = cli.bench.runs();
        assert_eq!(runs.len(), 1);
        let o = &runs[0];
        assert!(o.quick && cli.bench.json);
        assert_eq!(o.iterations, 20);
        assert_eq!(o.exec_iterations, 20);
        assert_eq!(o.density, [1, 2, 4, 8]);
        assert_eq!(o.kernel, Some(KernelFlavor::Debian));
        assert_eq!(cli.bench.plot, Some(PathBuf::from("docs/boot-phases.png")));
    }

    #[test]
    fn the_long_lived_path_runs_unless_no_api_is_given() {
        let parse = |args: &[&str]| {
            Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).bench
        };
        let with = parse(&["--quick"]).runs();
        let api = with[0].api.as_ref().expect("measured by default");
        assert_eq!(api.ps_vms, 8);
        assert_eq!(api.copy_mib, 100);
        assert!(parse(&["--quick", "--no-api"]).runs()[0].api.is_none());
        assert!(with[0].devices.is_some());
        assert!(parse(&["--no-devices"]).runs()[0].devices.is_none());
    }

    #[test]
    fn defaults_differ_between_quick_and_full_runs() {
        let full = Cli::parse_from(["bench"]).bench.options(None);
        assert_eq!(full.density, [1, 2, 4, 8]);
        assert!(full.iterations > 10);
        let quick = Cli::parse_from(["bench", "--quick", "--iterations", "3"])
            .bench
            .options(None);
        assert_eq!(quick.density, [1, 2, 4]);
        assert_eq!(quick.iterations, 3);
        assert_eq!(quick.kernel, None);
    }

    #[test]
    fn several_kernels_make_one_run_each_in_order_with_a_plot_each() {
        let cli = Cli::parse_from(["bench", "--quick", "--kernel", "ours,debian"]);
        let kernels: Vec<_> = cli.bench.runs().iter().map(|o| o.kernel).collect();
        assert_eq!(
            kernels,
            [Some(KernelFlavor::Ours), Some(KernelFlavor::Debian)]
        );
        assert!(cli.bench.runs().iter().all(|o| o.quick));
        assert_eq!(
            plot_path_for(std::path::Path::new("docs/boot-phases.png"), "debian"),
            PathBuf::from("docs/boot-phases-debian.png")
        );
    }
}
