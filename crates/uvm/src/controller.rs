//! [`Controller`]: one utility VM's lifecycle over the host and guest seams.
//!
//! Every operation follows *guard → act → commit*: the guard asks [`plan`] whether the operation
//! is allowed in the current state, the act drives the seams **without holding the state lock**, and
//! the commit writes the state the plan named. Two locks, never held together across an await:
//!
//! - `core` (a `std::sync::Mutex`): the state and what belongs to it; held for microseconds only, so
//!   [`Controller::state`], [`Controller::status`] and [`Controller::stats`] never wait behind a
//!   long operation;
//! - `op_lock` (a `tokio::sync::Mutex`): serialises the mutating operations (create, start,
//!   terminate). `terminate_vm` first cancels an in-flight `start_vm` through its token, so it never
//!   waits for a slow boot.
//!
//! The state diagram is in [`crate::state`].

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::device_ops::DeviceSet;
use crate::error::{ControllerError, GuestError, HostError};
use crate::machine::{Admit, ExitStatus, Machine, Outcome, Transition};
use crate::seams::{
    CpuLimits, ExecRequest, Guest, GuestInfo, GuestStats, HostStats, HostVm, LinkHealth,
    PolicyFragment, ProcessExit, VmBackend, VmConfig,
};
use crate::state::{Operation, Reason, State, VmExit};

/// Deadlines of the controller's steps. Every step that waits on the guest or the VM process has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Starting the VM process (spawn, device set-up), default 30 s.
    pub vm_start: Duration,
    /// From VM start until the guest agent announced itself and finished the handshake, default 60 s
    /// (generous: TCG boots slow down many times over when several share a small host's cores;
    /// BENCHMARKS.md has the density figures).
    pub guest_connect: Duration,
    /// One request/response with the guest (not a whole exec), default 10 s.
    pub guest_call: Duration,
    /// One host-side request (stats, updates), default 10 s.
    pub host_call: Duration,
    /// Asking the VM to stop, default 10 s; on expiry the chain goes on to release.
    pub vm_terminate: Duration,
    /// Releasing the VM's resources, default 10 s; on expiry the VM is Invalid.
    pub release: Duration,
    /// One host-side device call (attach or detach a disk, add or remove a share), default 30 s:
    /// a removal waits for the guest to let go of the device.
    pub device: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            vm_start: Duration::from_secs(30),
            guest_connect: Duration::from_secs(60),
            guest_call: Duration::from_secs(10),
            host_call: Duration::from_secs(10),
            vm_terminate: Duration::from_secs(10),
            release: Duration::from_secs(10),
            device: Duration::from_secs(30),
        }
    }
}

/// A consistent view of the VM: state, why, and the guest link's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Where the VM is in its life.
    pub state: State,
    /// Why it is Invalid or Terminated; `None` in the other states.
    pub reason: Option<Reason>,
    /// The health of the link to the guest agent.
    pub link: LinkHealth,
}

/// The controller of one utility VM. Cheap to clone; clones drive the same VM.
#[derive(Clone)]
pub struct Controller {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("id", &self.inner.id)
            .field("state", &self.state())
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) id: String,
    pub(crate) timeouts: Timeouts,
    pub(crate) backend: Arc<dyn VmBackend>,
    pub(crate) guest: Arc<dyn Guest>,
    pub(crate) core: Mutex<Core>,
    pub(crate) op_lock: tokio::sync::Mutex<()>,
    /// Serialises the device operations (and terminate's device teardown); no reader takes it.
    pub(crate) device_lock: tokio::sync::Mutex<()>,
    /// Becomes true once the VM process has ended (or, never started, was terminated).
    pub(crate) exited: watch::Sender<bool>,
    /// Stops the background waiter when the last controller handle goes away.
    pub(crate) waiter_stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.waiter_stop.cancel();
    }
}

