//! Recording fakes with scripted failures, shared by unit tests, property tests and benchmarks.
//!
//! One [`Script`] is shared by the fake backend, the fake VMs it creates and the fake guest, so the
//! call log interleaves host and guest calls in the order they happened (that is how "terminate →
//! close connection → release" ordering is asserted without a VM). A script can fail the n-th call
//! of a kind, or every call, and can **hold** a call until the test releases it, with a signal when
//! the call has entered — for concurrency tests without wall-clock sleeps.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::controller::lock;
use crate::error::{ControllerError, GuestError, GuestRequest, HostError};
use crate::seams::{
    Capabilities, CpuLimits, ExecRequest, FileMeta, GuestConnection, GuestDiagnostics,
    GuestEndpoint, GuestExec, GuestInfo, GuestPolicy, GuestStats, HostStats, HostVm, LinkHealth,
    PolicyFragment, ProcessExit, SecurityPolicy, VmBackend, VmConfig, VmLifetime, VmResources,
};
use crate::state::{State, VmExit};
use crate::Rejection;

mod devices;
mod files;
mod network;
mod power;
use crate::{Controller, Timeouts};
pub use devices::FakeMount;
pub use files::FAKE_COPY_CHUNK;
pub use network::fake_endpoint;
pub use power::GUEST_SHUTDOWN_REASON;

