//! # uvm-bench — `uvmctl bench`
//!
//! Whole-VM latencies and costs of real QEMU VMs, against a floor of the same QEMU started with
//! no controller. `uvmctl bench` parses [`cli::BenchArgs`] and calls [`cli::run`].
//!
//! One run measures, in this order:
//! 1. *floor* and *start* alternately (floor, start, floor, start, …, after one untimed warm-up
//!    of each) so that machine noise hits both alike; every start is followed by a timed
//!    *terminate*;
//! 2. on one VM: idle *memory* (QEMU, vhost-device-vsock), *exec* round trips (`true`, and 1 MiB
//!    of stdout), and the exec of `true` taken apart RPC by RPC;
//! 3. *density*: K VMs started at once, for each K, with the controller's RSS growth per VM in
//!    the largest run;
//! 4. the *long-lived* path ([`api`]): `uvmctl create --start`, exec over the API, the
//!    supervisor's RSS, `uvmctl ps` with 8 VMs and `uvmctl cp`, each against its in-process
//!    counterpart in the same run;
//! 5. *disks and shares* ([`devices`], q35): hot-add → mounted against the bare QMP
//!    `device_add` → visible in the guest, and reads in the guest on a disk and on a share
//!    against the same file read on the host;
//! 6. *memory hot-add* ([`resources`], q35): `update_memory` +256 MiB → plugged → the guest's
//!    `MemTotal` shows it, and back;
//! 7. *the security policy* ([`policy`]): exec `true` under `sandbox.rego` against a VM
//!    without a policy, in turn.
//! 8. *networking* ([`network`]): TCP round trips and throughput guest ↔ host through a
//!    namespace NIC and user-mode networking, against two namespaces over a veth alone; NIC
//!    hot-add → configured in the guest.
//!
//! Modules: [`cli`] (arguments, output), [`floor`] (raw QEMU), [`measure`] (through
//! [`uvm_vm::Vm`]), [`rpc`] (exec RPCs), [`phases`] (boot-phase breakdown), [`stats`], [`procs`]
//! (`/proc`), [`report`] (JSON, table), [`plot`] (PNG). How to read the results: `BENCHMARKS.md`.

pub mod api;
pub mod cli;
pub mod devices;
pub mod floor;
pub mod measure;
pub mod network;
pub mod phases;
pub mod plot;
pub mod policy;
pub mod procs;
pub mod report;
pub mod resources;
pub mod rpc;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use uvm::seams::VmConfig;
use uvm::{ControllerError, State};
use uvm_image::{Image, ImageError, ImageSpec, KernelFlavor};
use uvm_qemu::QemuBackend;

use floor::{FloorConfig, FloorSample};
use measure::StartSample;
use phases::Phases;
use report::{BenchReport, BreakdownSummary};
use stats::Summary;

use uvm_vm::VmOptions;

