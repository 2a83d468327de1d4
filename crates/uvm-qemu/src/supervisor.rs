//! The VM's processes: one supervisor thread per VM spawns vhost-device-vsock and QEMU, waits
//! until each is ready, then reaps them; [`Shared`] is what the async side sees of them.
//!
//! Why a dedicated thread: `PR_SET_PDEATHSIG` fires when the *thread* that spawned a child exits,
//! not the process. Tokio's blocking-pool threads exit when idle, so a child spawned from one
//! could be killed at a random moment. This thread lives exactly as long as the children (it
//! ends after reaping both), so the death signal fires only when the controller process dies —
//! or if the thread itself dies, which is the behaviour we want then too.
//!
//! Signals go through pidfds, and the supervisor marks a child reaped under the same lock that
//! senders and `/proc` readers take, so nothing ever signals or reads a recycled PID.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::inotify;
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::sync::{oneshot, watch};
use uvm::VmExit;
use uvm_host::{log_tail, tethered_command, unix_socket_listening};

use crate::cmdline::RuntimePaths;
use crate::error::QemuError;

/// How long a child may take to become ready (socket listening) before start fails.
pub(crate) const READY_DEADLINE: Duration = Duration::from_secs(10);

/// Readiness is driven by inotify on the runtime directory and by the children's pidfds; a
/// bounded re-check (1 ms doubling to 20 ms) runs anyway, because a socket file appears at
/// `bind()` and is only connectable after `listen()`, and that gap sends no event. It bounds
/// the wait; it is not the mechanism.
const RECHECK_FIRST: Duration = Duration::from_millis(1);
const RECHECK_MAX: Duration = Duration::from_millis(20);

/// When the VM's processes reached each step of the start (`None`: not reached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootMarks {
    /// vhost-device-vsock was spawned.
    pub vsock_spawned: Option<Instant>,
    /// vhost-device-vsock listens on its vhost-user socket.
    pub vsock_ready: Option<Instant>,
    /// QEMU was spawned.
    pub qemu_spawned: Option<Instant>,
    /// QMP connected and out of negotiation mode.
    pub qmp_ready: Option<Instant>,
}

/// One of the VM's two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Vsock,
    Qemu,
}

impl Which {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Which::Vsock => "vhost-device-vsock",
            Which::Qemu => "qemu",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Proc {
    pub pid: u32,
    pidfd: Arc<OwnedFd>,
    pub reaped: bool,
}

/// Where QEMU is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QemuState {
    NotSpawned,
    Running,
    Exited,
}

#[derive(Debug, Default)]
pub(crate) struct Procs {
    /// `terminate`/`release`/drop happened: spawn nothing more.
    pub stopping: bool,
    /// `start` was called (a supervisor thread exists or existed).
    pub started: bool,
    pub vsock: Option<Proc>,
    pub qemu: Option<Proc>,
    pub marks: BootMarks,
    qemu_status: Option<ExitStatus>,
    shutdown_reason: Option<String>,
    qmp_readers: usize,
}

impl Procs {
    pub(crate) fn get(&self, which: Which) -> Option<&Proc> {
        match which {
            Which::Vsock => self.vsock.as_ref(),
            Which::Qemu => self.qemu.as_ref(),
        }
    }

    fn get_mut(&mut self, which: Which) -> Option<&mut Proc> {
        match which {
            Which::Vsock => self.vsock.as_mut(),
            Which::Qemu => self.qemu.as_mut(),
        }
    }

    pub(crate) fn qemu_state(&self) -> QemuState {
        match &self.qemu {
            None => QemuState::NotSpawned,
            Some(p) if p.reaped => QemuState::Exited,
            Some(_) => QemuState::Running,
        }
    }
}