/// Every call a fake records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    /// `VmBackend::create`.
    Create,
    /// `VmLifetime::start`.
    Start,
    /// `VmLifetime::terminate`.
    Terminate,
    /// `VmLifetime::release`.
    Release,
    /// `VmResources::stats`.
    HostStats,
    /// `VmResources::set_cpu_group`.
    SetCpuGroup,
    /// `VmResources::update_cpu_limits`.
    UpdateCpuLimits,
    /// `VmResources::update_memory`.
    UpdateMemory,
    /// `VmResources::update_cpus`.
    UpdateCpus,
    /// `GuestConnection::prepare_connection`.
    PrepareConnection,
    /// `GuestConnection::connect`.
    Connect,
    /// `GuestConnection::close_connection`.
    CloseConnection,
    /// `GuestExec::exec`.
    Exec,
    /// `GuestDiagnostics::dump_stacks`.
    DumpStacks,
    /// `GuestDiagnostics::stats`.
    GuestStats,
    /// `GuestPolicy::set_security_policy`.
    SetSecurityPolicy,
    /// `GuestPolicy::inject_policy_fragment`.
    InjectPolicyFragment,
    /// `GuestFiles::copy_in`, as it opens the file.
    CopyIn,
    /// One chunk of [`Call::CopyIn`] ([`FAKE_COPY_CHUNK`] bytes, the last one shorter).
    WriteChunk,
    /// `GuestFiles::copy_out`, as it opens the file.
    CopyOut,
    /// One chunk of [`Call::CopyOut`] ([`FAKE_COPY_CHUNK`] bytes, the last one shorter).
    ReadChunk,
    /// `GuestPower::shutdown`.
    Shutdown,
    /// Not recorded in the log (the waiter calls it at any time); holdable.
    LogDrain,
    /// `HostDevices::attach_disk`.
    AttachDisk,
    /// `HostDevices::detach_disk`.
    DetachDisk,
    /// `HostDevices::add_share`.
    AddShare,
    /// `HostDevices::remove_share`.
    RemoveShare,
    /// `GuestMounts::mount_disk`.
    MountDisk,
    /// `GuestMounts::unmount_disk`.
    UnmountDisk,
    /// `GuestMounts::eject_disk`.
    EjectDisk,
    /// `GuestMounts::mount_share`.
    MountShare,
    /// `GuestMounts::unmount_share`.
    UnmountShare,
    /// `HostNetwork::namespace_endpoints`.
    NamespaceEndpoints,
    /// `HostNetwork::add_nic`.
    AddNic,
    /// `HostNetwork::remove_nic`.
    RemoveNic,
    /// `GuestNetwork::configure_interface`.
    ConfigureInterface,
    /// `GuestNetwork::deconfigure_interface`.
    DeconfigureInterface,
    /// `GuestNetwork::configure_dns`.
    ConfigureDns,
    /// `HostPci::probe_pci`.
    ProbePci,
    /// `HostPci::add_pci`.
    AddPci,
    /// `HostPci::remove_pci`.
    RemovePci,
    /// `GuestPci::wait_pci_device`.
    WaitPciDevice,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Create => "create",
            Call::Start => "start",
            Call::Terminate => "terminate",
            Call::Release => "release",
            Call::HostStats => "stats",
            Call::SetCpuGroup => "set_cpu_group",
            Call::UpdateCpuLimits => "update_cpu_limits",
            Call::UpdateMemory => "update_memory",
            Call::UpdateCpus => "update_cpus",
            Call::PrepareConnection => "prepare_connection",
            Call::Connect => "connect",
            Call::CloseConnection => "close_connection",
            Call::Exec => "exec",
            Call::DumpStacks => "dump_stacks",
            Call::GuestStats => "guest_stats",
            Call::SetSecurityPolicy => "set_security_policy",
            Call::InjectPolicyFragment => "inject_policy_fragment",
            Call::CopyIn => "copy_in",
            Call::WriteChunk => "write_chunk",
            Call::CopyOut => "copy_out",
            Call::ReadChunk => "read_chunk",
            Call::Shutdown => "shutdown",
            Call::LogDrain => "log_drain",
            Call::AttachDisk => "attach_disk",
            Call::DetachDisk => "detach_disk",
            Call::AddShare => "add_share",
            Call::RemoveShare => "remove_share",
            Call::MountDisk => "mount_disk",
            Call::UnmountDisk => "unmount_disk",
            Call::EjectDisk => "eject_disk",
            Call::MountShare => "mount_share",
            Call::UnmountShare => "unmount_share",
            Call::NamespaceEndpoints => "namespace_endpoints",
            Call::AddNic => "add_nic",
            Call::RemoveNic => "remove_nic",
            Call::ConfigureInterface => "configure_interface",
            Call::DeconfigureInterface => "deconfigure_interface",
            Call::ConfigureDns => "configure_dns",
            Call::ProbePci => "probe_pci",
            Call::AddPci => "add_pci",
            Call::RemovePci => "remove_pci",
            Call::WaitPciDevice => "wait_pci_device",
        }
    }

    /// The agent request a guest call stands for; `None` for calls that are not requests (the
    /// listener, closing) and for host calls.
    fn guest_request(self) -> Option<GuestRequest> {
        match self {
            Call::Connect => Some(GuestRequest::Handshake),
            Call::Exec => Some(GuestRequest::ExecProcess),
            Call::DumpStacks => Some(GuestRequest::DumpStacks),
            Call::GuestStats => Some(GuestRequest::GuestStats),
            Call::SetSecurityPolicy => Some(GuestRequest::SetSecurityPolicy),
            Call::InjectPolicyFragment => Some(GuestRequest::InjectPolicyFragment),
            Call::CopyIn => Some(GuestRequest::OpenWrite),
            Call::WriteChunk => Some(GuestRequest::WriteChunk),
            Call::CopyOut => Some(GuestRequest::OpenRead),
            Call::ReadChunk => Some(GuestRequest::ReadChunk),
            Call::MountDisk => Some(GuestRequest::MountDisk),
            Call::UnmountDisk => Some(GuestRequest::UnmountDisk),
            Call::EjectDisk => Some(GuestRequest::EjectDisk),
            Call::MountShare => Some(GuestRequest::MountShare),
            Call::UnmountShare => Some(GuestRequest::UnmountShare),
            Call::Shutdown => Some(GuestRequest::Shutdown),
            Call::ConfigureInterface => Some(GuestRequest::ConfigureInterface),
            Call::DeconfigureInterface => Some(GuestRequest::DeconfigureInterface),
            Call::ConfigureDns => Some(GuestRequest::ConfigureDns),
            Call::WaitPciDevice => Some(GuestRequest::WaitPciDevice),
            Call::Create
            | Call::Start
            | Call::Terminate
            | Call::Release
            | Call::HostStats
            | Call::SetCpuGroup
            | Call::UpdateCpuLimits
            | Call::UpdateMemory
            | Call::UpdateCpus
            | Call::PrepareConnection
            | Call::CloseConnection
            | Call::LogDrain
            | Call::AttachDisk
            | Call::DetachDisk
            | Call::AddShare
            | Call::RemoveShare
            | Call::NamespaceEndpoints
            | Call::AddNic
            | Call::RemoveNic
            | Call::ProbePci
            | Call::AddPci
            | Call::RemovePci => None,
        }
    }
}

