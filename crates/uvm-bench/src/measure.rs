//! The controller-side measurements, each through [`Vm`]: start (create_vm → Running) and
//! terminate, exec round trips and idle memory on one running VM, and density (K VMs started at
//! once). Every VM is terminated before a measurement returns, on error too, and checked for
//! leftovers: its state is Terminated, no process mentions its runtime directory, and the
//! directory is gone.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use uvm::seams::ExecRequest;
use uvm::State;
use uvm_image::Image;

use super::phases::{BootMarks, Phases};
use super::procs;
use super::BenchError;
use uvm_vm::{Vm, VmOptions};

/// Bytes the bulk exec writes to stdout.
pub const BULK_BYTES: u64 = 1 << 20;

/// One start and its teardown.
#[derive(Debug, Clone, Copy)]
pub struct StartSample {
    /// create_vm called → Running.
    pub total: Duration,
    pub phases: Phases,
    /// terminate_vm called → returned (Terminated, every child reaped).
    pub terminate: Duration,
}

/// Boots a VM through [`Vm::boot`], then terminates it.
pub async fn start_once(image: &Image, options: &VmOptions) -> Result<StartSample, BenchError> {
    let vm = Vm::new(image, options.clone());
    let begin = Instant::now();
    let booted = vm.boot().await;
    let end = begin.elapsed();
    let phases = booted
        .map_err(|source| BenchError::Controller {
            what: "start a VM",
            source,
        })
        .and_then(|_| boot_phases(&vm, begin, end));
    let terminate = teardown(&vm).await?;
    Ok(StartSample {
        total: end,
        phases: phases?,
        terminate,
    })
}

/// The phases of a boot that began at `begin` and reached Running `end` later.
fn boot_phases(vm: &Vm, begin: Instant, end: Duration) -> Result<Phases, BenchError> {
    let host = vm.qemu_vm().ok_or(BenchError::MissingMark {
        mark: "the QEMU VM",
    })?;
    let link = vm.guest.marks();
    let info = vm.controller.guest_info().unwrap_or_default();
    let at = |mark: Option<Instant>, name: &'static str| {
        mark.map(|m| m.saturating_duration_since(begin))
            .ok_or(BenchError::MissingMark { mark: name })
    };
    Ok(Phases::from_marks(&BootMarks {
        qemu_spawned: at(host.boot_marks().qemu_spawned, "QEMU spawned")?,
        ready: at(link.announced, "guest announced")?,
        handshaken: at(link.handshaken, "handshake done")?,
        end,
        kernel_to_init: info.kernel_to_init,
        init_to_ready: info.init_to_ready,
    }))
}

/// terminate_vm, timed, then the leak check.
pub(crate) async fn teardown(vm: &Vm) -> Result<Duration, BenchError> {
    let dir = vm.qemu_vm().map(|q| q.runtime_dir().to_owned());
    let t = Instant::now();
    let result = vm.controller.terminate_vm().await;
    let took = t.elapsed();
    result.map_err(|source| BenchError::Controller {
        what: "terminate a VM",
        source,
    })?;
    check_clean(vm, dir)?;
    Ok(took)
}

/// Terminated, no process mentions the runtime directory, the directory is gone.
fn check_clean(vm: &Vm, dir: Option<PathBuf>) -> Result<(), BenchError> {
    let state = vm.controller.state();
    if state != State::Terminated {
        return Err(BenchError::NotTerminated { state });
    }
    let Some(dir) = dir else {
        return Ok(());
    };
    let pids = uvm_host::processes_mentioning(&dir);
    if !pids.is_empty() || dir.exists() {
        return Err(BenchError::Leaked { dir, pids });
    }
    Ok(())
}

/// What the exec session measured.
#[derive(Debug, Clone, Default)]
pub struct ExecResults {
    /// `true`, round trips.
    pub exec_true: Vec<Duration>,
    /// `head -c 1048576 /dev/zero`, round trips.
    pub exec_bulk: Vec<Duration>,
    /// QEMU's RSS after boot, idle, in bytes.
    pub qemu_rss: u64,
    /// vhost-device-vsock's RSS after boot, idle, in bytes.
    pub vsock_rss: u64,
    /// The exec of `true` taken apart, RPC by RPC.
    pub breakdown: super::rpc::ExecBreakdown,
    /// The guest's own cost of one short process: a busybox `sh` loop running `/bin/true`
    /// [`LOOP_PROCESSES`] times, minus the same loop run zero times, per process.
    pub guest_process: Vec<Duration>,
}

