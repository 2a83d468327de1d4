//! The supervisor process of one VM: creates the VM, binds `<root>/<id>/api.sock` (0600), keeps
//! `vm.json` up to date, tells its starter it is ready, and serves the API until the VM is
//! removed. A VM that ends by itself is recorded Terminated and its API keeps serving Inspect until
//! Remove. SIGTERM or SIGINT terminate the VM and end the supervisor, leaving the record (`rm`
//! cleans it).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uvm::State;
use uvm_image::Image;
use uvm_vm::{Vm, VmOptions};

use crate::names;
use crate::ready::{Ready, ReadyError};
use crate::record::{
    rfc3339, write_record, ConfigRecord, DeviceRecord, ProcessRecord, RecordError, VmRecord,
    RECORD_FILE, SOCKET_FILE,
};
use crate::service::VmApi;
use crate::tether::Tether;

/// How long calls still open at removal get to end before the supervisor exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a supervisor runs.
#[derive(Debug, Clone)]
pub struct SupervisorSpec {
    /// The state root (absolute).
    pub root: PathBuf,
    /// The VM's id; `<root>/<id>` exists (the starter made it).
    pub id: String,
    /// The VM's name (its claim is the starter's); empty for none.
    pub name: String,
    /// How to make the VM; its runtime root is set to the VM directory.
    pub options: VmOptions,
    /// The guest image.
    pub image: Image,
    /// The configuration as recorded (memory, CPUs, backend settings).
    pub config: ConfigRecord,
    /// A process whose end removes the VM (as a forced `rm` would): tests tie their VMs to
    /// themselves so that a killed test leaves none behind. `None`: the VM lives until removed.
    pub tether: Option<u32>,
}

/// The supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Creating the VM failed.
    #[error("creating VM {id} failed")]
    Create {
        /// The VM.
        id: String,
        /// Why.
        #[source]
        source: uvm::ControllerError,
    },
    /// The API socket could not be bound.
    #[error("cannot serve the API on {}", path.display())]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record could not be written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The readiness pipe failed.
    #[error(transparent)]
    Ready(#[from] ReadyError),
    /// The gRPC server failed.
    #[error("the API server failed")]
    Serve(#[source] tonic::transport::Error),
    /// The process to tether to cannot be watched (it is gone already, or not ours to see).
    #[error(transparent)]
    Tether(#[from] crate::tether::TetherError),
}

/// What the API handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) vm: Vm,
    pub(crate) root: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) name: String,
    pub(crate) config: ConfigRecord,
    pub(crate) created_at: SystemTime,
    /// Fires when the VM has been removed: open streams end, the server stops.
    pub(crate) removed: CancellationToken,
    /// The last record written, so that unchanged snapshots are not rewritten.
    last_record: Mutex<Option<VmRecord>>,
    /// The next exec id.
    pub(crate) next_exec: AtomicU64,
    /// How long the last successful Start took.
    pub(crate) start_total: Mutex<Option<Duration>>,
    /// The VM's events.
    pub(crate) events: crate::events::EventLog,
}