/// A call held by the script until [`Hold::release`].
#[derive(Debug, Clone)]
pub struct Hold {
    entered: watch::Sender<bool>,
    released: watch::Sender<bool>,
}

impl Hold {
    fn new() -> Hold {
        Hold {
            entered: watch::channel(false).0,
            released: watch::channel(false).0,
        }
    }
    /// Resolves once the held call has been entered (it is now blocked).
    pub async fn entered(&self) {
        let mut rx = self.entered.subscribe();
        let _ = rx.wait_for(|e| *e).await;
    }
    /// Lets the held call (and any later one of the same kind) go on.
    pub fn release(&self) {
        self.released.send_replace(true);
    }
    async fn pass(&self) {
        self.entered.send_replace(true);
        let mut rx = self.released.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }
}

#[derive(Default)]
struct ScriptState {
    log: Vec<Call>,
    counts: HashMap<Call, usize>,
    fail_nth: HashSet<(Call, usize)>,
    fail_always: HashSet<Call>,
    holds: HashMap<Call, Hold>,
}

/// The shared call log and failure script.
#[derive(Clone, Default)]
pub struct Script {
    state: Arc<Mutex<ScriptState>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script")
            .field("log", &self.calls())
            .finish()
    }
}

impl Script {
    /// Fail the `n`-th call (1-based) of `call`.
    pub fn fail_nth(&self, call: Call, n: usize) {
        lock(&self.state).fail_nth.insert((call, n));
    }
    /// Fail every call of `call` until [`Script::heal`].
    pub fn fail_always(&self, call: Call) {
        lock(&self.state).fail_always.insert(call);
    }
    /// Stop failing `call` (scripted n-th failures stay).
    pub fn heal(&self, call: Call) {
        lock(&self.state).fail_always.remove(&call);
    }
    /// Hold the calls of `call` until the returned hold is released.
    pub fn hold(&self, call: Call) -> Hold {
        let hold = Hold::new();
        lock(&self.state).holds.insert(call, hold.clone());
        hold
    }
    /// The calls recorded so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.state).log.clone()
    }
    /// How many times `call` was made.
    pub fn count(&self, call: Call) -> usize {
        lock(&self.state).counts.get(&call).copied().unwrap_or(0)
    }
    /// Forget the log (scripted failures and holds stay).
    pub fn clear_log(&self) {
        lock(&self.state).log.clear();
    }

    /// Records `call`, waits on its hold, and says whether it is scripted to fail.
    async fn enter(&self, call: Call) -> bool {
        let (hold, fail) = {
            let mut s = lock(&self.state);
            if call != Call::LogDrain {
                s.log.push(call);
            }
            let n = {
                let c = s.counts.entry(call).or_insert(0);
                *c += 1;
                *c
            };
            let fail = s.fail_always.contains(&call) || s.fail_nth.contains(&(call, n));
            (s.holds.get(&call).cloned(), fail)
        };
        if let Some(hold) = hold {
            hold.pass().await;
        }
        fail
    }

    async fn host(&self, call: Call) -> Result<(), HostError> {
        if self.enter(call).await {
            return Err(HostError::Failed {
                operation: call.name(),
                source: "scripted failure".into(),
            });
        }
        Ok(())
    }

    async fn guest(&self, call: Call) -> Result<(), GuestError> {
        if !self.enter(call).await {
            return Ok(());
        }
        Err(match call.guest_request() {
            Some(request) => GuestError::Rejected {
                request,
                kind: crate::Rejection::Other,
                message: "scripted failure".into(),
            },
            None => GuestError::Io {
                operation: call.name(),
                source: std::io::Error::other("scripted failure"),
            },
        })
    }
}