/// Processes in the guest-side loop.
pub const LOOP_PROCESSES: u32 = 100;

/// On one VM: idle memory after `settle`; then `n_true` rounds of `true` through the controller,
/// RPC by RPC and pipelined over our own connection (rotating which goes first), with a bare
/// round trip each; `n_bulk` execs of 1 MiB output; the guest-only process cost; then teardown.
/// Each kind gets one untimed warm-up.
pub async fn exec_session(
    image: &Image,
    options: &VmOptions,
    settle: Duration,
    n_true: usize,
    n_bulk: usize,
) -> Result<ExecResults, BenchError> {
    let vm = Vm::new(image, options.clone());
    let measured = async {
        vm.boot().await.map_err(|source| BenchError::Controller {
            what: "start a VM",
            source,
        })?;
        tokio::time::sleep(settle).await;
        let host = vm.qemu_vm().ok_or(BenchError::MissingMark {
            mark: "the QEMU VM",
        })?;
        let rss = |pid: Option<u32>, what: &'static str| {
            pid.and_then(procs::rss_bytes)
                .ok_or(BenchError::MissingMark { mark: what })
        };
        let mut out = ExecResults {
            qemu_rss: rss(host.qemu_pid(), "QEMU's RSS")?,
            vsock_rss: rss(host.vsock_pid(), "vhost-device-vsock's RSS")?,
            ..ExecResults::default()
        };
        // Through the controller and over our own connection, interleaved so that drift in
        // the guest hits all alike; one untimed warm-up of each first.
        let probe = super::rpc::Probe::connect(&host.paths().vsock_socket).await?;
        exec_true(&vm).await?;
        probe.sequential().await?;
        probe.pipelined().await?;
        probe.roundtrip().await?;
        for i in 0..n_true {
            // Which kind goes first rotates, so no kind always follows the same one.
            for kind in (0..3).map(|k| (k + i) % 3) {
                let b = &mut out.breakdown;
                match kind {
                    0 => {
                        let t = Instant::now();
                        exec_true(&vm).await?;
                        out.exec_true.push(t.elapsed());
                    }
                    1 => b.push_sequential(probe.sequential().await?),
                    _ => b.pipelined.push(probe.pipelined().await?),
                }
            }
            out.breakdown.rpc_roundtrip.push(probe.roundtrip().await?);
        }
        exec_bulk(&vm).await?;
        for _ in 0..n_bulk {
            let t = Instant::now();
            exec_bulk(&vm).await?;
            out.exec_bulk.push(t.elapsed());
        }
        for _ in 0..3 {
            let empty = timed_loop(&vm, 0).await?;
            let full = timed_loop(&vm, LOOP_PROCESSES).await?;
            out.guest_process
                .push(full.saturating_sub(empty) / LOOP_PROCESSES);
        }
        Ok::<_, BenchError>(out)
    };
    let result = measured.await;
    teardown(&vm).await?;
    result
}

pub(crate) async fn exec_true(vm: &Vm) -> Result<(), BenchError> {
    let code = exec(vm, ExecRequest::new(["true"])).await?;
    if code != 0 {
        return Err(BenchError::WrongOutput {
            command: "true",
            exit_code: code,
            bytes: 0,
        });
    }
    Ok(())
}

/// Host-timed exec of a guest shell loop that runs `/bin/true` `n` times.
async fn timed_loop(vm: &Vm, n: u32) -> Result<Duration, BenchError> {
    let script = format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done");
    let t = Instant::now();
    let code = exec(vm, ExecRequest::new(["sh", "-c", script.as_str()])).await?;
    if code != 0 {
        return Err(BenchError::WrongOutput {
            command: "sh -c <loop of /bin/true>",
            exit_code: code,
            bytes: 0,
        });
    }
    Ok(t.elapsed())
}

