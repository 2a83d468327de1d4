//! The traits the controller drives: small, split by role, composed where the controller needs the
//! whole. The QEMU backend and the vsock guest link implement them; so do the fakes in `testing`.
//!
//! Host side: [`VmBackend`] creates a [`HostVm`] = [`VmLifetime`] + [`VmResources`].
//! Guest side: [`Guest`] = [`GuestConnection`] + [`GuestExec`] + [`GuestDiagnostics`] + [`GuestPolicy`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{GuestError, HostError};
use crate::state::VmExit;

/// What the caller asks for when creating a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub memory_mib: u64,
    pub cpus: u32,
    /// Applied by `start_vm` once the guest is connected; `None` means no policy.
    pub security_policy: Option<SecurityPolicy>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 256,
            cpus: 1,
            security_policy: None,
        }
    }
}

/// An opaque security policy document the guest enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityPolicy(pub String);

/// An opaque policy fragment added to the guest's policy at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFragment(pub String);

/// Where the host reaches the guest; the host VM decides, the guest link uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEndpoint {
    /// Firecracker-style hybrid vsock: a host unix socket that accepts `CONNECT <port>\n`, and
    /// guest-initiated connections to host port P arrive at `<uds>_<P>`.
    HybridVsock { uds: PathBuf },
    /// No guest channel (fakes).
    None,
}

/// CPU limits (weights and caps), mirroring what hypervisors expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuLimits {
    /// Maximum share of the VM's CPUs, in 1/10000 (10000 = no cap).
    pub limit: Option<u32>,
    /// Relative weight against other VMs.
    pub weight: Option<u32>,
}

/// Host-side resource use of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// CPU time consumed by the VM's processes.
    pub cpu_time: Duration,
    /// Resident memory of the VM's processes, in bytes.
    pub rss_bytes: u64,
}

/// Guest-side view of resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub cpu_user: Duration,
    pub cpu_system: Duration,
    pub cpu_idle: Duration,
    pub uptime: Duration,
    pub processes: u32,
}

/// Creates VMs: the host backend's entry point, used by `create_vm`.
#[async_trait]
pub trait VmBackend: Send + Sync {
    /// Describe and reserve a VM (no guest code runs yet). On error nothing is left behind.
    async fn create(&self, id: &str, config: &VmConfig) -> Result<Arc<dyn HostVm>, HostError>;
}

/// The lifetime of one VM on the host.
#[async_trait]
pub trait VmLifetime: Send + Sync {
    /// The backend's id for the running VM (e.g. the runtime directory); stable after create.
    fn runtime_id(&self) -> String;
    /// Where the guest link reaches the guest; known from create, before start.
    fn guest_endpoint(&self) -> GuestEndpoint;
    /// Start the VM process. May leave processes behind on error: `terminate`/`release` clean up.
    async fn start(&self) -> Result<(), HostError>;
    /// Resolve when the VM process has ended. Cancel-safe; may be called more than once.
    async fn wait(&self) -> VmExit;
    /// Ask the VM to stop, forcibly after a deadline. Harmless on a VM that already ended.
    async fn terminate(&self) -> Result<(), HostError>;
    /// Release everything the VM holds: processes, sockets, directories. The final close.
    async fn release(&self) -> Result<(), HostError>;
}

/// Resource control and accounting of one VM on the host.
#[async_trait]
pub trait VmResources: Send + Sync {
    async fn stats(&self) -> Result<HostStats, HostError>;
    async fn set_cpu_group(&self, group_id: &str) -> Result<(), HostError>;
    async fn update_cpu_limits(&self, limits: CpuLimits) -> Result<(), HostError>;
    /// Set the guest's memory to `bytes`, already a multiple of [`VmResources::memory_granularity`].
    async fn update_memory(&self, bytes: u64) -> Result<(), HostError>;
    /// The unit memory sizes are rounded up to (bytes, a power of two).
    fn memory_granularity(&self) -> u64;
}