/// What the VM object and its supervisor thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub paths: RuntimePaths,
    procs: Mutex<Procs>,
    /// How QEMU ended, once it has and the QMP readers have seen its last words.
    exit: watch::Sender<Option<VmExit>>,
    /// The supervisor has reaped every child (or never ran).
    done: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(paths: RuntimePaths) -> Shared {
        Shared {
            paths,
            procs: Mutex::new(Procs::default()),
            exit: watch::Sender::new(None),
            done: watch::Sender::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Procs> {
        // Every update of `Procs` is a single assignment: it stays consistent across a panic.
        uvm_util::lock(&self.procs)
    }

    pub(crate) fn subscribe_exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.subscribe()
    }

    pub(crate) fn subscribe_done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Send `signal` to `which` unless it was never spawned or is already reaped.
    pub(crate) fn signal(&self, which: Which, signal: Signal) {
        let procs = self.lock();
        if let Some(p) = procs.get(which).filter(|p| !p.reaped) {
            match pidfd_send_signal(p.pidfd.as_fd(), signal) {
                // ESRCH: it exited and the supervisor has not reaped it yet.
                Ok(()) | Err(rustix::io::Errno::SRCH) => {}
                Err(e) => {
                    tracing::warn!(process = which.name(), pid = p.pid, error = %e, "signalling failed")
                }
            }
        }
    }

    /// Spawn nothing more, and SIGKILL whatever runs.
    pub(crate) fn stop_and_kill(&self) {
        self.lock().stopping = true;
        self.signal(Which::Qemu, Signal::KILL);
        self.signal(Which::Vsock, Signal::KILL);
    }

    /// QEMU said why it is shutting down.
    pub(crate) fn record_shutdown(&self, reason: String) {
        self.lock().shutdown_reason = Some(reason);
    }

    /// A QMP reader is running: the exit is published only after it has drained QEMU's last
    /// events (it sees end-of-stream right after QEMU exits). Dropping the guard ends that.
    pub(crate) fn qmp_reader(self: &Arc<Self>) -> ReaderGuard {
        self.lock().qmp_readers += 1;
        ReaderGuard(self.clone())
    }

    fn publish_if_complete(&self, procs: &Procs) {
        if procs.qmp_readers > 0 {
            return;
        }
        if let Some(status) = procs.qemu_status {
            self.publish(VmExit {
                code: status.code(),
                signal: status.signal(),
                reason: procs.shutdown_reason.clone(),
            });
        }
    }

    /// Publish the exit once; later calls keep the first.
    pub(crate) fn publish(&self, exit: VmExit) {
        self.exit.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            tracing::info!(%exit, "VM process ended");
            *slot = Some(exit);
            true
        });
    }

    /// No supervisor will ever run (the VM is released before `start`).
    pub(crate) fn mark_done_without_start(&self) {
        self.done.send_replace(true);
    }
}

/// Held by a QMP reader; see [`Shared::qmp_reader`].
#[derive(Debug)]
pub(crate) struct ReaderGuard(Arc<Shared>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut procs = self.0.lock();
        procs.qmp_readers = procs.qmp_readers.saturating_sub(1);
        self.0.publish_if_complete(&procs);
    }
}

/// The two programs to run.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub vsock_program: PathBuf,
    pub vsock_args: Vec<String>,
    pub qemu_program: PathBuf,
    pub qemu_args: Vec<String>,
}

/// What `start` gets back: QEMU's QMP socket, connected (not yet negotiated).
pub(crate) type Started = Result<UnixStream, QemuError>;

/// Start the supervisor thread. The answer comes on the returned channel; the thread keeps
/// running (reaping) after it.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    launch: Launch,
    vm_id: &str,
) -> Result<(std::thread::JoinHandle<()>, oneshot::Receiver<Started>), QemuError> {
    let (tx, rx) = oneshot::channel();
    let span = tracing::info_span!("vm supervisor", vm = %vm_id);
    let handle = std::thread::Builder::new()
        // Linux keeps 15 bytes of a thread's name.
        .name(format!("uvm-sup-{}", uvm_util::short_id(vm_id, 6)))
        .spawn(move || {
            let _span = span.entered();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&shared, &launch, tx);
            }));
            if ran.is_err() {
                // A bug: do not leave `release` waiting. The children are killed; whatever was
                // not reaped stays a zombie until the controller exits.
                tracing::error!("the supervisor thread panicked; killing the VM's processes");
                shared.stop_and_kill();
                shared.publish(VmExit {
                    code: None,
                    signal: None,
                    reason: Some("supervisor-failed".to_owned()),
                });
                shared.done.send_replace(true);
            }
        })
        .map_err(|source| QemuError::Io {
            operation: "spawn the supervisor thread",
            source,
        })?;
    Ok((handle, rx))
}

#[derive(Default)]
struct Children {
    vsock: Option<Child>,
    qemu: Option<Child>,
}

impl Children {
    fn get_mut(&mut self, which: Which) -> Option<&mut Child> {
        match which {
            Which::Vsock => self.vsock.as_mut(),
            Which::Qemu => self.qemu.as_mut(),
        }
    }
}