/// Creates [`FakeVm`]s sharing its script.
#[derive(Debug, Default)]
pub struct FakeBackend {
    script: Script,
    vms: Mutex<Vec<Arc<FakeVm>>>,
    net: Arc<Mutex<network::FakeHostNet>>,
}

impl FakeBackend {
    /// A backend whose VMs follow `script`.
    pub fn new(script: Script) -> FakeBackend {
        FakeBackend {
            script,
            vms: Mutex::new(Vec::new()),
            net: Arc::default(),
        }
    }
    /// The most recently created VM.
    pub fn last_vm(&self) -> Option<Arc<FakeVm>> {
        lock(&self.vms).last().cloned()
    }
}

#[async_trait]
impl VmBackend for FakeBackend {
    async fn create(&self, id: &str, config: &VmConfig) -> Result<Arc<dyn HostVm>, HostError> {
        self.script.host(Call::Create).await?;
        let net = self.vm_net(config)?;
        let vm = Arc::new(FakeVm {
            id: id.to_string(),
            config: config.clone(),
            script: self.script.clone(),
            exit: watch::channel(None).0,
            successful_releases: Mutex::new(0),
            memory: Mutex::new(None),
            devices: Mutex::new(devices::FakeDevices::cold(config)),
            net: Mutex::new(net),
        });
        lock(&self.vms).push(vm.clone());
        Ok(vm)
    }
}

/// A fake VM: `start` "boots", `wait` resolves once terminated, released or [`FakeVm::exit`]ed.
#[derive(Debug)]
pub struct FakeVm {
    id: String,
    /// The configuration it was created with.
    pub config: VmConfig,
    script: Script,
    exit: watch::Sender<Option<VmExit>>,
    successful_releases: Mutex<usize>,
    memory: Mutex<Option<u64>>,
    devices: Mutex<devices::FakeDevices>,
    net: Mutex<network::FakeVmNet>,
}

impl FakeVm {
    /// The VM process ends by itself (a crash, a guest power-off).
    pub fn exit(&self, exit: VmExit) {
        self.exit.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
    }
    /// How many releases succeeded.
    pub fn successful_releases(&self) -> usize {
        *lock(&self.successful_releases)
    }
    /// The last memory size the controller set.
    pub fn memory(&self) -> Option<u64> {
        *lock(&self.memory)
    }
    /// Whether the VM process has ended.
    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }
}

#[async_trait]
impl VmLifetime for FakeVm {
    fn runtime_id(&self) -> String {
        format!("fake-{}", self.id)
    }
    fn guest_endpoint(&self) -> GuestEndpoint {
        // A path no fake opens, unique per VM, so tests can tell which VM's endpoint the guest
        // link was prepared with.
        GuestEndpoint::HybridVsock {
            uds: PathBuf::from(format!("/nonexistent/uvm-fake/{}/vsock.sock", self.id)),
        }
    }
    async fn start(&self) -> Result<(), HostError> {
        self.script.host(Call::Start).await
    }
    async fn wait(&self) -> VmExit {
        let mut rx = self.exit.subscribe();
        let exit = match rx.wait_for(|e| e.is_some()).await {
            Ok(e) => e.clone(),
            Err(_) => None,
        };
        exit.unwrap_or_else(VmExit::clean)
    }
    async fn terminate(&self) -> Result<(), HostError> {
        self.script.host(Call::Terminate).await?;
        self.exit(VmExit {
            code: Some(0),
            signal: None,
            reason: Some("host-qmp-quit".into()),
        });
        Ok(())
    }
    async fn release(&self) -> Result<(), HostError> {
        self.script.host(Call::Release).await?;
        // The VM process is gone, and what was attached to it with it.
        self.forget_devices();
        self.forget_network();
        self.exit(VmExit {
            code: None,
            signal: Some(9),
            reason: None,
        });
        *lock(&self.successful_releases) += 1;
        Ok(())
    }
}