pub(crate) struct Core {
    /// The state; changed only through its `commit`.
    pub(crate) machine: Machine,
    pub(crate) config: Option<VmConfig>,
    pub(crate) vm: Option<Arc<dyn HostVm>>,
    /// Cancels the in-flight `start_vm`, if any.
    pub(crate) start_cancel: Option<CancellationToken>,
    /// The VM process may exist: terminate must run the terminate step.
    pub(crate) vm_started: bool,
    /// Who is running the cleanup chain right now, if anyone.
    pub(crate) cleanup: Option<CleanupOwner>,
    pub(crate) waiter: Option<JoinHandle<()>>,
    pub(crate) started_at: Option<SystemTime>,
    pub(crate) stopped_at: Option<SystemTime>,
    pub(crate) exit: Option<VmExit>,
    /// What the guest said when it connected.
    pub(crate) guest_info: Option<GuestInfo>,
    /// The largest file `copy_in` / `copy_out` accept.
    pub(crate) copy_limit: u64,
    /// The disks and shares, from create on.
    pub(crate) devices: Option<Arc<DeviceSet>>,
    /// Cancels in-flight device operations: fired once, by terminate or the VM's exit.
    pub(crate) device_cancel: CancellationToken,
    /// The resources as create and the successful updates since left them.
    pub(crate) resources: Option<ResourceSettings>,
    /// The policy fragments the guest took, in order (each once).
    pub(crate) policy_fragments: Vec<PolicyFragment>,
}

/// A VM's resources as create and the successful updates since left them: what `inspect`
/// shows. `None` fields were never set (the backend's default: no cap, weight 100, no group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSettings {
    /// Guest memory, bytes (boot memory, then what `update_memory` normalised to).
    pub memory_bytes: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The CPU cap and weight last applied (each kept until changed).
    pub cpu_limits: CpuLimits,
    /// The host CPU group the VM was last moved into.
    pub cpu_group: Option<String>,
}

/// Who runs the cleanup chain: `terminate_vm`, or the waiter after the VM ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CleanupOwner {
    Terminate,
    Waiter,
}

impl Core {
    /// How the VM ended, for the commit into Terminated: the exit the waiter recorded, if any,
    /// and when it was recorded (now, if nothing was).
    pub(crate) fn ending(&mut self, reason: Reason) -> ExitStatus {
        ExitStatus {
            stopped_at: *self.stopped_at.get_or_insert_with(SystemTime::now),
            reason,
            exit: self.exit.clone(),
        }
    }
}

impl Controller {
    /// A controller for VM `id` in state NotCreated.
    pub fn new(
        id: impl Into<String>,
        backend: Arc<dyn VmBackend>,
        guest: Arc<dyn Guest>,
        timeouts: Timeouts,
    ) -> Controller {
        let (exited, _) = watch::channel(false);
        Controller {
            inner: Arc::new(Inner {
                id: id.into(),
                timeouts,
                backend,
                guest,
                core: Mutex::new(Core {
                    machine: Machine::new(),
                    config: None,
                    vm: None,
                    start_cancel: None,
                    vm_started: false,
                    cleanup: None,
                    waiter: None,
                    started_at: None,
                    stopped_at: None,
                    exit: None,
                    guest_info: None,
                    copy_limit: crate::files::DEFAULT_COPY_LIMIT,
                    devices: None,
                    device_cancel: CancellationToken::new(),
                    resources: None,
                    policy_fragments: Vec::new(),
                }),
                op_lock: tokio::sync::Mutex::new(()),
                device_lock: tokio::sync::Mutex::new(()),
                exited,
                waiter_stop: CancellationToken::new(),
            }),
        }
    }

    /// The VM's id, as given to [`Controller::new`].
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Core> {
        lock(&self.inner.core)
    }

    /// The current state. Never waits behind another operation.
    pub fn state(&self) -> State {
        self.core().machine.state()
    }

    /// State, reason and guest link health. Never waits behind another operation.
    pub fn status(&self) -> Status {
        let (state, reason) = {
            let core = self.core();
            (core.machine.state(), core.machine.reason().cloned())
        };
        Status {
            state,
            reason,
            link: self.inner.guest.health(),
        }
    }

    /// The last [`crate::HISTORY_LEN`] state changes, oldest first.
    pub fn history(&self) -> Vec<Transition> {
        self.core().machine.history().cloned().collect()
    }

    /// What the guest agent reported when it connected (version, capabilities, boot marks).
    pub fn guest_info(&self) -> Option<GuestInfo> {
        self.core().guest_info.clone()
    }

