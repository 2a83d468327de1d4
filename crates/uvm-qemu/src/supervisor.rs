//! The VM's processes: one supervisor thread per VM spawns vhost-device-vsock, the helpers
//! given at create (a virtiofsd per cold share) and QEMU, waits until each is ready, then reaps
//! them — and spawns the helpers asked for while the VM runs (a virtiofsd per hot-added share),
//! so that every child of the VM has the same parent thread and the same no-orphan guarantee;
//! [`Shared`] is what the async side sees of them.
//!
//! Why a dedicated thread: `PR_SET_PDEATHSIG` fires when the *thread* that spawned a child exits,
//! not the process. Tokio's blocking-pool threads exit when idle, so a child spawned from one
//! could be killed at a random moment. This thread lives exactly as long as the children (it
//! ends after reaping both), so the death signal fires only when the controller process dies —
//! or if the thread itself dies, which is the behaviour we want then too.
//!
//! Signals go through pidfds, and the supervisor marks a child reaped under the same lock that
//! senders and `/proc` readers take, so nothing ever signals or reads a recycled PID.

use std::collections::BTreeMap;
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
use tokio::sync::{broadcast, oneshot, watch};
use uvm::VmExit;
use uvm_host::{log_tail, tethered_command, unix_socket_listening};

use crate::cmdline::RuntimePaths;
use crate::error::QemuError;
use crate::qmp::QmpEvent;

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

/// One of the VM's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    Vsock,
    Qemu,
    /// A helper QEMU connects to, by the id its owner gave it (a virtiofsd, the only kind today).
    Helper(u32),
}

impl Which {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Which::Vsock => "vhost-device-vsock",
            Which::Qemu => "qemu",
            Which::Helper(_) => "virtiofsd",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Proc {
    pub pid: u32,
    pidfd: Arc<OwnedFd>,
    pub reaped: bool,
    /// Its stdout and stderr.
    log: PathBuf,
    /// Its owner is ending it: its exit is expected, not a failure of the VM.
    pub retired: bool,
}

/// A helper to spawn: the program, and the socket it listens on once ready.
#[derive(Debug, Clone)]
pub(crate) struct HelperLaunch {
    pub id: u32,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub socket: PathBuf,
}

/// A helper asked for while the VM runs, and where its PID (or why not) goes.
type HelperRequest = (HelperLaunch, oneshot::Sender<Result<u32, QemuError>>);

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
    /// Helpers by id; an entry stays until its owner forgets it, reaped or not.
    pub helpers: BTreeMap<u32, Proc>,
    /// Helpers asked for, not yet served by the supervisor.
    requests: Vec<HelperRequest>,
    /// The supervisor has reaped its last child and serves no more requests.
    supervisor_ended: bool,
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
            Which::Helper(id) => self.helpers.get(&id),
        }
    }

    pub(crate) fn get_mut(&mut self, which: Which) -> Option<&mut Proc> {
        match which {
            Which::Vsock => self.vsock.as_mut(),
            Which::Qemu => self.qemu.as_mut(),
            Which::Helper(id) => self.helpers.get_mut(&id),
        }
    }

    /// Every process spawned and not reaped yet.
    fn live(&self) -> impl Iterator<Item = (Which, &Proc)> {
        let fixed = [Which::Qemu, Which::Vsock]
            .into_iter()
            .filter_map(|w| self.get(w).map(|p| (w, p)));
        let helpers = self.helpers.iter().map(|(id, p)| (Which::Helper(*id), p));
        fixed.chain(helpers).filter(|(_, p)| !p.reaped)
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
    /// Bumped after every reap, so the async side can wait for a helper's end.
    reaps: watch::Sender<u64>,
    /// Wakes the supervisor for a helper request (an eventfd).
    wake: OwnedFd,
    /// Every QMP event QEMU sends (DEVICE_DELETED, …), for whoever waits for one.
    pub events: broadcast::Sender<QmpEvent>,
    /// Puts each child into the VM's cgroup before it execs (`None`: the VM has none).
    /// Replaced when the VM moves into a CPU group.
    joiner: Mutex<Option<uvm_cgroup::Joiner>>,
}

