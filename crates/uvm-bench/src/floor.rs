//! The floor: the same QEMU command line, kernel and initramfs as the controller uses, started
//! with no controller at all. Runtime directory → vhost-device-vsock → its socket listening →
//! our announce listener bound → QEMU → the guest's ready line: that instant is the floor.
//!
//! Children are spawned with `PR_SET_PDEATHSIG` = SIGKILL and held by [`ChildGuard`], which kills
//! and reaps on drop, so nothing outlives an iteration, even on error. The death signal fires
//! when the *spawning thread* exits: spawn only from a thread that lives as long as the run (the
//! thread driving `block_on`, or a runtime worker), never from the blocking pool.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use tokio::io::BufReader;
use tokio::net::UnixListener;
use uvm::seams::VmConfig;
use uvm_agent_proto::agent::HandshakeRequest;
use uvm_agent_proto::announce::read_ready_line;
use uvm_agent_proto::{hybrid_vsock, HOST_ANNOUNCE_PORT, PROTOCOL_VERSION};
use uvm_qemu::{vhost_vsock_command_line, QemuBackend, RuntimePaths};

use super::phases::{BootMarks, Phases};
use super::BenchError;

/// What the floor boots: the controller's inputs, without the controller.
#[derive(Debug, Clone)]
pub struct FloorConfig {
    /// The backend a [`uvm_vm::Vm`] with the same options uses: it gives the binaries, the
    /// runtime root and the exact QEMU arguments ([`QemuBackend::qemu_args`]). Nothing else of
    /// it runs.
    pub backend: QemuBackend,
    /// Guest memory and CPUs.
    pub vm: VmConfig,
    /// Bound on each wait (socket, guest announce).
    pub timeout: Duration,
}

/// One floor boot.
#[derive(Debug, Clone, Copy)]
pub struct FloorSample {
    /// Runtime directory made → ready line read.
    pub total: Duration,
    pub phases: Phases,
}

/// A child process that is SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `program args` in its own process group with SIGKILL as its parent-death signal,
    /// stdout and stderr to `log`.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<ChildGuard, BenchError> {
        let mut cmd =
            uvm_host::tethered_command(program, args, log).map_err(|source| BenchError::Io {
                operation: "create a process log",
                source,
            })?;
        let child = cmd.spawn().map_err(|source| BenchError::Spawn {
            program: program.to_owned(),
            source,
        })?;
        Ok(ChildGuard {
            name,
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// Its PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error if the child has exited (with the end of its log).
    fn check_alive(&mut self) -> Result<(), BenchError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(BenchError::ChildExited {
                    name: self.name,
                    status: status.to_string(),
                    log: uvm_host::log_tail(&self.log),
                })
            }
            Err(source) => Err(BenchError::Io {
                operation: "check a child process",
                source,
            }),
        }
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only if it already exited; the wait reaps it either way.
            let _ = child.kill();
            if let Err(e) = child.wait() {
                tracing::warn!(process = self.name, error = %e, "reaping failed");
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// One floor boot, cleaned up before returning (also on error).
pub async fn floor_once(cfg: &FloorConfig) -> Result<FloorSample, BenchError> {
    let qemu_cfg = cfg.backend.config();
    let begin = Instant::now();
    // Removed when dropped, after the children (declared later, dropped first).
    let dir = tempfile::Builder::new()
        .prefix("uvm-floor-")
        .rand_bytes(6)
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&qemu_cfg.runtime_root)
        .map_err(|source| BenchError::Io {
            operation: "create the floor's runtime directory",
            source,
        })?;
    let paths = RuntimePaths::new(dir.path());
    let mut vsock = ChildGuard::spawn(
        "vhost-device-vsock",
        &qemu_cfg.vhost_vsock,
        &vhost_vsock_command_line(&paths),
        &paths.vhost_log,
    )?;
    wait_listening(&paths.vhost_socket, &mut vsock, cfg.timeout).await?;
    let announce = hybrid_vsock::host_port_path(&paths.vsock_socket, HOST_ANNOUNCE_PORT);
    let listener = UnixListener::bind(&announce).map_err(|source| BenchError::Io {
        operation: "bind the announce listener",
        source,
    })?;
    let args = cfg.backend.qemu_args(&paths, &cfg.vm);
    let mut qemu = ChildGuard::spawn("qemu", &qemu_cfg.qemu, &args, &paths.qemu_log)?;
    let spawned = begin.elapsed();

    let ready = async {
        let (stream, _) = listener.accept().await.map_err(|source| BenchError::Io {
            operation: "accept the guest's announce connection",
            source,
        })?;
        let mut reader = BufReader::new(stream);
        read_ready_line(&mut reader)
            .await
            .map_err(BenchError::ReadyLine)?;
        let at = begin.elapsed();
        Ok::<_, BenchError>((at, reader))
    };
    // The announce stream stays open until the floor is torn down, as the guest link keeps it.
    let (ready_at, _announce_stream) = with_child_watch(ready, &mut qemu, cfg.timeout).await?;

    // Not timed: ask the agent for its own boot marks, to split the floor into phases.
    let (kernel_to_init, init_to_ready) =
        tokio::time::timeout(cfg.timeout, guest_boot_marks(&paths.vsock_socket))
            .await
            .map_err(|_| BenchError::Timeout {
                what: "the floor's handshake with the agent",
                after: cfg.timeout,
            })??;

    qemu.kill_and_reap();
    vsock.kill_and_reap();
    drop(listener);
    dir.close().map_err(|source| BenchError::Io {
        operation: "remove the floor's runtime directory",
        source,
    })?;
    let marks = BootMarks {
        qemu_spawned: spawned,
        ready: ready_at,
        handshaken: ready_at,
        end: ready_at,
        kernel_to_init,
        init_to_ready,
    };
    Ok(FloorSample {
        total: ready_at,
        phases: Phases::from_marks(&marks),
    })
}

