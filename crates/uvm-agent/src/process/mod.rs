//! The processes the agent runs for the host: the table of tracked processes, their start,
//! and the one reaper.
//!
//! Reaping: as PID 1 the agent is the parent of every orphan, so the reaper waits for *any*
//! child (`waitpid(-1)`) and drops the statuses of untracked ones. Elsewhere (tests, a
//! non-init agent) it waits only for the pids it tracks, so it never steals another part of the
//! program's children. Starting a process and reaping both hold the table lock: a child that
//! exits at once cannot be reaped before it is registered, and the reaper cannot collect a child
//! whose failed `exec` `std::process::Command` is itself waiting for.

mod output;
mod posix_spawn;
mod spawn;
mod stdin;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::{watch, Notify};

pub use output::OutputBuf;
pub use spawn::{program_path, ExecSpec, DEFAULT_PATH};
pub use stdin::Stdin;

use crate::error::ApiError;

/// How long a waited-for process stays readable for output still in its pipes.
pub const OUTPUT_LINGER: std::time::Duration = std::time::Duration::from_secs(2);
use crate::{error, warn};

/// How a process ended, as a shell reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, or 128 + the signal number when a signal killed it.
    pub code: i32,
    /// The signal that killed it, 0 if it exited.
    pub signal: i32,
}

impl Exit {
    /// The exit of a terminated child; `None` for stop/continue notifications.
    pub fn from_wait_status(status: WaitStatus) -> Option<Exit> {
        match status {
            WaitStatus::Exited(_, code) => Some(Exit { code, signal: 0 }),
            WaitStatus::Signaled(_, signal, _) => Some(Exit {
                code: 128 + signal as i32,
                signal: signal as i32,
            }),
            _ => None,
        }
    }
}

/// Which children the reaper collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapMode {
    /// Every child, including orphans re-parented to us (PID 1).
    AllChildren,
    /// Only the pids in the table (anything that is not PID 1).
    TrackedOnly,
}

/// Resource bounds of the table.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Processes tracked at once (started and not yet waited for).
    pub max_processes: usize,
    /// Bytes buffered per output stream before the pipe is left undrained.
    pub output_buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_processes: 256,
            output_buffer: 1 << 20,
        }
    }
}

/// One tracked process.
#[derive(Debug)]
pub struct Proc {
    /// The id the host uses.
    pub exec_id: String,
    /// Its pid in the guest.
    pub pid: u32,
    /// Its argv.
    pub args: Vec<String>,
    /// Whether it runs on a pty.
    pub terminal: bool,
    /// Its stdin, when requested.
    pub stdin: Option<Stdin>,
    /// Its stdout (all output on a terminal).
    pub stdout: Arc<OutputBuf>,
    /// Its stderr (at EOF from the start on a terminal).
    pub stderr: Arc<OutputBuf>,
    /// The pty master of a terminal process, kept to resize it.
    pty: Option<OwnedFd>,
    exit: watch::Sender<Option<Exit>>,
    /// Dropped with the process, or fired by [`Processes::wait`]: ends its output pumps.
    stop_pumps: watch::Sender<()>,
}

impl Proc {
    /// Its exit, once reaped.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }
}

/// A line of [`Processes::snapshot`].
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// The id.
    pub exec_id: String,
    /// The pid.
    pub pid: u32,
    /// argv.
    pub args: Vec<String>,
    /// `running`, `exited(code)` or `killed(signal)`, plus buffered output sizes.
    pub state: String,
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<String, Arc<Proc>>,
    /// Tracked processes not reaped yet.
    by_pid: HashMap<i32, Arc<Proc>>,
    next_id: u64,
}

/// The process table and its reaper.
#[derive(Debug)]
pub struct Processes {
    table: Mutex<Table>,
    mode: ReapMode,
    limits: Limits,
    kick: Notify,
}

