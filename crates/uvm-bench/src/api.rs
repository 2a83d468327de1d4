//! Long-lived VMs, each owned by its supervisor and reached through `uvmctl` and the gRPC API,
//! against the in-process controller in the same run:
//!
//! - `uvmctl create --start` (a CLI process, a detached supervisor, the boot, the API's Start)
//!   alternated with an in-process boot (`Vm::boot`);
//! - the exec of `true` over the API's Exec stream (a tonic client in this process) alternated
//!   with the in-process exec, each on its own VM, both VMs running;
//! - the supervisor's resident memory with its VM running;
//! - `uvmctl ps` with [`ApiOptions::ps_vms`] VMs created and running;
//! - `uvmctl cp` of a file of [`ApiOptions::copy_mib`] MiB into and out of the guest, alternated
//!   with the same bytes through `uvmctl exec -i … -- sh -c 'cat > …'` and `exec … -- cat`.
//!
//! Everything lives in a private state root (`Root`) whose VMs are removed (`rm -f`) and whose
//! directory is deleted when it drops, whatever happened.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use uvm::seams::ExecRequest;
use uvm_api::v1;
use uvm_api::v1::exec_request::Frame as In;
use uvm_api::v1::exec_response::Frame as Out;
use uvm_api::v1::vm_service_client::VmServiceClient;
use uvm_image::{Image, KernelFlavor};
use uvm_vm::{Vm, VmOptions};

use super::stats::Summary;
use super::BenchError;

/// How much of the long-lived path to measure.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// The `uvmctl` binary (`uvmctl bench` passes itself).
    pub uvmctl: PathBuf,
    /// `create --start` / in-process boot pairs.
    pub pairs: usize,
    /// API / in-process exec pairs.
    pub execs: usize,
    /// VMs running while `ps` is timed.
    pub ps_vms: usize,
    /// Timed `ps` runs.
    pub ps_runs: usize,
    /// The size of the copied file, in MiB.
    pub copy_mib: u64,
    /// Copies of each kind, each direction.
    pub copy_runs: usize,
    /// Guest memory of the VMs that exec and copy (the copied file lives in the guest's tmpfs).
    pub copy_vm_memory_mib: u64,
}

impl ApiOptions {
    /// The counts of a normal run, or of `--quick`.
    pub fn new(uvmctl: PathBuf, quick: bool) -> ApiOptions {
        ApiOptions {
            uvmctl,
            pairs: if quick { 6 } else { 12 },
            execs: if quick { 20 } else { 50 },
            ps_vms: 8,
            ps_runs: 20,
            copy_mib: 100,
            copy_runs: if quick { 2 } else { 4 },
            copy_vm_memory_mib: 512,
        }
    }
}

/// The samples of one run.
#[derive(Debug, Clone, Default)]
pub struct ApiSamples {
    /// `uvmctl create --start`, CLI process to its exit.
    pub create_start: Vec<Duration>,
    /// The in-process boot each `create --start` was paired with.
    pub in_process_boot: Vec<Duration>,
    /// Exec of `true` over the API's Exec stream.
    pub api_exec_true: Vec<Duration>,
    /// Exec of `true` through the in-process controller, alternated with the above.
    pub in_process_exec_true: Vec<Duration>,
    /// The supervisor's VmRSS with its VM running, in bytes.
    pub supervisor_rss: u64,
    /// `uvmctl ps`, CLI process to its exit.
    pub ps: Vec<Duration>,
    /// How many VMs `ps` listed.
    pub ps_vms: usize,
    /// `uvmctl cp FILE ID:PATH`.
    pub cp_in: Vec<Duration>,
    /// `uvmctl exec -i ID -- sh -c 'cat > PATH' < FILE`.
    pub cat_in: Vec<Duration>,
    /// `uvmctl cp ID:PATH FILE`.
    pub cp_out: Vec<Duration>,
    /// `uvmctl exec ID -- cat PATH > FILE`.
    pub cat_out: Vec<Duration>,
    /// The copied file's size in bytes.
    pub copy_bytes: u64,
}

/// `uvmctl --root ROOT`: runs CLI commands against one state root. Cheap to clone into a
/// blocking task.
#[derive(Debug, Clone)]
struct Cli {
    uvmctl: PathBuf,
    root: PathBuf,
}