/// The agent's `kernel_to_init` and `init_to_ready` from a Handshake over `<uds>` port 1024.
async fn guest_boot_marks(uds: &Path) -> Result<(Duration, Duration), BenchError> {
    let client = hybrid_vsock::connect_agent(uds)
        .await
        .map_err(|e| BenchError::Guest {
            message: format!("connecting to the agent: {}", uvm_util::error_chain(&e)),
        })?;
    let request = HandshakeRequest {
        protocol_version: PROTOCOL_VERSION,
        ..HandshakeRequest::default()
    };
    let response = client
        .handshake(
            uvm_agent_proto::ttrpc::context::Context::default(),
            &request,
        )
        .await
        .map_err(|e| BenchError::Guest {
            message: format!("handshake: {e}"),
        })?;
    let boot = response.boot.as_ref();
    Ok((
        Duration::from_nanos(boot.map_or(0, |b| b.kernel_to_init_ns)),
        Duration::from_nanos(boot.map_or(0, |b| b.init_to_ready_ns)),
    ))
}

/// Waits until a unix socket at `path` is listening, polling `/proc/net/unix` every
/// millisecond (the floor gets the tightest loop; connecting would take vhost-device-vsock's one
/// frontend slot).
async fn wait_listening(
    path: &Path,
    child: &mut ChildGuard,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let listening = uvm_host::unix_socket_listening(path).map_err(|source| BenchError::Io {
            operation: "read /proc/net/unix",
            source,
        })?;
        if listening {
            return Ok(());
        }
        child.check_alive()?;
        if Instant::now() >= deadline {
            return Err(BenchError::Timeout {
                what: "vhost-device-vsock's socket",
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `fut` under `timeout`, failing early if `child` exits meanwhile (checked every 50 ms).
async fn with_child_watch<T>(
    fut: impl std::future::Future<Output = Result<T, BenchError>>,
    child: &mut ChildGuard,
    timeout: Duration,
) -> Result<T, BenchError> {
    let name = child.name;
    let watch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            child.check_alive()?;
        }
    };
    tokio::select! {
        r = fut => r,
        r = watch => r,
        () = tokio::time::sleep(timeout) => Err(BenchError::Timeout { what: name, after: timeout }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guarded_child_is_killed_and_reaped_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sleep.log");
        let guard = ChildGuard::spawn("sleep", Path::new("/bin/sleep"), &["30".to_owned()], &log)
            .expect("spawn sleep");
        let pid = guard.pid().expect("pid");
        drop(guard);
        // Reaped: the PID no longer names our child (it is gone or, rarely, reused).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(!stat.contains("(sleep)"), "{stat}");
    }
}