    /// The backend's id for this VM, once created.
    pub fn runtime_id(&self) -> Option<String> {
        self.core().vm.as_ref().map(|vm| vm.runtime_id())
    }

    /// Asks the table whether `operation` may run now, with the state lock held by the caller.
    pub(crate) fn admit(
        &self,
        core: &Core,
        operation: Operation,
    ) -> Result<Admit, ControllerError> {
        core.machine
            .admit(operation)
            .map_err(|state| self.wrong_state(operation, state))
    }

    pub(crate) fn wrong_state(&self, operation: Operation, state: State) -> ControllerError {
        ControllerError::WrongState {
            id: self.inner.id.clone(),
            operation,
            state,
        }
    }

    /// Guard for operations that need the VM Running, returning it.
    pub(crate) fn running_vm(
        &self,
        operation: Operation,
    ) -> Result<Arc<dyn HostVm>, ControllerError> {
        let core = self.core();
        match (self.admit(&core, operation)?, &core.vm) {
            (Admit::Run, Some(vm)) => Ok(vm.clone()),
            (Admit::NoOp, _) | (Admit::Run, None) => {
                Err(self.wrong_state(operation, core.machine.state()))
            }
        }
    }

    fn host_error(&self, operation: Operation, source: HostError) -> ControllerError {
        ControllerError::Host {
            id: self.inner.id.clone(),
            operation,
            source,
        }
    }

    pub(crate) fn guest_error(&self, operation: Operation, source: GuestError) -> ControllerError {
        ControllerError::Guest {
            id: self.inner.id.clone(),
            operation,
            source,
        }
    }

    /// Runs a host-side call under the host-call deadline.
    async fn host_call<T>(
        &self,
        operation: Operation,
        fut: impl std::future::Future<Output = Result<T, HostError>>,
    ) -> Result<T, ControllerError> {
        let after = self.inner.timeouts.host_call;
        match tokio::time::timeout(after, fut).await {
            Ok(r) => r.map_err(|e| self.host_error(operation, e)),
            Err(_) => Err(self.host_error(
                operation,
                HostError::Timeout {
                    operation: operation.as_str(),
                    after,
                },
            )),
        }
    }

    /// Runs a guest call under the guest-call deadline.
    async fn guest_call<T>(
        &self,
        operation: Operation,
        fut: impl std::future::Future<Output = Result<T, GuestError>>,
    ) -> Result<T, ControllerError> {
        with_deadline(operation.as_str(), self.inner.timeouts.guest_call, fut)
            .await
            .map_err(|e| self.guest_error(operation, e))
    }

    /// Describe and reserve the VM: NotCreated → Created. A second call is refused. The disks
    /// and shares of `config` are reserved at their cold slots and tags first (no I/O): a
    /// configuration that does not fit is refused before the backend is asked.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "create_vm"))]
    pub async fn create_vm(&self, config: VmConfig) -> Result<(), ControllerError> {
        let _op = self.inner.op_lock.lock().await;
        {
            let core = self.core();
            if self.admit(&core, Operation::Create)? == Admit::NoOp {
                return Ok(());
            }
        }
        let devices = DeviceSet::for_config(&config, self.inner.timeouts).map_err(|source| {
            ControllerError::Device {
                id: self.inner.id.clone(),
                operation: Operation::Create,
                source,
            }
        })?;
        let vm = self
            .inner
            .backend
            .create(&self.inner.id, &config)
            .await
            .map_err(|source| ControllerError::CreateFailed {
                id: self.inner.id.clone(),
                source,
            })?;
        devices.network.add_cold(vm.cold_nics());
        let mut core = self.core();
        core.vm = Some(vm);
        core.resources = Some(ResourceSettings {
            memory_bytes: config.memory_mib.saturating_mul(1 << 20),
            cpus: config.cpus,
            cpu_limits: CpuLimits::default(),
            cpu_group: None,
        });
        core.config = Some(config);
        core.devices = Some(Arc::new(devices));
        core.machine.commit(Operation::Create, Outcome::Succeeded);
        Ok(())
    }