/// What can go wrong while benchmarking.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("preparing the guest image failed")]
    Image(#[from] ImageError),
    #[error("{what} failed")]
    Controller {
        what: &'static str,
        #[source]
        source: ControllerError,
    },
    #[error("{operation} failed")]
    Io {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited early ({status}); its log ends with: {log}")]
    ChildExited {
        name: &'static str,
        status: String,
        log: String,
    },
    #[error("waiting for {what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("the guest misbehaved: {message}")]
    Guest { message: String },
    #[error("the floor's guest did not announce itself")]
    ReadyLine(#[source] uvm_agent_proto::announce::ReadyError),
    #[error("a boot mark is missing: {mark}")]
    MissingMark { mark: &'static str },
    #[error("`{command}` exited with {exit_code} after writing {bytes} bytes to stdout")]
    WrongOutput {
        command: &'static str,
        exit_code: i32,
        bytes: u64,
    },
    #[error("the VM is {state} after terminate_vm, not Terminated")]
    NotTerminated { state: State },
    #[error("the VM left processes {pids:?} (or its directory) behind: {}", dir.display())]
    Leaked { dir: PathBuf, pids: Vec<u32> },
    #[error("a benchmark task failed: {message}")]
    Task { message: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Cli {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no samples for {0}")]
    NoSamples(&'static str),
    #[error("drawing {} failed: {message}", path.display())]
    Plot { path: PathBuf, message: String },
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Floor/start pairs (each start also gives a terminate sample).
    pub iterations: usize,
    /// Execs of each kind.
    pub exec_iterations: usize,
    /// The K of each density run.
    pub density: Vec<usize>,
    /// Passed on to the report.
    pub quick: bool,
    /// Force a kernel flavour (otherwise `UVM_KERNEL`, else ours if built, else Debian's).
    pub kernel: Option<KernelFlavor>,
    /// The VMs' shape (memory, CPUs, accelerator, timeouts).
    pub vm: VmOptions,
    /// Progress lines on stderr.
    pub progress: bool,
    /// The long-lived path (supervisors, the API, the CLI), when given the `uvmctl` binary.
    pub api: Option<api::ApiOptions>,
    /// Disks and shares (measured on q35 only).
    pub devices: Option<devices::DeviceOptions>,
    /// Memory hot-add (q35 only).
    pub resources: Option<resources::ResourceOptions>,
    /// exec under a policy against none.
    pub policy: Option<policy::PolicyOptions>,
    /// TCP through the NICs against a veth alone, NIC hot-add (root, q35).
    pub network: Option<network::NetworkOptions>,
}

impl BenchOptions {
    /// Iteration counts for a normal run, or for `--quick` (under 5 minutes on 2 cores).
    pub fn new(quick: bool) -> BenchOptions {
        BenchOptions {
            // The ratio of two medians of boots is the target, and it scatters with few pairs
            // (BENCHMARKS.md, "Targets: where each stands"): 20 pairs halve the scatter of 10 for a few
            // seconds more of a quick run.
            iterations: 20,
            exec_iterations: if quick { 20 } else { 50 },
            density: if quick {
                vec![1, 2, 4]
            } else {
                vec![1, 2, 4, 8]
            },
            quick,
            kernel: None,
            vm: VmOptions::default(),
            progress: true,
            api: None,
            devices: Some(devices::DeviceOptions::new(quick)),
            resources: Some(resources::ResourceOptions::new(quick)),
            policy: Some(policy::PolicyOptions::new(quick)),
            network: Some(network::NetworkOptions::new(quick)),
        }
    }
}

/// The guest image, with `kernel` overriding the default flavour; and the flavour used.
pub fn image_for(kernel: Option<KernelFlavor>) -> Result<(Image, KernelFlavor), BenchError> {
    let spec = ImageSpec::from_env_with(kernel)?;
    let image = uvm_image::ensure_image(&spec)?;
    Ok((image, spec.kernel))
}

macro_rules! progress {
    ($opts:expr, $($arg:tt)*) => {
        if $opts.progress {
            eprintln!("bench: {}", format_args!($($arg)*));
        }
    };
}

/// Runs every measurement and returns the report. Call it from the thread that drives the
/// runtime (`block_on`) or a runtime worker: the floor's children die with the spawning thread.
pub async fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let began = Instant::now();
    let date = report::iso8601_utc(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    let loadavg = read_loadavg();
    let (image, flavor) = image_for(opts.kernel)?;
    let backend = QemuBackend::new(uvm_vm::qemu_config(&image, &opts.vm));
    let accel = backend.accel();
    let machine = opts.vm.machine;
    let floor_cfg = FloorConfig {
        backend: backend.clone(),
        vm: VmConfig {
            memory_mib: opts.vm.memory_mib,
            cpus: opts.vm.cpus,
            security_policy: None,
            ..VmConfig::default()
        },
        timeout: opts.vm.timeouts.guest_connect,
    };
    progress!(
        opts,
        "image {} (kernel {flavor}), accel {}, machine {machine}",
        uvm_util::short_id(&image.id, 12),
        accel.as_str()
    );

    // 1. Floor and start, alternating, after an untimed warm-up of each.
    floor::floor_once(&floor_cfg).await?;
    measure::start_once(&image, &opts.vm).await?;
    let mut floors: Vec<FloorSample> = Vec::new();
    let mut starts: Vec<StartSample> = Vec::new();
    for i in 1..=opts.iterations {
        let f = floor::floor_once(&floor_cfg).await?;
        let s = measure::start_once(&image, &opts.vm).await?;
        progress!(
            opts,
            "{i}/{}: floor {:.0} ms, start {:.0} ms, terminate {:.0} ms",
            opts.iterations,
            stats::ms(f.total),
            stats::ms(s.total),
            stats::ms(s.terminate)
        );
        floors.push(f);
        starts.push(s);
    }

    // 2. Memory and exec on one VM.
    let exec = measure::exec_session(
        &image,
        &opts.vm,
        Duration::from_secs(1),
        opts.exec_iterations,
        opts.exec_iterations.div_ceil(2),
    )
    .await?;
    progress!(
        opts,
        "exec: `true` median {:.1} ms, 1 MiB median {:.1} ms",
        summary(&exec.exec_true, "exec true")?.median,
        summary(&exec.exec_bulk, "exec 1 MiB")?.median
    );

    // 3. Density.
    let mut density = BTreeMap::new();
    let mut controller_rss = None;
    let mut pss_per_vm = None;
    let largest = opts.density.iter().copied().max().unwrap_or(0);
    for &k in &opts.density {
        let d = measure::density_once(&image, &opts.vm, k).await?;
        progress!(
            opts,
            "density K={k}: all Running after {:.2} s",
            d.all_running.as_secs_f64()
        );
        density.insert(k, d.all_running.as_secs_f64());
        if k == largest {
            controller_rss = d.controller_rss_per_vm.map(|b| b / f64::from(1u32 << 20));
            pss_per_vm = d.pss_per_vm.map(|b| (k, b / f64::from(1u32 << 20)));
        }
    }

    // 4. The long-lived path.
    let api = match &opts.api {
        Some(api_opts) => {
            let report = |line: String| progress!(opts, "{line}");
            Some(
                api::run(&image, opts.kernel, &opts.vm, api_opts, &report)
                    .await?
                    .summarize()?,
            )
        }
        None => None,
    };

    // 5. Disks and shares.
    let devices = match &opts.devices {
        Some(dev_opts) if machine == uvm_qemu::Machine::Q35 => {
            let report = |line: String| progress!(opts, "{line}");
            let agent = ImageSpec::from_env_with(opts.kernel)?.agent;
            Some(
                devices::run(&image, &agent, &opts.vm, dev_opts, &report)
                    .await?
                    .summarize(dev_opts.read_file_mib)?,
            )
        }
        Some(_) => {
            progress!(
                opts,
                "disks and shares: not measured on {machine} (no hot-add)"
            );
            None
        }
        None => None,
    };

    // 6. Memory hot-add.
    let resources = match &opts.resources {
        Some(res_opts) if machine == uvm_qemu::Machine::Q35 => {
            let r = resources::run(&image, &opts.vm, res_opts)
                .await?
                .summarize()?;
            progress!(
                opts,
                "memory: +{} MiB plugged median {:.1} ms, visible {:.1} ms",
                resources::GROW_MIB,
                r.grow.median,
                r.visible.median
            );
            Some(r)
        }
        Some(_) | None => None,
    };

    // 7. The security policy's cost per exec.
    let policy = match &opts.policy {
        Some(pol_opts) => {
            let r = policy::run(&image, &opts.vm, pol_opts).await?.summarize()?;
            progress!(
                opts,
                "policy: exec true median {:.2} ms under sandbox.rego, {:.2} ms without ({:.3}×)",
                r.sandbox.median,
                r.none.median,
                r.ratio()
            );
            Some(r)
        }
        None => None,
    };

    // 8. Networking: TCP through each NIC against a veth alone, and NIC hot-add.
    let root = rustix::process::geteuid().is_root();
    let network = match &opts.network {
        Some(net_opts) if machine == uvm_qemu::Machine::Q35 && root => {
            let r = network::run(&image, &opts.vm, net_opts)
                .await?
                .summarize()?;
            progress!(
                opts,
                "network: round trip median {:.3} ms veth, {:.3} ms namespace NIC ({:.2}×), {:.3} ms user-mode ({:.2}×); NIC hot-add {:.0} ms",
                r.veth.rtt_ms.median,
                r.netns.rtt_ms.median,
                r.netns_rtt_ratio(),
                r.user.rtt_ms.median,
                r.user_rtt_ratio(),
                r.hot_add_ms.median
            );
            Some(r)
        }
        Some(_) => {
            progress!(opts, "network: not measured (needs root and q35)");
            None
        }
        None => None,
    };

    let b = &exec.breakdown;
    let to_ms = |v: &[Duration]| v.iter().copied().map(stats::ms).collect::<Vec<_>>();
    let samples = [
        (
            "floor",
            to_ms(&floors.iter().map(|f| f.total).collect::<Vec<_>>()),
        ),
        (
            "start",
            to_ms(&starts.iter().map(|s| s.total).collect::<Vec<_>>()),
        ),
        (
            "terminate",
            to_ms(&starts.iter().map(|s| s.terminate).collect::<Vec<_>>()),
        ),
        ("exec_true", to_ms(&exec.exec_true)),
        ("exec_1mib", to_ms(&exec.exec_bulk)),
        ("rpc_roundtrip", to_ms(&b.rpc_roundtrip)),
        ("exec_rpcs_sequential", to_ms(&b.total)),
        ("exec_rpcs_pipelined", to_ms(&b.pipelined)),
        ("guest_process", to_ms(&exec.guest_process)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Ok(BenchReport {
        date,
        accelerator: accel.as_str().to_owned(),
        kernel: Some(flavor.name().to_owned()),
        machine: machine.as_str().to_owned(),
        qemu: qemu_version(&backend.config().qemu),
        host_cpus: std::thread::available_parallelism().map_or(0, usize::from),
        loadavg,
        loadavg_end: read_loadavg(),
        iterations: opts.iterations,
        quick: opts.quick,
        memory_mib: opts.vm.memory_mib,
        cpus: opts.vm.cpus,
        floor: summary(&floors.iter().map(|f| f.total).collect::<Vec<_>>(), "floor")?,
        start: summary(&starts.iter().map(|s| s.total).collect::<Vec<_>>(), "start")?,
        paired_ratio: Summary::of(
            &floors
                .iter()
                .zip(&starts)
                .map(|(f, s)| s.total.as_secs_f64() / f.total.as_secs_f64())
                .collect::<Vec<_>>(),
        )
        .ok_or(BenchError::NoSamples("start/floor pairs"))?,
        paired_overhead: Summary::of(
            &floors
                .iter()
                .zip(&starts)
                .map(|(f, s)| stats::ms(s.total) - stats::ms(f.total))
                .collect::<Vec<_>>(),
        )
        .ok_or(BenchError::NoSamples("start/floor pairs"))?,
        exec_true: summary(&exec.exec_true, "exec true")?,
        exec_1mib: summary(&exec.exec_bulk, "exec 1 MiB")?,
        terminate: summary(
            &starts.iter().map(|s| s.terminate).collect::<Vec<_>>(),
            "terminate",
        )?,
        qemu_rss_mib: procs::mib(exec.qemu_rss),
        vsock_rss_mib: procs::mib(exec.vsock_rss),
        controller_rss_mib: controller_rss,
        pss_per_vm_mib: pss_per_vm,
        density,
        phases_floor: Phases::median_of(&floors.iter().map(|f| f.phases).collect::<Vec<_>>()),
        phases_start: Phases::median_of(&starts.iter().map(|s| s.phases).collect::<Vec<_>>()),
        exec_breakdown: BreakdownSummary {
            rpc_roundtrip: summary(&b.rpc_roundtrip, "RPC round trip")?,
            exec_process: summary(&b.exec_process, "ExecProcess")?,
            read_output: summary(&b.read_output, "ReadOutput")?,
            wait_process: summary(&b.wait_process, "WaitProcess")?,
            total: summary(&b.total, "exec RPCs")?,
            pipelined: summary(&b.pipelined, "pipelined exec RPCs")?,
            guest_process: summary(&exec.guest_process, "guest process")?,
        },
        api,
        devices,
        resources,
        policy,
        network,
        elapsed_s: began.elapsed().as_secs_f64(),
        samples,
    })
}

fn summary(samples: &[Duration], what: &'static str) -> Result<Summary, BenchError> {
    Summary::of_durations(samples).ok_or(BenchError::NoSamples(what))
}

/// `/proc/loadavg`'s three averages.
fn read_loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_ascii_whitespace().map(|w| w.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// The first line of `qemu --version`.
fn qemu_version(qemu: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
}