#[async_trait]
impl VmResources for FakeVm {
    async fn stats(&self) -> Result<HostStats, HostError> {
        self.script.host(Call::HostStats).await?;
        Ok(HostStats {
            memory_current_bytes: None,
            memory_peak_bytes: None,
            cpu_throttling: None,
            cpu_time: std::time::Duration::from_millis(5),
            rss_bytes: 64 << 20,
        })
    }
    async fn set_cpu_group(&self, _group_id: &str) -> Result<(), HostError> {
        self.script.host(Call::SetCpuGroup).await
    }
    async fn update_cpu_limits(&self, _limits: CpuLimits) -> Result<(), HostError> {
        self.script.host(Call::UpdateCpuLimits).await
    }
    async fn update_memory(&self, bytes: u64) -> Result<(), HostError> {
        self.script.host(Call::UpdateMemory).await?;
        *lock(&self.memory) = Some(bytes);
        Ok(())
    }
    fn memory_granularity(&self) -> u64 {
        FAKE_MEMORY_GRANULARITY
    }
    async fn update_cpus(&self, _cpus: u32) -> Result<(), HostError> {
        self.script.host(Call::UpdateCpus).await
    }
}

/// The fake VM's memory granularity: 2 MiB, like virtio-mem's default block size.
pub const FAKE_MEMORY_GRANULARITY: u64 = 2 << 20;

#[derive(Debug)]
struct GuestLinkState {
    prepared: bool,
    health: LinkHealth,
    capabilities: Capabilities,
    exit: ProcessExit,
    stdout: Vec<u8>,
    policy: Option<SecurityPolicy>,
    endpoint: Option<GuestEndpoint>,
    files: HashMap<String, (FileMeta, Vec<u8>)>,
    refusals: HashMap<String, Rejection>,
    /// The signals execs were sent, in order.
    signals: Vec<i32>,
    /// The VM a `shutdown` powers off; `None`: the guest ignores it.
    powers_off: Option<Arc<FakeVm>>,
}

/// A fake guest link. `exec` writes the scripted stdout, then waits until released by a hold or
/// the connection closing (which fails it with [`GuestError::ConnectionLost`]).
#[derive(Debug)]
pub struct FakeGuest {
    script: Script,
    state: Mutex<GuestLinkState>,
    mounts: Mutex<devices::FakeMounts>,
    net: Mutex<network::FakeGuestNet>,
    closed: watch::Sender<u64>,
}

impl FakeGuest {
    /// A guest link that follows `script`.
    pub fn new(script: Script) -> FakeGuest {
        FakeGuest {
            script,
            state: Mutex::new(GuestLinkState {
                prepared: false,
                health: LinkHealth::NotConnected,
                capabilities: Capabilities {
                    names: vec![
                        "exec".into(),
                        "dump-stacks".into(),
                        "stats".into(),
                        "files".into(),
                    ],
                },
                exit: ProcessExit::exited(0),
                stdout: Vec::new(),
                policy: None,
                endpoint: None,
                files: HashMap::new(),
                refusals: HashMap::new(),
                signals: Vec::new(),
                powers_off: None,
            }),
            mounts: Mutex::default(),
            net: Mutex::default(),
            closed: watch::channel(0).0,
        }
    }
    /// Capabilities the next connect advertises.
    pub fn set_capabilities(&self, names: &[&str]) {
        lock(&self.state).capabilities = Capabilities {
            names: names.iter().map(|n| n.to_string()).collect(),
        };
    }
    /// What the next exec prints and returns.
    pub fn set_exec_result(&self, stdout: &[u8], exit_code: i32) {
        self.set_exec_exit(stdout, ProcessExit::exited(exit_code));
    }
    /// What the next exec prints and how it ends (e.g. killed by a signal).
    pub fn set_exec_exit(&self, stdout: &[u8], exit: ProcessExit) {
        let mut s = lock(&self.state);
        s.stdout = stdout.to_vec();
        s.exit = exit;
    }
    /// Whether a connection is open.
    pub fn is_connected(&self) -> bool {
        lock(&self.state).health == LinkHealth::Connected
    }
    /// Whether a listener is prepared and not yet closed.
    pub fn is_prepared(&self) -> bool {
        lock(&self.state).prepared
    }
    /// The security policy the controller applied.
    pub fn policy(&self) -> Option<SecurityPolicy> {
        lock(&self.state).policy.clone()
    }
    /// The endpoint the last listener was prepared for.
    pub fn prepared_endpoint(&self) -> Option<GuestEndpoint> {
        lock(&self.state).endpoint.clone()
    }
    /// The signals delivered to exec'd processes so far, in order.
    pub fn signals(&self) -> Vec<i32> {
        lock(&self.state).signals.clone()
    }
}