impl Shared {
    pub(crate) fn id(&self) -> &str {
        &self.vm.id
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_FILE)
    }

    /// The VM's host processes by role.
    pub(crate) fn processes(&self) -> BTreeMap<String, u32> {
        let mut out = BTreeMap::from([("supervisor".to_string(), std::process::id())]);
        if let Some(qemu) = self.vm.qemu_vm() {
            if let Some(pid) = qemu.qemu_pid() {
                out.insert("qemu".into(), pid);
            }
            if let Some(pid) = qemu.vsock_pid() {
                out.insert("vhost-device-vsock".into(), pid);
            }
        }
        out
    }

    fn snapshot(&self) -> VmRecord {
        let status = self.vm.controller.status();
        // Processes of an ended VM are gone: keep only the supervisor then.
        let ended = matches!(status.state, State::Terminated);
        let pids = self
            .processes()
            .into_iter()
            .filter(|(role, _)| !ended || role == "supervisor")
            .map(|(role, pid)| (role, ProcessRecord::of(pid)))
            .collect();
        VmRecord {
            id: self.id().to_owned(),
            name: self.name.clone(),
            config: self.config.clone(),
            state: status.state.to_string(),
            reason: status.reason.map(|r| r.to_string()),
            pids,
            created_at: rfc3339(self.created_at),
            started_at: self.vm.controller.start_time().ok().flatten().map(rfc3339),
            devices: DeviceRecord::of(&self.vm.controller.devices()),
            api_socket: self.socket(),
        }
    }

    /// Turns the controller's transitions not seen yet into events.
    pub(crate) fn sync_transitions(&self) {
        let c = &self.vm.controller;
        self.events.transitions(
            &c.history(),
            c.status().reason.map(uvm_api::v1::Reason::from),
        );
    }

    /// Records `event` after the transitions that happened before it: an exec that started
    /// on a Running VM comes after the transition to Running in sequence order, whoever wrote
    /// that transition down first.
    pub(crate) fn push_event(&self, event: uvm_api::v1::events_response::Event) {
        let c = &self.vm.controller;
        self.events.push_after(
            &c.history(),
            c.status().reason.map(uvm_api::v1::Reason::from),
            event,
        );
    }

    /// Writes the new transitions as events and the record if it changed (on a blocking
    /// thread: the write fsyncs); a removed VM has no record to write.
    pub(crate) async fn persist(self: &Arc<Self>) {
        if self.removed.is_cancelled() {
            return;
        }
        self.sync_transitions();
        let shared = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || shared.write_if_changed()).await {
            tracing::error!(vm = %self.id(), error = %e, "the record writer failed");
        }
    }

    fn write_if_changed(&self) {
        // The snapshot is taken under the lock: of two racing writers, the later one writes
        // the later snapshot.
        let mut last = uvm_util::lock(&self.last_record);
        if self.removed.is_cancelled() {
            return;
        }
        let record = self.snapshot();
        if last.as_ref() == Some(&record) {
            return;
        }
        match write_record(&self.dir, &record) {
            Ok(()) => *last = Some(record),
            Err(e) => {
                tracing::error!(vm = %self.id(), error = %uvm_util::error_chain(&e), "cannot write the VM record")
            }
        }
    }

    /// Removes the VM's directory and name claim (on a blocking thread); the record is gone
    /// after this.
    pub(crate) async fn remove_files(self: &Arc<Self>) -> std::io::Result<()> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || shared.remove_files_now())
            .await
            .map_err(std::io::Error::other)?
    }

    fn remove_files_now(&self) -> std::io::Result<()> {
        let _last = uvm_util::lock(&self.last_record);
        // The record first: a directory without vm.json is not a VM to `ps`.
        match std::fs::remove_file(self.dir.join(RECORD_FILE)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // A second Remove racing this one may have removed it already: gone is what was asked.
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if !self.name.is_empty() {
            names::release_name(&self.root, &self.name, self.id())
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

/// Runs the supervisor of `spec` until its VM is removed (or a signal ends it); `ready` is told
/// once the API is served, or why the supervisor failed.
pub async fn run(spec: SupervisorSpec, ready: Ready) -> Result<(), SupervisorError> {
    let span = tracing::info_span!("supervisor", vm = %spec.id);
    supervise(spec, ready).instrument(span).await
}

async fn supervise(spec: SupervisorSpec, ready: Ready) -> Result<(), SupervisorError> {
    // Our own session: a terminal closing or a Ctrl-C at the `create` does not reach us. (The
    // starter makes us a session leader before we run; this is for a supervisor run by hand.)
    let _ = rustix::process::setsid();
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let tether = match spec.tether.map(Tether::open).transpose() {
        Ok(tether) => tether,
        Err(err) => {
            ready.fail(&uvm_util::error_chain(&err))?;
            return Err(err.into());
        }
    };
    let dir = spec.root.join(&spec.id);
    let mut options = spec.options.clone();
    options.runtime_root = Some(dir.clone());
    let vm = Vm::with_id(&spec.image, options, spec.id.clone());
    let config = uvm_vm::vm_config(&spec.options);
    if let Err(source) = vm.controller.create_vm(config).await {
        let err = SupervisorError::Create {
            id: spec.id.clone(),
            source,
        };
        ready.fail(&uvm_util::error_chain(&err))?;
        return Err(err);
    }
    let shared = Arc::new(Shared {
        vm,
        root: spec.root.clone(),
        dir: dir.clone(),
        name: spec.name.clone(),
        config: spec.config.clone(),
        created_at: SystemTime::now(),
        removed: CancellationToken::new(),
        last_record: Mutex::new(None),
        next_exec: AtomicU64::new(1),
        start_total: Mutex::new(None),
        events: crate::events::EventLog::default(),
    });
    let listener = match bind(&shared.socket()) {
        Ok(l) => l,
        Err(err) => return fail_after_create(&shared, ready, err).await,
    };
    shared.persist().await;
    if uvm_util::lock(&shared.last_record).is_none() {
        let err = SupervisorError::Record(RecordError::Io {
            action: "write",
            path: dir.join(RECORD_FILE),
            source: std::io::Error::other("see the supervisor log"),
        });
        return fail_after_create(&shared, ready, err).await;
    }
    if let Err(e) = ready.ok() {
        // The starter is gone (killed before it heard from us): nobody knows this VM exists.
        // Leave nothing: no VM, no record, no name claim.
        tracing::error!(error = %uvm_util::error_chain(&e), "the starter went away before hearing we are ready; removing the VM");
        shared.remove_forced().await;
        return Err(e.into());
    }
    tracing::info!(socket = %shared.socket().display(), "serving");

    let watcher = tokio::spawn(watch_exit(shared.clone()).in_current_span());
    let tethered = tether.map(|tether| {
        let shared = shared.clone();
        tokio::spawn(
            async move {
                tether.ended().await;
                tracing::warn!("the process this VM is tethered to ended; removing the VM");
                shared.remove_forced().await;
            }
            .in_current_span(),
        )
    });
    let stop = shutdown_signal(shared.clone());
    let served = {
        let removed = shared.removed.clone();
        let server = uvm_api::serve(listener, VmApi::new(shared.clone()), &spec.id, async move {
            tokio::select! {
                () = removed.cancelled() => {}
                () = stop => {}
            }
        });
        tokio::pin!(server);
        tokio::select! {
            r = &mut server => r,
            // Calls still open at removal (a Wait, a following stream) get a moment, no more.
            () = async { shared.removed.cancelled().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => Ok(()),
        }
    };
    watcher.abort();
    if let Some(tethered) = tethered {
        tethered.abort();
    }
    if !shared.removed.is_cancelled() {
        // Ended by a signal: take the VM down, keep the record for `ps` and `rm`.
        if let Err(e) = shared.vm.controller.terminate_vm().await {
            tracing::error!(error = %uvm_util::error_chain(&e), "terminate at exit failed");
        }
        shared.persist().await;
    }
    served.map_err(SupervisorError::Serve)
}

impl Shared {
    /// Terminates the VM (by force) and removes its record, directory and name claim, as a
    /// forced Remove does; failures are logged, nothing is left that can be removed.
    async fn remove_forced(self: &Arc<Self>) {
        if let Err(e) = self.vm.controller.terminate_vm().await {
            tracing::error!(error = %uvm_util::error_chain(&e), "terminating the VM failed");
        }
        if let Err(e) = self.remove_files().await {
            tracing::error!(error = %e, "removing the VM's files failed");
        }
        self.removed.cancel();
    }
}

/// Terminates the just-created VM and reports `err` to the starter.
async fn fail_after_create(
    shared: &Shared,
    ready: Ready,
    err: SupervisorError,
) -> Result<(), SupervisorError> {
    if let Err(e) = shared.vm.controller.terminate_vm().await {
        tracing::error!(error = %uvm_util::error_chain(&e), "terminate after a failed set-up failed");
    }
    ready.fail(&uvm_util::error_chain(&err))?;
    Err(err)
}

fn bind(path: &Path) -> Result<UnixListener, SupervisorError> {
    let err = |source| SupervisorError::Bind {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Rewrites the record once the VM has ended, by itself or otherwise: the one state change no
/// API call of ours makes (every call that changes the state rewrites the record itself).
async fn watch_exit(shared: Arc<Shared>) {
    let cancel = shared.removed.child_token();
    if shared.vm.controller.wait(&cancel).await.is_ok() {
        shared.persist().await;
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(vm = %shared.id(), "signalled: terminating the VM");
}