impl Cli {
    /// `uvmctl --root ROOT ARGS…`, not yet run, with an empty stdin.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.uvmctl);
        c.arg("--root").arg(&self.root).args(args);
        c.stdin(Stdio::null());
        c
    }

    /// Runs `uvmctl ARGS…` to completion; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<String, BenchError> {
        output_of(self.command(args), args)
    }

    /// `uvmctl create --start FLAGS…`: the new VM's id.
    fn create_started(&self, flags: &[String]) -> Result<String, BenchError> {
        let mut args = vec!["create", "--start"];
        args.extend(flags.iter().map(String::as_str));
        Ok(self.run(&args)?.trim().to_owned())
    }
}

/// A private state root for the run's VMs: every VM in it is removed with `uvmctl rm -f`, and
/// the directory deleted, when it drops.
struct Root {
    cli: Cli,
    // Dropped after `drop` has removed the VMs.
    _dir: tempfile::TempDir,
}

impl Root {
    /// A new empty root under `/tmp` (short, for socket paths).
    fn new(uvmctl: &Path) -> Result<Root, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("uvmb")
            .tempdir_in("/tmp")
            .map_err(|source| BenchError::Io {
                operation: "create the benchmark's state root",
                source,
            })?;
        Ok(Root {
            cli: Cli {
                uvmctl: uvmctl.to_owned(),
                root: dir.path().to_owned(),
            },
            _dir: dir,
        })
    }

    /// The ids of every VM directory in the root.
    fn vm_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.cli.root) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name != "names")
            .collect()
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let ids = self.vm_ids();
        if ids.is_empty() {
            return;
        }
        let mut args = vec!["rm", "-f"];
        args.extend(ids.iter().map(String::as_str));
        if let Err(e) = self.cli.run(&args) {
            eprintln!("bench: removing the benchmark's VMs failed: {e}");
        }
    }
}