fn run(shared: &Arc<Shared>, launch: &Launch, reply: oneshot::Sender<Started>) {
    let mut children = Children::default();
    let started = start_children(shared, launch, &mut children);
    if let Err(e) = &started {
        tracing::warn!(error = %uvm_util::error_chain(e), "start failed; killing what was spawned");
        shared.stop_and_kill();
    }
    // Nobody listening any more (start was cancelled) is fine: terminate/release take over.
    let _ = reply.send(started);
    reap_all(shared, &mut children);
    if shared.lock().qemu.is_none() {
        shared.publish(VmExit {
            code: None,
            signal: None,
            reason: Some("not-started".to_owned()),
        });
    }
    shared.done.send_replace(true);
    tracing::debug!("supervisor done: every child reaped");
}

fn start_children(
    shared: &Shared,
    launch: &Launch,
    children: &mut Children,
) -> Result<UnixStream, QemuError> {
    let paths = &shared.paths;
    let io = |operation| move |source| QemuError::Io { operation, source };
    let watcher = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .map_err(|e| io("watch the runtime directory")(e.into()))?;
    inotify::add_watch(
        &watcher,
        &paths.dir,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
    )
    .map_err(|e| io("watch the runtime directory")(e.into()))?;

    children.vsock = Some(spawn_child(
        shared,
        Which::Vsock,
        &launch.vsock_program,
        &launch.vsock_args,
        &paths.vhost_log,
    )?);
    let vhost_socket = paths.vhost_socket.clone();
    wait_ready(shared, &watcher, children, Which::Vsock, || {
        Ok(unix_socket_listening(&vhost_socket)?.then_some(()))
    })?;
    shared.lock().marks.vsock_ready = Some(Instant::now());

    children.qemu = Some(spawn_child(
        shared,
        Which::Qemu,
        &launch.qemu_program,
        &launch.qemu_args,
        &paths.qemu_log,
    )?);
    let qmp_socket = paths.qmp_socket.clone();
    // Connecting to QMP is harmless (it is the real connection), so it is its own probe.
    wait_ready(
        shared,
        &watcher,
        children,
        Which::Qemu,
        || match UnixStream::connect(&qmp_socket) {
            Ok(s) => Ok(Some(s)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        },
    )
}

/// Spawn `which` into its own process group, with SIGKILL as its parent-death signal, and
/// register it (PID + pidfd) — unless the VM is stopping.
fn spawn_child(
    shared: &Shared,
    which: Which,
    program: &Path,
    args: &[String],
    log_path: &Path,
) -> Result<Child, QemuError> {
    let mut cmd = tethered_command(program, args, log_path).map_err(|source| QemuError::Io {
        operation: "create a process log",
        source,
    })?;

    let mut procs = shared.lock();
    if procs.stopping {
        return Err(QemuError::Stopped);
    }
    let mut child = cmd.spawn().map_err(|source| QemuError::Spawn {
        program: program.to_path_buf(),
        source,
    })?;
    let pid = child.id();
    // The child is ours and not reaped: its PID cannot have been reused yet.
    let pidfd = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
        .ok_or_else(|| std::io::Error::other("child PID out of range"))
        .and_then(|p| pidfd_open(p, PidfdFlags::empty()).map_err(Into::into));
    let pidfd = match pidfd {
        Ok(fd) => fd,
        Err(source) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(QemuError::Io {
                operation: "open a pidfd",
                source,
            });
        }
    };
    let now = Some(Instant::now());
    let proc = Some(Proc {
        pid,
        pidfd: Arc::new(pidfd),
        reaped: false,
    });
    match which {
        Which::Vsock => {
            procs.vsock = proc;
            procs.marks.vsock_spawned = now;
        }
        Which::Qemu => {
            procs.qemu = proc;
            procs.marks.qemu_spawned = now;
        }
    }
    tracing::debug!(process = which.name(), pid, "spawned");
    Ok(child)
}