/// QMP events kept for a slow subscriber; one that falls further behind re-checks by query.
const EVENT_BACKLOG: usize = 64;

impl Shared {
    pub(crate) fn new(
        paths: RuntimePaths,
        joiner: Option<uvm_cgroup::Joiner>,
    ) -> std::io::Result<Shared> {
        use rustix::event::{eventfd, EventfdFlags};
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Shared {
            paths,
            joiner: Mutex::new(joiner),
            procs: Mutex::new(Procs::default()),
            exit: watch::Sender::new(None),
            done: watch::Sender::new(false),
            reaps: watch::Sender::new(0),
            wake,
            events: broadcast::Sender::new(EVENT_BACKLOG),
        })
    }

    /// Ask the supervisor to spawn `launch` and wait until it listens on its socket. The answer
    /// is its PID; `Stopped` once the VM is stopping or QEMU is not running.
    pub(crate) fn spawn_helper(
        &self,
        launch: HelperLaunch,
    ) -> Result<oneshot::Receiver<Result<u32, QemuError>>, QemuError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut procs = self.lock();
            if procs.stopping || procs.supervisor_ended || procs.qemu_state() != QemuState::Running
            {
                return Err(QemuError::Stopped);
            }
            procs.requests.push((launch, tx));
        }
        rustix::io::write(&self.wake, &1u64.to_ne_bytes()).map_err(|e| QemuError::Io {
            operation: "wake the supervisor",
            source: e.into(),
        })?;
        Ok(rx)
    }

    /// Mark helper `id` as being ended by its owner (its exit is no failure), then signal it.
    pub(crate) fn retire_helper(&self, id: u32, signal: Signal) {
        if let Some(p) = self.lock().helpers.get_mut(&id) {
            p.retired = true;
        }
        self.signal(Which::Helper(id), signal);
    }

    /// Wait up to `limit` for helper `id` to be reaped; whether it was (an unknown id was).
    pub(crate) async fn helper_reaped(&self, id: u32, limit: Duration) -> bool {
        let mut reaps = self.reaps.subscribe();
        let reaped = || self.lock().helpers.get(&id).is_none_or(|p| p.reaped);
        let waited = tokio::time::timeout(limit, reaps.wait_for(|_| reaped())).await;
        waited.is_ok()
    }

    /// Forget helper `id` once it is reaped (its PID may be reused from then on).
    pub(crate) fn forget_helper(&self, id: u32) {
        let mut procs = self.lock();
        if procs.helpers.get(&id).is_some_and(|p| p.reaped) {
            procs.helpers.remove(&id);
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Procs> {
        // Every update of `Procs` is a single assignment: it stays consistent across a panic.
        uvm_util::lock(&self.procs)
    }

    /// Children spawned from now on join the cgroup `joiner` writes into.
    pub(crate) fn set_joiner(&self, joiner: uvm_cgroup::Joiner) {
        *uvm_util::lock(&self.joiner) = Some(joiner);
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
        let helpers: Vec<u32> = {
            let mut procs = self.lock();
            procs.stopping = true;
            procs.helpers.keys().copied().collect()
        };
        self.signal(Which::Qemu, Signal::KILL);
        self.signal(Which::Vsock, Signal::KILL);
        for id in helpers {
            self.signal(Which::Helper(id), Signal::KILL);
        }
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

/// The programs to run: vhost-device-vsock, the helpers QEMU needs from its start, QEMU.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub vsock_program: PathBuf,
    pub vsock_args: Vec<String>,
    pub helpers: Vec<HelperLaunch>,
    pub qemu_program: PathBuf,
    pub qemu_args: Vec<String>,
    /// Fds QEMU inherits at their numbers (taps named on its command line).
    pub qemu_fds: Vec<std::os::fd::RawFd>,
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
    helpers: BTreeMap<u32, Child>,
}

impl Children {
    fn get_mut(&mut self, which: Which) -> Option<&mut Child> {
        match which {
            Which::Vsock => self.vsock.as_mut(),
            Which::Qemu => self.qemu.as_mut(),
            Which::Helper(id) => self.helpers.get_mut(&id),
        }
    }

    fn insert(&mut self, which: Which, child: Child) {
        match which {
            Which::Vsock => self.vsock = Some(child),
            Which::Qemu => self.qemu = Some(child),
            Which::Helper(id) => {
                self.helpers.insert(id, child);
            }
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

    let vsock = spawn_child(
        shared,
        Which::Vsock,
        &launch.vsock_program,
        &launch.vsock_args,
        &paths.vhost_log,
        &[],
    )?;
    children.insert(Which::Vsock, vsock);
    // The helpers start beside vhost-device-vsock; QEMU connects to all of them at its start.
    for helper in &launch.helpers {
        let which = Which::Helper(helper.id);
        let child = spawn_child(
            shared,
            which,
            &helper.program,
            &helper.args,
            &helper.log,
            &[],
        )?;
        children.insert(which, child);
    }
    let vhost_socket = paths.vhost_socket.clone();
    wait_ready(shared, &watcher, children, Which::Vsock, || {
        Ok(unix_socket_listening(&vhost_socket)?.then_some(()))
    })?;
    shared.lock().marks.vsock_ready = Some(Instant::now());
    for helper in &launch.helpers {
        let socket = helper.socket.clone();
        wait_ready(shared, &watcher, children, Which::Helper(helper.id), || {
            Ok(unix_socket_listening(&socket)?.then_some(()))
        })?;
    }

    children.qemu = Some(spawn_child(
        shared,
        Which::Qemu,
        &launch.qemu_program,
        &launch.qemu_args,
        &paths.qemu_log,
        &launch.qemu_fds,
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
    inherit: &[std::os::fd::RawFd],
) -> Result<Child, QemuError> {
    let mut cmd = tethered_command(program, args, log_path).map_err(|source| QemuError::Io {
        operation: "create a process log",
        source,
    })?;
    if !inherit.is_empty() {
        let fds = inherit.to_vec();
        // SAFETY: `inherit_in_child` only calls fcntl(2) (async-signal-safe); the Vec was
        // allocated before the fork and is only read.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                fds.iter()
                    .try_for_each(|fd| uvm_host::net::inherit_in_child(*fd))
            });
        }
    }
    if let Some(joiner) = uvm_util::lock(&shared.joiner).clone() {
        // SAFETY: `Joiner::join` only makes write(2) calls on descriptors opened before the
        // fork; it allocates nothing and takes no lock (async-signal-safe).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || joiner.join());
        }
    }

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
    let proc = Proc {
        pid,
        pidfd: Arc::new(pidfd),
        reaped: false,
        log: log_path.to_path_buf(),
        retired: false,
    };
    match which {
        Which::Vsock => {
            procs.vsock = Some(proc);
            procs.marks.vsock_spawned = now;
        }
        Which::Qemu => {
            procs.qemu = Some(proc);
            procs.marks.qemu_spawned = now;
        }
        Which::Helper(id) => {
            procs.helpers.insert(id, proc);
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
            let (stopping, expected, log) = {
                let procs = shared.lock();
                let p = procs.get(exited);
                // Another helper's end is no failure of this one once the VM runs (or when its
                // owner is ending it): QEMU needs every helper only at its start.
                let other_helper = matches!(exited, Which::Helper(_)) && exited != which;
                let runtime = procs.qemu_state() == QemuState::Running;
                (
                    procs.stopping,
                    other_helper && (runtime || p.is_some_and(|p| p.retired)),
                    p.map(|p| p.log.clone()),
                )
            };
            if stopping {
                return Err(QemuError::Stopped);
            }
            if !expected && status.is_some() {
                return Err(QemuError::ExitedEarly {
                    process: exited.name(),
                    status: status.unwrap_or_else(|| ExitStatus::from_raw(0)),
                    output: log.map_or_else(|| "(no log)".to_owned(), |l| log_tail(&l)),
                });
            }
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
    shared
        .lock()
        .live()
        .map(|(w, p)| (w, p.pidfd.clone()))
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
/// or reads the PID once it can be reused. QEMU's end also ends vhost-device-vsock and the
/// helpers.
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
    if let Which::Helper(id) = which {
        children.helpers.remove(&id);
    }
    // After the lock is released: a waiter checks `Procs` when woken.
    shared.reaps.send_modify(|n| *n += 1);
    if which == Which::Qemu {
        // Without QEMU the vsock device and the helpers serve nobody.
        shared.signal(Which::Vsock, Signal::KILL);
        let helpers: Vec<u32> = shared.lock().helpers.keys().copied().collect();
        for id in helpers {
            shared.signal(Which::Helper(id), Signal::KILL);
        }
    }
    Some(status)
}

/// Reap every child as it exits, and serve helper requests meanwhile; returns when no child is
/// left (and refuses the requests that come too late).
fn reap_all(shared: &Shared, children: &mut Children) {
    loop {
        serve_helper_requests(shared, children);
        let pidfds = live_pidfds(shared);
        if pidfds.is_empty() {
            let late = {
                let mut procs = shared.lock();
                procs.supervisor_ended = true;
                std::mem::take(&mut procs.requests)
            };
            for (_, reply) in late {
                let _ = reply.send(Err(QemuError::Stopped));
            }
            return;
        }
        match wait_any(&pidfds, Some(&shared.wake), None) {
            Ok(Some(which)) => {
                reap(shared, children, which);
            }
            Ok(None) => drain(&shared.wake),
            Err(e) => {
                // poll on our own pidfds cannot fail for long; do not spin if it does.
                tracing::error!(error = %uvm_util::error_chain(&e), "waiting for children failed");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Spawn the helpers asked for since the last time, each waited for until it listens.
fn serve_helper_requests(shared: &Shared, children: &mut Children) {
    let requests = std::mem::take(&mut shared.lock().requests);
    for (launch, reply) in requests {
        let which = Which::Helper(launch.id);
        let started = start_helper(shared, children, &launch);
        if started.is_err() && shared.lock().get(which).is_some_and(|p| !p.reaped) {
            // Not ready in time: end it; `reap_all` reaps it.
            shared.retire_helper(launch.id, Signal::KILL);
        }
        // An owner that gave up (its future was dropped) finds the helper in `Procs`.
        let _ = reply.send(started);
    }
}

fn start_helper(
    shared: &Shared,
    children: &mut Children,
    launch: &HelperLaunch,
) -> Result<u32, QemuError> {
    let io = |operation| {
        move |e: rustix::io::Errno| QemuError::Io {
            operation,
            source: e.into(),
        }
    };
    let watcher = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
        .map_err(io("watch the runtime directory"))?;
    inotify::add_watch(
        &watcher,
        &shared.paths.dir,
        inotify::WatchFlags::CREATE | inotify::WatchFlags::MOVED_TO,
    )
    .map_err(io("watch the runtime directory"))?;
    let which = Which::Helper(launch.id);
    let child = spawn_child(
        shared,
        which,
        &launch.program,
        &launch.args,
        &launch.log,
        &[],
    )?;
    let pid = child.id();
    children.insert(which, child);
    let socket = launch.socket.clone();
    wait_ready(shared, &watcher, children, which, || {
        Ok(unix_socket_listening(&socket)?.then_some(()))
    })?;
    Ok(pid)
}