async fn exec_bulk(vm: &Vm) -> Result<(), BenchError> {
    let counted = Arc::new(AtomicU64::new(0));
    let mut request = ExecRequest::new(["head", "-c", "1048576", "/dev/zero"]);
    request.stdout = Some(Box::new(CountingSink(counted.clone())));
    let code = exec(vm, request).await?;
    let bytes = counted.load(Ordering::Relaxed);
    if code != 0 || bytes != BULK_BYTES {
        return Err(BenchError::WrongOutput {
            command: "head -c 1048576 /dev/zero",
            exit_code: code,
            bytes,
        });
    }
    Ok(())
}

async fn exec(vm: &Vm, request: ExecRequest) -> Result<i32, BenchError> {
    vm.controller
        .exec_into_host(request)
        .await
        .map_err(|source| BenchError::Controller {
            what: "exec in the VM",
            source,
        })
}

/// An output sink that only counts bytes.
struct CountingSink(Arc<AtomicU64>);

impl tokio::io::AsyncWrite for CountingSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        self.0.fetch_add(n, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// K VMs started at once.
#[derive(Debug, Clone, Copy)]
pub struct DensitySample {
    pub k: usize,
    /// First create_vm → the last VM Running.
    pub all_running: Duration,
    /// This process's RSS growth from before the boots to all Running, divided by K (bytes).
    pub controller_rss_per_vm: Option<f64>,
    /// With all K Running: the PSS of every VM's QEMU and vhost-device-vsock, summed and
    /// divided by K (bytes) — what one more VM costs the host once pages are shared.
    pub pss_per_vm: Option<f64>,
}

/// Starts `k` VMs concurrently, waits for all to be Running, tears all down.
pub async fn density_once(
    image: &Image,
    options: &VmOptions,
    k: usize,
) -> Result<DensitySample, BenchError> {
    let vms: Vec<Arc<Vm>> = (0..k)
        .map(|_| Arc::new(Vm::new(image, options.clone())))
        .collect();
    let rss_before = procs::self_rss_bytes();
    let begin = Instant::now();
    let mut boots = JoinSet::new();
    for vm in &vms {
        let vm = vm.clone();
        boots.spawn(async move { vm.boot().await.map(|_| ()) });
    }
    let mut first_error = None;
    while let Some(joined) = boots.join_next().await {
        let failed = match joined {
            Ok(Ok(())) => None,
            Ok(Err(source)) => Some(BenchError::Controller {
                what: "start a VM (density)",
                source,
            }),
            Err(e) => Some(BenchError::Task {
                message: e.to_string(),
            }),
        };
        if first_error.is_none() {
            first_error = failed;
        }
    }
    let all_running = begin.elapsed();
    let rss_after = procs::self_rss_bytes();
    let pss_per_vm = if first_error.is_none() && k > 0 {
        pss_of_all(&vms).map(|total| total as f64 / k as f64)
    } else {
        None
    };

    let mut teardowns = JoinSet::new();
    for vm in &vms {
        let vm = vm.clone();
        teardowns.spawn(async move { teardown(&vm).await.map(|_| ()) });
    }
    while let Some(joined) = teardowns.join_next().await {
        let failed = match joined {
            Ok(r) => r.err(),
            Err(e) => Some(BenchError::Task {
                message: e.to_string(),
            }),
        };
        if first_error.is_none() {
            first_error = failed;
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let per_vm = match (rss_before, rss_after) {
        (Some(b), Some(a)) if k > 0 => Some(a.saturating_sub(b) as f64 / k as f64),
        _ => None,
    };
    Ok(DensitySample {
        k,
        all_running,
        controller_rss_per_vm: per_vm,
        pss_per_vm,
    })
}

/// The summed PSS of the QEMU and vhost-device-vsock processes of `vms`; `None` if any is
/// missing.
fn pss_of_all(vms: &[Arc<Vm>]) -> Option<u64> {
    let mut total = 0u64;
    for vm in vms {
        let host = vm.qemu_vm()?;
        for pid in [host.qemu_pid()?, host.vsock_pid()?] {
            total += procs::pss_bytes(pid)?;
        }
    }
    Some(total)
}