    /// Run a process in the guest (not in a container) and return its exit code. Running only.
    /// A terminal with a separate stderr is refused before the state is looked at. The whole
    /// process has no deadline (it may legitimately run long); the guest link bounds each request,
    /// and the VM exiting releases it.
    pub async fn exec_into_host(&self, request: ExecRequest) -> Result<i32, ControllerError> {
        self.exec_into_host_exit(request)
            .await
            .map(|exit| exit.code)
    }

    /// [`Controller::exec_into_host`], telling also the signal that ended the process, if one
    /// did.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "exec_into_host"))]
    pub async fn exec_into_host_exit(
        &self,
        request: ExecRequest,
    ) -> Result<ProcessExit, ControllerError> {
        if request.terminal && request.stderr.is_some() {
            return Err(ControllerError::TerminalWithStderr);
        }
        if !request.terminal && request.terminal_size.is_some() {
            return Err(ControllerError::InvalidArgument {
                what: "terminal size",
                message: "only a terminal has a size".into(),
            });
        }
        self.running_vm(Operation::ExecIntoHost)?;
        self.inner
            .guest
            .exec(request)
            .await
            .map_err(|e| self.guest_error(Operation::ExecIntoHost, e))
    }

    /// What the guest agent is doing. Running only; empty when the guest lacks the capability.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "dump_stacks"))]
    pub async fn dump_stacks(&self) -> Result<String, ControllerError> {
        self.running_vm(Operation::DumpStacks)?;
        if !self.inner.guest.capabilities().dump_stacks() {
            return Ok(String::new());
        }
        self.guest_call(Operation::DumpStacks, self.inner.guest.dump_stacks())
            .await
    }

    /// Host-side resource use. Running only; never waits behind another operation.
    pub async fn stats(&self) -> Result<HostStats, ControllerError> {
        let vm = self.running_vm(Operation::Stats)?;
        self.host_call(Operation::Stats, vm.stats()).await
    }

    /// The guest's own view of its resources. Running only.
    pub async fn guest_stats(&self) -> Result<GuestStats, ControllerError> {
        self.running_vm(Operation::GuestStats)?;
        self.guest_call(Operation::GuestStats, self.inner.guest.stats())
            .await
    }

    /// Move the VM into a host CPU group. The id must be non-empty (checked first). Running only.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "update_cpu_group"))]
    pub async fn update_cpu_group(&self, group_id: &str) -> Result<(), ControllerError> {
        if group_id.is_empty() {
            return Err(ControllerError::InvalidArgument {
                what: "cpu group id",
                message: "must not be empty".into(),
            });
        }
        let vm = self.running_vm(Operation::UpdateCpuGroup)?;
        self.host_call(Operation::UpdateCpuGroup, vm.set_cpu_group(group_id))
            .await?;
        self.update_resources(|r| r.cpu_group = Some(group_id.to_owned()));
        Ok(())
    }

    /// Change the VM's CPU limits. Limits out of range are refused before anything else
    /// ([`CpuLimits::refusal`]). Running only.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "update_cpu_limits"))]
    pub async fn update_cpu_limits(&self, limits: CpuLimits) -> Result<(), ControllerError> {
        if let Some((what, message)) = limits.refusal() {
            return Err(ControllerError::InvalidArgument { what, message });
        }
        let vm = self.running_vm(Operation::UpdateCpuLimits)?;
        self.host_call(Operation::UpdateCpuLimits, vm.update_cpu_limits(limits))
            .await?;
        self.update_resources(|r| {
            r.cpu_limits.limit = limits.limit.or(r.cpu_limits.limit);
            r.cpu_limits.weight = limits.weight.or(r.cpu_limits.weight);
        });
        Ok(())
    }

    /// Change the guest's memory. Running only. The size is **rounded up** to the backend's
    /// granularity ([`crate::seams::VmResources::memory_granularity`], e.g. 2 MiB), so the guest
    /// gets at least what was asked; the normalized size is returned. Zero is refused.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "update_memory"))]
    pub async fn update_memory(&self, bytes: u64) -> Result<u64, ControllerError> {
        let vm = self.running_vm(Operation::UpdateMemory)?;
        let normalized = normalize_memory(bytes, vm.memory_granularity())?;
        self.host_call(Operation::UpdateMemory, vm.update_memory(normalized))
            .await?;
        self.update_resources(|r| r.memory_bytes = normalized);
        Ok(normalized)
    }