impl Processes {
    /// An empty table.
    pub fn new(mode: ReapMode, limits: Limits) -> Arc<Self> {
        Arc::new(Processes {
            table: Mutex::new(Table::default()),
            mode,
            limits,
            kick: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        uvm_util::lock(&self.table)
    }

    /// Starts and tracks a process; must be called inside the runtime (its output is pumped by
    /// tasks).
    pub fn start(&self, spec: &ExecSpec) -> Result<Arc<Proc>, ApiError> {
        spec.validate()?;
        let mut table = self.lock();
        if table.by_id.len() >= self.limits.max_processes {
            return Err(ApiError::TooManyProcesses {
                limit: self.limits.max_processes,
            });
        }
        let spawned = spawn::spawn(spec)?;
        table.next_id += 1;
        let exec_id = format!("e{}", table.next_id);
        let (stop_tx, stop_rx) = watch::channel(());
        let stdout = Arc::new(OutputBuf::new(self.limits.output_buffer));
        let stderr = Arc::new(match spawned.stderr {
            Some(_) => OutputBuf::new(self.limits.output_buffer),
            None => OutputBuf::finished(),
        });
        let stdin = spawned
            .stdin
            .and_then(|fd| match Stdin::new(fd, spec.terminal) {
                Ok(stdin) => Some(stdin),
                Err(e) => {
                    error!("process {exec_id}: cannot watch its stdin: {e}");
                    None
                }
            });
        tokio::spawn(output::pump(
            spawned.stdout,
            stdout.clone(),
            stop_rx.clone(),
        ));
        if let Some(fd) = spawned.stderr {
            tokio::spawn(output::pump(fd, stderr.clone(), stop_rx));
        }
        let proc = Arc::new(Proc {
            exec_id: exec_id.clone(),
            pid: spawned.pid,
            args: spec.args.clone(),
            terminal: spec.terminal,
            stdin,
            stdout,
            stderr,
            pty: spawned.pty,
            exit: watch::channel(None).0,
            stop_pumps: stop_tx,
        });
        table.by_id.insert(exec_id, proc.clone());
        table.by_pid.insert(pid_i32(spawned.pid), proc.clone());
        drop(table);
        // A SIGCHLD that came before the registration found nothing to deliver to.
        self.kick.notify_one();
        Ok(proc)
    }

    /// The tracked process `exec_id`.
    pub fn get(&self, exec_id: &str) -> Result<Arc<Proc>, ApiError> {
        self.lock()
            .by_id
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ApiError::UnknownExecId {
                exec_id: exec_id.to_owned(),
            })
    }

    /// Waits until `exec_id` exited, then forgets it — once its output was read to the end, or
    /// [`OUTPUT_LINGER`] after the exit, whichever comes first. The linger lets the host read
    /// concurrently with the wait; its bound keeps a background child that holds the pipes open
    /// (`sh -c 'daemon &'`) from keeping the exec alive: its output pumps are stopped then and
    /// pending reads see EOF.
    pub async fn wait(&self, exec_id: &str) -> Result<Exit, ApiError> {
        let proc = self.get(exec_id)?;
        let mut rx = proc.exit.subscribe();
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|exit| *exit)
            .ok_or_else(|| ApiError::UnknownExecId {
                exec_id: exec_id.to_owned(),
            })?;
        let drained =
            async { tokio::join!(proc.stdout.until_drained(), proc.stderr.until_drained()) };
        if tokio::time::timeout(OUTPUT_LINGER, drained).await.is_err() {
            proc.stop_pumps.send_replace(());
        }
        let mut table = self.lock();
        if table
            .by_id
            .get(exec_id)
            .is_some_and(|p| Arc::ptr_eq(p, &proc))
        {
            table.by_id.remove(exec_id);
        }
        Ok(exit)
    }

    /// Resizes the terminal of `exec_id` to (rows, columns).
    pub fn resize(&self, exec_id: &str, size: (u16, u16)) -> Result<(), ApiError> {
        let proc = self.get(exec_id)?;
        let pty = proc.pty.as_ref().ok_or_else(|| ApiError::NotATerminal {
            exec_id: exec_id.to_owned(),
        })?;
        spawn::resize(pty, size).map_err(|source| ApiError::Resize { source })
    }

    /// Sends `signal` to `exec_id`; a no-op once it exited (its pid may be reused by then).
    /// Signal 0 only checks that the id is known.
    pub fn signal(&self, exec_id: &str, signal: i32) -> Result<(), ApiError> {
        let sig =
            match signal {
                0 => None,
                n => Some(Signal::try_from(n).map_err(|_| {
                    ApiError::invalid("signal", format!("{n} is not a signal number"))
                })?),
            };
        // Under the lock the reaper cannot collect the pid between the check and the kill.
        let table = self.lock();
        let proc = table
            .by_id
            .get(exec_id)
            .ok_or_else(|| ApiError::UnknownExecId {
                exec_id: exec_id.to_owned(),
            })?;
        let (Some(sig), None) = (sig, proc.exit()) else {
            return Ok(());
        };
        kill(Pid::from_raw(pid_i32(proc.pid)), sig).map_err(|source| ApiError::Signal {
            exec_id: exec_id.to_owned(),
            signal,
            source,
        })
    }