/// The whole host-side VM, as the controller drives it.
pub trait HostVm: VmLifetime + VmResources {}
impl<T: VmLifetime + VmResources + ?Sized> HostVm for T {}

/// Capabilities the guest advertised in its handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub names: Vec<String>,
}

impl Capabilities {
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
    /// The guest's terminals take a size and follow resizes.
    pub fn terminal_resize(&self) -> bool {
        self.has("terminal-resize")
    }
    /// The guest can report what its agent is doing.
    pub fn dump_stacks(&self) -> bool {
        self.has("dump-stacks")
    }
}

/// What the guest told us when it connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInfo {
    pub protocol_version: u32,
    pub agent_version: String,
    pub capabilities: Capabilities,
    /// Guest boot marks: kernel start → agent start, agent start → ready.
    pub kernel_to_init: Duration,
    pub init_to_ready: Duration,
}

/// Health of the link to the guest, separate from the VM state (as libvirt separates domain state
/// from control state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    NotConnected,
    Connected,
    Lost,
    Closed,
}

/// Connecting to and disconnecting from the guest agent.
#[async_trait]
pub trait GuestConnection: Send + Sync {
    /// Listen for the guest before the VM starts, so its announcement cannot be missed.
    async fn prepare_connection(&self, endpoint: &GuestEndpoint) -> Result<(), GuestError>;
    /// Wait for the guest to announce itself, connect and handshake. No deadline of its own: the
    /// controller bounds it.
    async fn connect(&self) -> Result<GuestInfo, GuestError>;
    /// Close the connection and release anything waiting on it. Idempotent.
    async fn close_connection(&self) -> Result<(), GuestError>;
    /// Capabilities from the handshake (empty before).
    fn capabilities(&self) -> Capabilities;
    fn health(&self) -> LinkHealth;
    /// Resolve once the guest's log stream has been fully forwarded (or there never was one).
    async fn log_drained(&self);
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// A process to run in the guest (not in a container), with its stdio.
pub struct ExecRequest {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub terminal: bool,
    /// A terminal's size: its value when the process starts, then every change while it runs
    /// (the guest process gets SIGWINCH). Only with `terminal`; `None` leaves 80×24.
    pub terminal_size: Option<tokio::sync::watch::Receiver<TerminalSize>>,
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
}

impl std::fmt::Debug for ExecRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecRequest")
            .field("args", &self.args)
            .field("env", &self.env)
            .field("cwd", &self.cwd)
            .field("terminal", &self.terminal)
            .field(
                "terminal_size",
                &self.terminal_size.as_ref().map(|s| *s.borrow()),
            )
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

impl ExecRequest {
    /// A request for `args` with no stdio attached.
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(args: I) -> ExecRequest {
        ExecRequest {
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            terminal: false,
            terminal_size: None,
            stdin: None,
            stdout: None,
            stderr: None,
        }
    }
}

/// Running processes in the guest.
#[async_trait]
pub trait GuestExec: Send + Sync {
    /// Run the process to completion, streaming its stdio; returns its exit code.
    async fn exec(&self, request: ExecRequest) -> Result<i32, GuestError>;
}

/// Looking inside the guest.
#[async_trait]
pub trait GuestDiagnostics: Send + Sync {
    async fn dump_stacks(&self) -> Result<String, GuestError>;
    async fn stats(&self) -> Result<GuestStats, GuestError>;
}

/// Security policy enforcement in the guest.
#[async_trait]
pub trait GuestPolicy: Send + Sync {
    async fn set_security_policy(&self, policy: &SecurityPolicy) -> Result<(), GuestError>;
    async fn inject_policy_fragment(&self, fragment: &PolicyFragment) -> Result<(), GuestError>;
}

/// The whole guest side, as the controller drives it.
pub trait Guest: GuestConnection + GuestExec + GuestDiagnostics + GuestPolicy {}
impl<T: GuestConnection + GuestExec + GuestDiagnostics + GuestPolicy + ?Sized> Guest for T {}