    /// Give the VM `cpus` vCPUs (hot-add or hot-remove; 0 is refused first). Running only.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "update_cpus"))]
    pub async fn update_cpus(&self, cpus: u32) -> Result<(), ControllerError> {
        if cpus == 0 {
            return Err(ControllerError::InvalidArgument {
                what: "cpu count",
                message: "a VM needs at least one vCPU".into(),
            });
        }
        let vm = self.running_vm(Operation::UpdateCpus)?;
        self.host_call(Operation::UpdateCpus, vm.update_cpus(cpus))
            .await?;
        self.update_resources(|r| r.cpus = cpus);
        Ok(())
    }

    /// The resources as create and the successful updates since left them; `None` before
    /// create.
    pub fn resources(&self) -> Option<ResourceSettings> {
        self.core().resources.clone()
    }

    fn update_resources(&self, change: impl FnOnce(&mut ResourceSettings)) {
        if let Some(r) = self.core().resources.as_mut() {
            change(r);
        }
    }

    /// Add a fragment to the guest's security policy. Running only; a VM created without a
    /// policy refuses (a fragment adds to one) before the guest is asked.
    #[tracing::instrument(skip_all, fields(vm = %self.inner.id, op = "update_policy_fragment"))]
    pub async fn update_policy_fragment(
        &self,
        fragment: &PolicyFragment,
    ) -> Result<(), ControllerError> {
        self.running_vm(Operation::UpdatePolicyFragment)?;
        let has_policy = self
            .core()
            .config
            .as_ref()
            .is_some_and(|c| c.security_policy.is_some());
        if !has_policy {
            return Err(ControllerError::InvalidArgument {
                what: "policy fragment",
                message: format!(
                    "VM {} was created without a security policy: a fragment adds to one",
                    self.inner.id
                ),
            });
        }
        self.guest_call(
            Operation::UpdatePolicyFragment,
            self.inner.guest.inject_policy_fragment(fragment),
        )
        .await?;
        let mut core = self.core();
        if !core.policy_fragments.contains(fragment) {
            core.policy_fragments.push(fragment.clone());
        }
        Ok(())
    }

    /// The policy fragments the guest took since start, in order.
    pub fn policy_fragments(&self) -> Vec<PolicyFragment> {
        self.core().policy_fragments.clone()
    }

    /// When the VM reached Running; `None` for a VM terminated without ever running.
    /// Only in Running or Terminated.
    pub fn start_time(&self) -> Result<Option<SystemTime>, ControllerError> {
        let core = self.core();
        self.admit(&core, Operation::StartTime)?;
        Ok(core.started_at)
    }

    /// How and when the VM ended. Only in Terminated.
    pub fn exit_status(&self) -> Result<ExitStatus, ControllerError> {
        let core = self.core();
        self.admit(&core, Operation::ExitStatus)?;
        core.machine
            .exit_status()
            .cloned()
            .ok_or_else(|| self.wrong_state(Operation::ExitStatus, core.machine.state()))
    }
}

/// Rounds `bytes` up to a multiple of `granularity`; zero or overflow is an invalid argument.
pub fn normalize_memory(bytes: u64, granularity: u64) -> Result<u64, ControllerError> {
    let invalid = |message: String| ControllerError::InvalidArgument {
        what: "memory size",
        message,
    };
    if bytes == 0 {
        return Err(invalid("must be greater than zero".into()));
    }
    let granularity = granularity.max(1);
    bytes
        .div_ceil(granularity)
        .checked_mul(granularity)
        .ok_or_else(|| invalid(format!("{bytes} bytes overflows when rounded up")))
}

/// Bounds a guest-facing future; expiry is [`GuestError::Timeout`].
pub(crate) async fn with_deadline<T>(
    operation: &'static str,
    after: Duration,
    fut: impl std::future::Future<Output = Result<T, GuestError>>,
) -> Result<T, GuestError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(GuestError::Timeout { operation, after }),
    }
}

/// Locks a mutex, recovering from poisoning: the state is written only by `Core::commit`, which
/// cannot panic half-way, so a poisoned lock still guards a consistent state.
pub(crate) use uvm_util::lock;