    /// What is tracked, for `DumpStacks`.
    pub fn snapshot(&self) -> Vec<ProcInfo> {
        let table = self.lock();
        let mut out: Vec<ProcInfo> = table
            .by_id
            .values()
            .map(|p| ProcInfo {
                exec_id: p.exec_id.clone(),
                pid: p.pid,
                args: p.args.clone(),
                state: format!(
                    "{} stdout_buffered={} stderr_buffered={}",
                    match p.exit() {
                        None => "running".to_owned(),
                        Some(Exit { signal: 0, code }) => format!("exited({code})"),
                        Some(Exit { signal, .. }) => format!("killed(signal {signal})"),
                    },
                    p.stdout.buffered(),
                    p.stderr.buffered()
                ),
            })
            .collect();
        out.sort_by_key(|p| p.pid);
        out
    }

    /// Collects exited children (see the module doc) and delivers tracked exits.
    pub fn reap(&self) {
        let mut table = self.lock();
        match self.mode {
            ReapMode::AllChildren => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(status) => deliver(&mut table, status),
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        error!("waitpid(-1) failed: {e}");
                        break;
                    }
                }
            },
            ReapMode::TrackedOnly => {
                let pids: Vec<i32> = table.by_pid.keys().copied().collect();
                for pid in pids {
                    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) => {}
                        Ok(status) => deliver(&mut table, status),
                        Err(e) => {
                            // Someone else collected it: its status is lost.
                            warn!("waitpid({pid}) failed: {e}; reporting exit code 255");
                            if let Some(proc) = table.by_pid.remove(&pid) {
                                proc.exit.send_replace(Some(Exit {
                                    code: 255,
                                    signal: 0,
                                }));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Runs the reaper: [`Processes::reap`] on every `SIGCHLD` and after every start.
    /// Must be called inside the runtime, before the first process starts.
    pub fn spawn_reaper(self: &Arc<Self>) -> std::io::Result<tokio::task::JoinHandle<()>> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = signal(SignalKind::child())?;
        let this = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    () = this.kick.notified() => {}
                }
                this.reap();
            }
        }))
    }
}

fn deliver(table: &mut Table, status: WaitStatus) {
    let Some(pid) = status.pid() else { return };
    let Some(exit) = Exit::from_wait_status(status) else {
        return;
    };
    // Untracked pids are orphans (or our own short-lived helpers): dropped.
    if let Some(proc) = table.by_pid.remove(&pid.as_raw()) {
        proc.exit.send_replace(Some(exit));
    }
}

/// Registers `fd` (already non-blocking) with the runtime's reactor.
pub(crate) fn register_fd(
    fd: std::os::fd::OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor that the `AsyncFd` now owns: it stays open and
    // refers to the same file description until the `AsyncFd` drops it, and `as_raw_fd` always
    // returns that same descriptor.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(std::io::Error::from)
}

fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_like_a_shell() {
        let pid = Pid::from_raw(42);
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Exited(pid, 3)),
            Some(Exit { code: 3, signal: 0 })
        );
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some(Exit {
                code: 137,
                signal: 9
            })
        );
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some(Exit {
                code: 143,
                signal: 15
            })
        );
        assert_eq!(
            Exit::from_wait_status(WaitStatus::Stopped(pid, Signal::SIGSTOP)),
            None
        );
    }

    #[tokio::test]
    async fn a_process_that_exits_at_once_is_still_waited_for() {
        let procs = Processes::new(ReapMode::TrackedOnly, Limits::default());
        let _reaper = procs.spawn_reaper().expect("reaper");
        let spec = ExecSpec {
            args: vec!["true".into()],
            ..ExecSpec::default()
        };
        for _ in 0..20 {
            let proc = procs.start(&spec).expect("start");
            assert_eq!(
                procs.wait(&proc.exec_id).await.expect("wait"),
                Exit { code: 0, signal: 0 }
            );
            assert!(matches!(
                procs.get(&proc.exec_id),
                Err(ApiError::UnknownExecId { .. })
            ));
        }
    }

    #[tokio::test]
    async fn the_table_is_bounded() {
        let procs = Processes::new(
            ReapMode::TrackedOnly,
            Limits {
                max_processes: 1,
                output_buffer: 16,
            },
        );
        let _reaper = procs.spawn_reaper().expect("reaper");
        let spec = ExecSpec {
            args: vec!["sleep".into(), "5".into()],
            ..ExecSpec::default()
        };
        let first = procs.start(&spec).expect("start");
        assert!(matches!(
            procs.start(&spec),
            Err(ApiError::TooManyProcesses { limit: 1 })
        ));
        procs.signal(&first.exec_id, 9).expect("kill");
        assert_eq!(
            procs.wait(&first.exec_id).await.expect("wait"),
            Exit {
                code: 137,
                signal: 9
            }
        );
        assert!(matches!(
            procs.signal(&first.exec_id, 9),
            Err(ApiError::UnknownExecId { .. })
        ));
        assert!(matches!(
            procs.signal("e1", 12345),
            Err(ApiError::InvalidArgument {
                field: "signal",
                ..
            })
        ));
    }
}