/// Runs `command`; its stdout, or [`BenchError::Cli`] with its exit status and stderr.
fn output_of(mut command: Command, args: &[&str]) -> Result<String, BenchError> {
    let out = command.output().map_err(|source| BenchError::Spawn {
        program: PathBuf::from(command.get_program()),
        source,
    })?;
    if !out.status.success() {
        return Err(BenchError::Cli {
            command: format!("uvmctl {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `time` of one blocking CLI run, off the runtime's worker.
async fn timed<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> Result<(Duration, T), BenchError> {
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let value = f()?;
        Ok((t.elapsed(), value))
    })
    .await
    .map_err(|e| BenchError::Task {
        message: e.to_string(),
    })?
}

/// The VM options of `options` (and the kernel flavour, when forced) as `uvmctl create` flags.
fn create_flags(options: &VmOptions, kernel: Option<KernelFlavor>, memory_mib: u64) -> Vec<String> {
    let accel = match options.accel {
        uvm_qemu::Accel::Auto => "auto",
        uvm_qemu::Accel::Kvm => "kvm",
        uvm_qemu::Accel::Tcg => "tcg",
    };
    let mut flags: Vec<String> = vec![
        "--memory".into(),
        memory_mib.to_string(),
        "--cpus".into(),
        options.cpus.to_string(),
        "--accel".into(),
        accel.into(),
        "--machine".into(),
        options.machine.as_str().into(),
        format!("--append={}", options.extra_cmdline),
    ];
    if let Some(kernel) = kernel {
        flags.extend(["--kernel".into(), kernel.name().into()]);
    }
    flags
}

/// A connected API client of VM `id` in `root`.
async fn client(
    root: &Path,
    id: &str,
) -> Result<VmServiceClient<tonic::transport::Channel>, BenchError> {
    let socket = root.join(id).join(uvm_supervisor::record::SOCKET_FILE);
    uvm_api::connect_client(&socket)
        .await
        .map_err(|e| BenchError::Task {
            message: format!(
                "connecting to {}: {}",
                socket.display(),
                uvm::error_chain(&e)
            ),
        })
}

fn addressed<T>(id: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = id.parse() {
        request
            .metadata_mut()
            .insert(uvm_api::VM_ID_METADATA, value);
    }
    request
}

/// One exec of `true` over the API's Exec stream, to its Exited frame.
async fn api_exec_true(
    client: &mut VmServiceClient<tonic::transport::Channel>,
    id: &str,
) -> Result<(), BenchError> {
    let failed = |message: String| BenchError::Task { message };
    let (tx, rx) = mpsc::channel(1);
    let spec = v1::ExecSpec {
        args: vec!["true".into()],
        ..v1::ExecSpec::default()
    };
    tx.send(v1::ExecRequest {
        frame: Some(In::Spec(spec)),
    })
    .await
    .map_err(|e| failed(e.to_string()))?;
    let mut responses = client
        .exec(addressed(id, ReceiverStream::new(rx)))
        .await
        .map_err(|s| failed(format!("API exec: {}", s.message())))?
        .into_inner();
    // The request stream stays open (tx alive) until the process has exited.
    while let Some(message) = responses
        .message()
        .await
        .map_err(|s| failed(format!("API exec: {}", s.message())))?
    {
        if let Some(Out::Exited(exited)) = message.frame {
            drop(tx);
            return match exited.exit_code {
                0 => Ok(()),
                code => Err(BenchError::WrongOutput {
                    command: "true",
                    exit_code: code,
                    bytes: 0,
                }),
            };
        }
    }
    Err(failed(
        "the API's Exec stream ended without an Exited frame".into(),
    ))
}

/// `pid` of the supervisor of VM `id`, from its record.
fn supervisor_pid(root: &Path, id: &str) -> Result<u32, BenchError> {
    let record = uvm_supervisor::read_record(&root.join(id)).map_err(|e| BenchError::Task {
        message: format!("reading the record of {id}: {}", uvm::error_chain(&e)),
    })?;
    record
        .pids
        .get("supervisor")
        .map(|p| p.pid)
        .ok_or(BenchError::MissingMark {
            mark: "the supervisor's pid",
        })
}

/// The median of `samples` in ms.
fn median_ms(samples: &[Duration]) -> f64 {
    super::stats::median(
        &samples
            .iter()
            .copied()
            .map(super::stats::ms)
            .collect::<Vec<_>>(),
    )
}

/// Runs every measurement of the long-lived path. `progress` gets one line per step.
pub async fn run(
    image: &Image,
    kernel: Option<KernelFlavor>,
    vm: &VmOptions,
    opts: &ApiOptions,
    progress: &(dyn Fn(String) + Sync),
) -> Result<ApiSamples, BenchError> {
    let root = Root::new(&opts.uvmctl)?;
    let cli = root.cli.clone();
    let mut out = ApiSamples::default();

    // 1. create --start against the in-process boot, alternated after a warm-up of each.
    let flags = create_flags(vm, kernel, vm.memory_mib);
    for i in 0..=opts.pairs {
        let boot = super::measure::start_once(image, vm).await?;
        let (c, f) = (cli.clone(), flags.clone());
        let (took, id) = timed(move || c.create_started(&f)).await?;
        cli.run(&["rm", "-f", &id])?;
        if i > 0 {
            progress(format!(
                "api {i}/{}: create --start {:.0} ms, in-process boot {:.0} ms",
                opts.pairs,
                super::stats::ms(took),
                super::stats::ms(boot.total)
            ));
            out.create_start.push(took);
            out.in_process_boot.push(boot.total);
        }
    }

    // 2. Exec and copies on one supervised VM, beside one in-process VM.
    let memory_mib = opts.copy_vm_memory_mib.max(vm.memory_mib);
    let id = cli.create_started(&create_flags(vm, kernel, memory_mib))?;
    let local = Vm::new(
        image,
        VmOptions {
            memory_mib,
            ..vm.clone()
        },
    );
    let result = exec_and_copy(&cli, &id, &local, opts, &mut out, progress).await;
    let teardown = local.controller.terminate_vm().await;
    result?;
    teardown.map_err(|source| BenchError::Controller {
        what: "terminate a VM",
        source,
    })?;

    // 3. ps with ps_vms VMs running (the exec VM is one of them).
    let mut ids = vec![id];
    while ids.len() < opts.ps_vms {
        ids.push(cli.create_started(&flags)?);
    }
    out.ps_vms = ids.len();
    cli.run(&["ps"])?;
    for _ in 0..opts.ps_runs {
        let c = cli.clone();
        let (took, listed) = timed(move || c.run(&["ps", "--json"])).await?;
        let n = serde_json::from_str::<Vec<serde_json::Value>>(&listed).map_or(0, |v| v.len());
        if n != ids.len() {
            return Err(BenchError::Task {
                message: format!("`uvmctl ps` listed {n} VMs, not {}", ids.len()),
            });
        }
        out.ps.push(took);
    }
    progress(format!(
        "api: ps with {} VMs median {:.1} ms",
        ids.len(),
        median_ms(&out.ps)
    ));
    let mut rm = vec!["rm", "-f"];
    rm.extend(ids.iter().map(String::as_str));
    cli.run(&rm)?;
    Ok(out)
}

/// The exec pairs, the supervisor's RSS and the copies, on the supervised VM `id` and the
/// in-process VM `local` (booted here).
async fn exec_and_copy(
    cli: &Cli,
    id: &str,
    local: &Vm,
    opts: &ApiOptions,
    out: &mut ApiSamples,
    progress: &(dyn Fn(String) + Sync),
) -> Result<(), BenchError> {
    local
        .boot()
        .await
        .map_err(|source| BenchError::Controller {
            what: "start a VM",
            source,
        })?;
    let mut api = client(&cli.root, id).await?;
    let in_process = || async {
        let code = local
            .controller
            .exec_into_host(ExecRequest::new(["true"]))
            .await
            .map_err(|source| BenchError::Controller {
                what: "exec true",
                source,
            })?;
        match code {
            0 => Ok(()),
            exit_code => Err(BenchError::WrongOutput {
                command: "true",
                exit_code,
                bytes: 0,
            }),
        }
    };
    api_exec_true(&mut api, id).await?;
    in_process().await?;
    for i in 0..opts.execs {
        // Which goes first alternates, so neither always follows the other.
        for api_turn in [i % 2 == 0, i % 2 != 0] {
            let t = Instant::now();
            if api_turn {
                api_exec_true(&mut api, id).await?;
                out.api_exec_true.push(t.elapsed());
            } else {
                in_process().await?;
                out.in_process_exec_true.push(t.elapsed());
            }
        }
    }
    progress(format!(
        "api: exec `true` median {:.1} ms over the API, {:.1} ms in-process",
        median_ms(&out.api_exec_true),
        median_ms(&out.in_process_exec_true)
    ));
    let pid = supervisor_pid(&cli.root, id)?;
    out.supervisor_rss = super::procs::rss_bytes(pid).ok_or(BenchError::MissingMark {
        mark: "the supervisor's RSS",
    })?;

    let (c, vm, mib, runs) = (cli.clone(), id.to_owned(), opts.copy_mib, opts.copy_runs);
    let (_, rounds) = timed(move || copies(&c, &vm, mib, runs)).await?;
    out.copy_bytes = opts.copy_mib << 20;
    for [cp_in, cat_in, cp_out, cat_out] in rounds {
        out.cp_in.push(cp_in);
        out.cat_in.push(cat_in);
        out.cp_out.push(cp_out);
        out.cat_out.push(cat_out);
    }
    progress(format!(
        "api: {} MiB in: cp median {:.0} ms, exec cat {:.0} ms; out: cp {:.0} ms, exec cat {:.0} ms",
        opts.copy_mib,
        median_ms(&out.cp_in),
        median_ms(&out.cat_in),
        median_ms(&out.cp_out),
        median_ms(&out.cat_out)
    ));
    Ok(())
}

/// `runs` rounds (after an untimed one) of: `cp` in, `cp` out, `exec -i … cat >` in,
/// `exec … cat` out, of one file of `mib` MiB; every copy brought back is checked byte for
/// byte. Each round: `[cp in, cat in, cp out, cat out]`.
fn copies(cli: &Cli, id: &str, mib: u64, runs: usize) -> Result<Vec<[Duration; 4]>, BenchError> {
    let io = |operation: &'static str| move |source| BenchError::Io { operation, source };
    let host = tempfile::tempdir().map_err(io("create the copies' directory"))?;
    let source = host.path().join("source");
    let pattern = pattern(mib << 20);
    std::fs::write(&source, &pattern).map_err(io("write the file to copy"))?;
    let back = host.path().join("back");
    let (source_arg, back_arg) = (
        source.to_string_lossy().into_owned(),
        back.to_string_lossy().into_owned(),
    );
    let guest = format!("{id}:/tmp/copied");
    let check = |what: &str| -> Result<(), BenchError> {
        let got = std::fs::read(&back).map_err(io("read the file copied back"))?;
        std::fs::remove_file(&back).map_err(io("remove the file copied back"))?;
        if got != pattern {
            return Err(BenchError::Task {
                message: format!(
                    "{what} brought back {} bytes that differ from the {} sent",
                    got.len(),
                    pattern.len()
                ),
            });
        }
        Ok(())
    };
    let rm = || cli.run(&["exec", id, "--", "rm", "/tmp/copied"]);
    let once = || -> Result<[Duration; 4], BenchError> {
        let t = Instant::now();
        cli.run(&["cp", &source_arg, &guest])?;
        let cp_in = t.elapsed();
        let t = Instant::now();
        cli.run(&["cp", &guest, &back_arg])?;
        let cp_out = t.elapsed();
        check("cp")?;
        rm()?;

        let stdin = std::fs::File::open(&source).map_err(io("open the file to copy"))?;
        let args = ["exec", "-i", id, "--", "sh", "-c", "cat > /tmp/copied"];
        let mut c = cli.command(&args);
        c.stdin(stdin);
        let t = Instant::now();
        output_of(c, &args)?;
        let cat_in = t.elapsed();
        let stdout = std::fs::File::create(&back).map_err(io("create the file copied back"))?;
        let args = ["exec", id, "--", "cat", "/tmp/copied"];
        let mut c = cli.command(&args);
        c.stdout(stdout);
        let t = Instant::now();
        output_of(c, &args)?;
        let cat_out = t.elapsed();
        check("exec cat")?;
        rm()?;
        Ok([cp_in, cat_in, cp_out, cat_out])
    };
    once()?;
    (0..runs).map(|_| once()).collect()
}

/// `len` bytes that differ from block to block (so a misplaced chunk is caught).
fn pattern(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8) ^ ((i >> 12) as u8).wrapping_mul(31))
        .collect()
}

/// `api_exec_over_in_process` target: the API's exec of `true` costs at most 1.3× the
/// in-process one (medians).
pub const TARGET_API_EXEC_OVER_IN_PROCESS: f64 = 1.3;
/// `create_start_over_boot` target: `uvmctl create --start` at most 1.1× the in-process boot
/// (median of the paired ratios).
pub const TARGET_CREATE_START_OVER_BOOT: f64 = 1.1;
/// Supervisor resident memory with its VM running, MiB.
pub const TARGET_SUPERVISOR_RSS_MIB: f64 = 15.0;
/// `uvmctl ps` with 8 VMs, median ms.
pub const TARGET_PS_MS: f64 = 50.0;

/// The long-lived path's figures: medians and their ratios, from one run.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiReport {
    /// `uvmctl create --start`.
    pub create_start: Summary,
    /// The in-process boots they were paired with.
    pub in_process_boot: Summary,
    /// Per pair: create --start / in-process boot.
    pub create_over_boot: Summary,
    /// Exec of `true` over the API.
    pub api_exec_true: Summary,
    /// Exec of `true` in-process, alternated with the API's.
    pub in_process_exec_true: Summary,
    /// The supervisor's RSS, MiB.
    pub supervisor_rss_mib: f64,
    /// VMs running during `ps`.
    pub ps_vms: usize,
    /// `uvmctl ps`.
    pub ps: Summary,
    /// The copied file's size, MiB.
    pub copy_mib: f64,
    /// MB/s (10^6 bytes per second) from the median durations.
    pub cp_in_mb_s: f64,
    pub cat_in_mb_s: f64,
    pub cp_out_mb_s: f64,
    pub cat_out_mb_s: f64,
}