/// The guest pid the fake reports for every exec'd process.
pub const FAKE_EXEC_PID: u32 = 4242;

#[async_trait]
impl GuestConnection for FakeGuest {
    async fn prepare_connection(&self, endpoint: &GuestEndpoint) -> Result<(), GuestError> {
        self.script.guest(Call::PrepareConnection).await?;
        let mut state = lock(&self.state);
        state.prepared = true;
        state.endpoint = Some(endpoint.clone());
        Ok(())
    }
    async fn connect(&self) -> Result<GuestInfo, GuestError> {
        let mut closed = self.closed.subscribe();
        closed.mark_unchanged();
        tokio::select! {
            r = self.script.guest(Call::Connect) => r?,
            _ = closed.changed() => return Err(GuestError::ConnectionLost),
        }
        let mut s = lock(&self.state);
        if !s.prepared {
            return Err(GuestError::NotConnected);
        }
        s.health = LinkHealth::Connected;
        Ok(GuestInfo {
            protocol_version: 1,
            agent_version: "fake".into(),
            capabilities: s.capabilities.clone(),
            ..GuestInfo::default()
        })
    }
    async fn close_connection(&self) -> Result<(), GuestError> {
        let r = self.script.guest(Call::CloseConnection).await;
        // Even a failing close collapses the link: pending calls must not hang on it.
        {
            let mut s = lock(&self.state);
            s.prepared = false;
            if s.health == LinkHealth::Connected {
                s.health = LinkHealth::Closed;
            }
        }
        self.closed.send_modify(|n| *n += 1);
        r
    }
    fn capabilities(&self) -> Capabilities {
        lock(&self.state).capabilities.clone()
    }
    fn health(&self) -> LinkHealth {
        lock(&self.state).health
    }
    async fn log_drained(&self) {
        let _ = self.script.enter(Call::LogDrain).await;
    }
}

#[async_trait]
impl GuestExec for FakeGuest {
    async fn exec(&self, mut request: ExecRequest) -> Result<ProcessExit, GuestError> {
        let mut closed = self.closed.subscribe();
        closed.mark_unchanged();
        tokio::select! {
            r = self.script.guest(Call::Exec) => r?,
            _ = closed.changed() => return Err(GuestError::ConnectionLost),
        }
        let (stdout, code) = {
            let s = lock(&self.state);
            if s.health != LinkHealth::Connected {
                return Err(GuestError::NotConnected);
            }
            (s.stdout.clone(), s.exit)
        };
        if let Some(started) = request.started.take() {
            let _ = started.send(FAKE_EXEC_PID);
        }
        // Signals sent before the exec returns are recorded (what a real guest would deliver).
        if let Some(signals) = request.signals.as_mut() {
            while let Ok(signal) = signals.try_recv() {
                lock(&self.state).signals.push(signal);
            }
        }
        if let Some(out) = request.stdout.as_mut() {
            out.write_all(&stdout)
                .await
                .map_err(|source| GuestError::Io {
                    operation: "exec stdout",
                    source,
                })?;
        }
        Ok(code)
    }
}

#[async_trait]
impl GuestDiagnostics for FakeGuest {
    async fn dump_stacks(&self) -> Result<String, GuestError> {
        self.script.guest(Call::DumpStacks).await?;
        Ok("goroutine 1 [running]: fake agent".into())
    }
    async fn stats(&self) -> Result<GuestStats, GuestError> {
        self.script.guest(Call::GuestStats).await?;
        Ok(GuestStats {
            mem_total_bytes: 256 << 20,
            mem_available_bytes: 200 << 20,
            processes: 3,
            ..GuestStats::default()
        })
    }
}

#[async_trait]
impl GuestPolicy for FakeGuest {
    async fn set_security_policy(&self, policy: &SecurityPolicy) -> Result<(), GuestError> {
        self.script.guest(Call::SetSecurityPolicy).await?;
        lock(&self.state).policy = Some(policy.clone());
        Ok(())
    }
    async fn inject_policy_fragment(&self, _fragment: &PolicyFragment) -> Result<(), GuestError> {
        self.script.guest(Call::InjectPolicyFragment).await
    }
}