/// Wait until `check` yields, `which` (or any spawned child) exits, the VM stops, or the deadline.
fn wait_ready<T>(
    shared: &Shared,
    watcher: &OwnedFd,
    children: &mut Children,
    which: Which,
    mut check: impl FnMut() -> std::io::Result<Option<T>>,
) -> Result<T, QemuError> {
    let deadline = Instant::now() + READY_DEADLINE;
    let mut recheck = RECHECK_FIRST;
    loop {
        if let Some(ready) = check().map_err(|source| QemuError::Io {
            operation: "check readiness",
            source,
        })? {
            return Ok(ready);
        }
        let pidfds = live_pidfds(shared);
        let wake = deadline.min(Instant::now() + recheck);
        recheck = (recheck * 2).min(RECHECK_MAX);
        if let Some(exited) = wait_any(&pidfds, Some(watcher), Some(wake))? {
            let status = reap(shared, children, exited);
            if shared.lock().stopping {
                return Err(QemuError::Stopped);
            }
            let log = match exited {
                Which::Vsock => &shared.paths.vhost_log,
                Which::Qemu => &shared.paths.qemu_log,
            };
            return Err(QemuError::ExitedEarly {
                process: exited.name(),
                status: status.unwrap_or_else(|| ExitStatus::from_raw(0)),
                output: log_tail(log),
            });
        }
        if shared.lock().stopping {
            return Err(QemuError::Stopped);
        }
        if Instant::now() >= deadline {
            return Err(QemuError::NotReady {
                process: which.name(),
                after: READY_DEADLINE,
            });
        }
        drain(watcher);
    }
}

fn live_pidfds(shared: &Shared) -> Vec<(Which, Arc<OwnedFd>)> {
    let procs = shared.lock();
    [Which::Qemu, Which::Vsock]
        .into_iter()
        .filter_map(|w| {
            procs
                .get(w)
                .filter(|p| !p.reaped)
                .map(|p| (w, p.pidfd.clone()))
        })
        .collect()
}

/// Block until one of `pidfds` signals an exit (returned), `watcher` has events, or `until`
/// passes (`None`). Without `until` and watcher, waits for an exit.
fn wait_any(
    pidfds: &[(Which, Arc<OwnedFd>)],
    watcher: Option<&OwnedFd>,
    until: Option<Instant>,
) -> Result<Option<Which>, QemuError> {
    let mut fds: Vec<PollFd<'_>> = pidfds
        .iter()
        .map(|(_, fd)| PollFd::new(fd.as_ref(), PollFlags::IN))
        .collect();
    if let Some(w) = watcher {
        fds.push(PollFd::new(w, PollFlags::IN));
    }
    let timeout = until.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        // `left` is at most RECHECK_MAX: it always fits.
        rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        })
    });
    match poll(&mut fds, timeout.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => {
            return Err(QemuError::Io {
                operation: "wait for the VM's processes",
                source: e.into(),
            })
        }
    }
    Ok(pidfds
        .iter()
        .zip(&fds)
        .find(|(_, fd)| !fd.revents().is_empty())
        .map(|((which, _), _)| *which))
}

fn drain(watcher: &OwnedFd) {
    let mut buf = [0u8; 1024];
    while matches!(rustix::io::read(watcher, &mut buf), Ok(n) if n > 0) {}
}

/// Reap `which`, which has exited; mark it reaped under the lock first, so that nothing signals
/// or reads the PID once it can be reused. QEMU's end also ends vhost-device-vsock.
fn reap(shared: &Shared, children: &mut Children, which: Which) -> Option<ExitStatus> {
    let status = {
        let mut procs = shared.lock();
        let child = children.get_mut(which)?;
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return None, // spurious wake-up
            Err(e) => {
                tracing::error!(process = which.name(), error = %e, "reaping failed");
                return None;
            }
        };
        if let Some(p) = procs.get_mut(which) {
            p.reaped = true;
        }
        if which == Which::Qemu {
            procs.qemu_status = Some(status);
            shared.publish_if_complete(&procs);
        }
        status
    };
    tracing::debug!(process = which.name(), %status, "reaped");
    if which == Which::Qemu {
        // Without QEMU the vsock device serves nobody.
        shared.signal(Which::Vsock, Signal::KILL);
    }
    Some(status)
}

/// Reap every child as it exits; returns when none is left.
fn reap_all(shared: &Shared, children: &mut Children) {
    loop {
        let pidfds = live_pidfds(shared);
        if pidfds.is_empty() {
            return;
        }
        match wait_any(&pidfds, None, None) {
            Ok(Some(which)) => {
                reap(shared, children, which);
            }
            Ok(None) => {}
            Err(e) => {
                // poll on our own pidfds cannot fail for long; do not spin if it does.
                tracing::error!(error = %uvm_util::error_chain(&e), "waiting for children failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