impl ApiSamples {
    /// Medians, ratios and rates; an error for a measurement without samples.
    pub fn summarize(&self) -> Result<ApiReport, BenchError> {
        let summary = |v: &[Duration], what: &'static str| {
            Summary::of_durations(v).ok_or(BenchError::NoSamples(what))
        };
        let rate = |v: &[Duration]| {
            let secs = median_ms(v) / 1000.0;
            if secs > 0.0 {
                self.copy_bytes as f64 / 1e6 / secs
            } else {
                f64::NAN
            }
        };
        Ok(ApiReport {
            create_start: summary(&self.create_start, "create --start")?,
            in_process_boot: summary(&self.in_process_boot, "in-process boot")?,
            create_over_boot: Summary::of(
                &self
                    .create_start
                    .iter()
                    .zip(&self.in_process_boot)
                    .map(|(c, b)| c.as_secs_f64() / b.as_secs_f64())
                    .collect::<Vec<_>>(),
            )
            .ok_or(BenchError::NoSamples("create --start / boot pairs"))?,
            api_exec_true: summary(&self.api_exec_true, "API exec true")?,
            in_process_exec_true: summary(&self.in_process_exec_true, "in-process exec true")?,
            supervisor_rss_mib: super::procs::mib(self.supervisor_rss),
            ps_vms: self.ps_vms,
            ps: summary(&self.ps, "ps")?,
            copy_mib: self.copy_bytes as f64 / f64::from(1u32 << 20),
            cp_in_mb_s: rate(&self.cp_in),
            cat_in_mb_s: rate(&self.cat_in),
            cp_out_mb_s: rate(&self.cp_out),
            cat_out_mb_s: rate(&self.cat_out),
        })
    }
}