/// A controller wired to fakes, with handles on the fakes.
#[derive(Debug)]
pub struct Fakes {
    /// The script both fakes follow and record into.
    pub script: Script,
    /// The fake host backend.
    pub backend: Arc<FakeBackend>,
    /// The fake guest link.
    pub guest: Arc<FakeGuest>,
    /// The controller under test, over both.
    pub controller: Controller,
}

impl Fakes {
    /// A NotCreated controller over fresh fakes, with default timeouts.
    pub fn new() -> Fakes {
        Fakes::with_timeouts(Timeouts::default())
    }

    /// A NotCreated controller over fresh fakes, with `timeouts`.
    pub fn with_timeouts(timeouts: Timeouts) -> Fakes {
        let script = Script::default();
        let backend = Arc::new(FakeBackend::new(script.clone()));
        let guest = Arc::new(FakeGuest::new(script.clone()));
        let controller = Controller::new("vm-test", backend.clone(), guest.clone(), timeouts);
        Fakes {
            script,
            backend,
            guest,
            controller,
        }
    }

    /// The fake VM the controller created. Panics before `create_vm` (test helper).
    pub fn vm(&self) -> Arc<FakeVm> {
        self.backend
            .last_vm()
            .expect("the test created a VM before asking for it")
    }

    /// A controller with a created VM (the call log keeps the `Create`); its guest obeys a
    /// `shutdown` by powering the VM off.
    pub async fn created() -> Fakes {
        let f = Fakes::new();
        f.controller
            .create_vm(VmConfig::default())
            .await
            .expect("create on fakes");
        f.guest.obey_shutdown(f.vm());
        assert_eq!(f.controller.state(), State::Created);
        f
    }

    /// A controller with a running VM; the call log is cleared.
    pub async fn running() -> Fakes {
        Fakes::running_with(VmConfig::default()).await
    }

    /// A controller with a VM created with `config` and running; the call log is cleared.
    pub async fn running_with(config: VmConfig) -> Fakes {
        let f = Fakes::new();
        f.controller
            .create_vm(config)
            .await
            .expect("create on fakes");
        f.guest.obey_shutdown(f.vm());
        f.controller.start_vm().await.expect("start on fakes");
        assert_eq!(f.controller.state(), State::Running);
        f.script.clear_log();
        f
    }

    /// A controller with a terminated VM; the call log is cleared.
    pub async fn terminated() -> Fakes {
        let f = Fakes::running().await;
        f.controller
            .terminate_vm()
            .await
            .expect("terminate on fakes");
        assert_eq!(f.controller.state(), State::Terminated);
        f.script.clear_log();
        f
    }

    /// A controller whose start failed (a scripted `Start` failure), so the VM is Invalid; the
    /// call log is cleared.
    pub async fn invalid() -> Fakes {
        let f = Fakes::created().await;
        f.script.fail_nth(Call::Start, 1);
        let err = f
            .controller
            .start_vm()
            .await
            .expect_err("scripted start failure");
        assert!(matches!(err, ControllerError::StartFailed { .. }));
        assert_eq!(f.controller.state(), State::Invalid);
        f.script.clear_log();
        f
    }

    /// Asserts that the whole terminate chain ran — terminate VM, close the guest connection,
    /// release the VM, in that order — and that it ended Terminated.
    pub fn assert_terminated_through_the_whole_chain(&self) {
        assert_eq!(
            self.script.calls(),
            vec![Call::Terminate, Call::CloseConnection, Call::Release],
            "the terminate chain"
        );
        assert_eq!(self.controller.state(), State::Terminated);
    }
}

impl Default for Fakes {
    fn default() -> Self {
        Fakes::new()
    }
}

/// An `AsyncWrite` that keeps what is written, shareable between the test and the writer.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        lock(&self.0).clone()
    }
    /// Everything written so far, lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.0)).into_owned()
    }
    /// A boxed writer for an [`ExecRequest`]'s stdout or stderr.
    pub fn writer(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Unpin> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        lock(&self.0).extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