impl ApiReport {
    /// Median API exec over median in-process exec.
    pub fn api_exec_over_in_process(&self) -> f64 {
        self.api_exec_true.median / self.in_process_exec_true.median
    }

    /// (name, target, value, met) for each target of the long-lived path.
    pub fn targets(&self) -> [(&'static str, f64, f64, bool); 4] {
        let exec = self.api_exec_over_in_process();
        let create = self.create_over_boot.median;
        [
            (
                "api_exec_over_in_process",
                TARGET_API_EXEC_OVER_IN_PROCESS,
                exec,
                exec <= TARGET_API_EXEC_OVER_IN_PROCESS,
            ),
            (
                "create_start_over_boot",
                TARGET_CREATE_START_OVER_BOOT,
                create,
                create <= TARGET_CREATE_START_OVER_BOOT,
            ),
            (
                "supervisor_rss_mib",
                TARGET_SUPERVISOR_RSS_MIB,
                self.supervisor_rss_mib,
                self.supervisor_rss_mib <= TARGET_SUPERVISOR_RSS_MIB,
            ),
            (
                "ps_ms_median",
                TARGET_PS_MS,
                self.ps.median,
                self.ps.median <= TARGET_PS_MS,
            ),
        ]
    }

    /// The JSON object under the report's `api` key.
    pub fn to_json(&self) -> serde_json::Value {
        let round = |v: f64, places: i32| {
            let m = 10f64.powi(places);
            (v * m).round() / m
        };
        serde_json::json!({
            "create_start_ms": self.create_start,
            "in_process_boot_ms": self.in_process_boot,
            "create_start_over_boot": round(self.create_over_boot.median, 3),
            "api_exec_true_ms": self.api_exec_true,
            "in_process_exec_true_ms": self.in_process_exec_true,
            "api_exec_over_in_process": round(self.api_exec_over_in_process(), 3),
            "supervisor_rss_mib": round(self.supervisor_rss_mib, 1),
            "ps_vms": self.ps_vms,
            "ps_ms": self.ps,
            "copy_mib": self.copy_mib,
            "cp_in_mb_s": round(self.cp_in_mb_s, 1),
            "exec_cat_in_mb_s": round(self.cat_in_mb_s, 1),
            "cp_out_mb_s": round(self.cp_out_mb_s, 1),
            "exec_cat_out_mb_s": round(self.cat_out_mb_s, 1),
        })
    }

    /// The table's section for the long-lived path.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nlong-lived VMs (a supervisor each; ms)   {:>5} {:>10} {:>10} {:>10}",
            "n", "median", "p90", "max"
        );
        let ps = format!("uvmctl ps, {} VMs", self.ps_vms);
        for (name, s) in [
            ("uvmctl create --start", &self.create_start),
            ("  in-process boot, paired", &self.in_process_boot),
            ("exec `true` over the API", &self.api_exec_true),
            ("  in-process, alternated", &self.in_process_exec_true),
            (ps.as_str(), &self.ps),
        ] {
            let _ = writeln!(
                t,
                "{name:<40} {:>5} {:>10.1} {:>10.1} {:>10.1}",
                s.n, s.median, s.p90, s.max
            );
        }
        let _ = writeln!(
            t,
            "  create --start / boot, paired median {:.3}; API exec / in-process {:.3}",
            self.create_over_boot.median,
            self.api_exec_over_in_process()
        );
        let _ = writeln!(
            t,
            "  supervisor RSS {:.1} MiB; {:.0} MiB copied in: cp {:.1} MB/s, exec cat {:.1} MB/s; out: cp {:.1} MB/s, exec cat {:.1} MB/s",
            self.supervisor_rss_mib,
            self.copy_mib,
            self.cp_in_mb_s,
            self.cat_in_mb_s,
            self.cp_out_mb_s,
            self.cat_out_mb_s
        );
        t
    }
}
