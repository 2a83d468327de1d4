//! The traits the controller drives: small, split by role, composed where the controller needs the
//! whole. The QEMU backend and the vsock guest link implement them; so do the fakes in `testing`.
//!
//! Host side: [`VmBackend`] creates a [`HostVm`] = [`VmLifetime`] + [`VmResources`] +
//! [`HostDevices`] + [`HostNetwork`] + [`HostPci`].
//! Guest side: [`Guest`] = [`GuestConnection`] + [`GuestExec`] + [`GuestDiagnostics`] + [`GuestPolicy`]
//! + [`GuestFiles`] + [`GuestMounts`] + [`GuestNetwork`] + [`GuestPci`] + [`GuestPower`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{GuestError, HostError};
use crate::state::VmExit;

mod devices;
mod network;
mod pci;
pub use devices::{
    cold_disk_slot, cold_share_tag, DiskCache, DiskConfig, DiskFormat, DiskLocation, DiskMount,
    DiskSpec, GuestMounts, HostDevices, ScsiSlot, ShareConfig, ShareMount, ShareSpec,
    ShareTransport,
};
pub use network::{
    DnsConfig, Endpoint, GuestNetwork, HostNetwork, IpNet, MacAddress, NetworkConfig, NetworkMode,
    Nic, NicBacking, PortPublish, Protocol, Route,
};
pub use pci::{GuestPci, HostPci, PciAddress, PciLocation};

/// What the caller asks for when creating a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Guest memory at boot, in MiB.
    pub memory_mib: u64,
    /// The most memory the guest may grow to, in MiB (q35: a `virtio-mem` device for the rest);
    /// `None`: no hot-add, only the balloon within the boot memory.
    pub max_memory_mib: Option<u64>,
    /// Virtual CPUs at boot.
    pub cpus: u32,
    /// The most vCPUs it may have (q35: hot-pluggable); `None`: as many as at boot.
    pub max_cpus: Option<u32>,
    /// Applied by `start_vm` once the guest is connected; `None` means no policy.
    pub security_policy: Option<SecurityPolicy>,
    /// SCSI controllers for hot-added disks (64 LUNs each); 0 on machines without them.
    pub scsi_controllers: u8,
    /// Disks attached cold at create, the `i`-th at [`cold_disk_slot`]`(i)`.
    pub disks: Vec<DiskSpec>,
    /// Shares added cold at create, the `i`-th under [`cold_share_tag`]`(i)`.
    pub shares: Vec<ShareSpec>,
    /// Refuse writable shares (read-only ones pass).
    pub no_writable_shares: bool,
    /// Its network from the start.
    pub network: NetworkConfig,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_mib: 256,
            max_memory_mib: None,
            cpus: 1,
            max_cpus: None,
            security_policy: None,
            scsi_controllers: 1,
            disks: Vec::new(),
            shares: Vec::new(),
            no_writable_shares: false,
            network: NetworkConfig::default(),
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
    HybridVsock {
        /// The host side of the vsock device (the proxy's listening socket).
        uds: PathBuf,
    },
}

/// CPU limits (weights and caps), mirroring what hypervisors expose. `None` leaves a setting
/// as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuLimits {
    /// Maximum share of the VM's CPUs, in 1/10000: 1–10000 (10000 = no cap).
    pub limit: Option<u32>,
    /// Relative weight against other VMs: 1–10000, 100 by default (cgroup v2's `cpu.weight`).
    pub weight: Option<u32>,
}

impl CpuLimits {
    /// The largest limit and weight.
    pub const MAX: u32 = 10_000;

    /// Why these limits cannot be applied: (the field at fault, the reason); `None` when they can.
    pub fn refusal(&self) -> Option<(&'static str, String)> {
        let out_of_range = |v: Option<u32>| v.is_some_and(|v| v == 0 || v > Self::MAX);
        if self.limit.is_none() && self.weight.is_none() {
            return Some(("cpu limits", "give a limit, a weight or both".to_owned()));
        }
        if out_of_range(self.limit) {
            return Some((
                "cpu limit",
                format!(
                    "{:?} is outside 1..=10000 (1/10000 of the VM's CPUs)",
                    self.limit.unwrap_or(0)
                ),
            ));
        }
        if out_of_range(self.weight) {
            return Some((
                "cpu weight",
                format!("{:?} is outside 1..=10000", self.weight.unwrap_or(0)),
            ));
        }
        None
    }
}

/// Host-side resource use of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// CPU time consumed by the VM's processes (all of them, from its cgroup, where it has one).
    pub cpu_time: Duration,
    /// Resident memory of the VM's processes, in bytes.
    pub rss_bytes: u64,
    /// Memory charged to the VM's cgroup now (the guest RAM it touched, its processes' own,
    /// the page cache of what they read), bytes; `None` without a cgroup.
    pub memory_current_bytes: Option<u64>,
    /// The most ever charged to it, bytes; `None` where the host does not say.
    pub memory_peak_bytes: Option<u64>,
    /// What the VM's CPU limit has held back; `None` without a cgroup.
    pub cpu_throttling: Option<CpuThrottling>,
}

/// What a CPU limit has held back so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuThrottling {
    /// Enforcement periods elapsed while the VM ran.
    pub periods: u64,
    /// Periods in which it used up its quota and had to wait.
    pub throttled_periods: u64,
    /// How long it waited, in all.
    pub throttled_time: Duration,
}

/// Guest-side view of resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestStats {
    /// Memory the guest kernel manages (`MemTotal`).
    pub mem_total_bytes: u64,
    /// Memory available to new work (`MemAvailable`).
    pub mem_available_bytes: u64,
    /// CPU time in user mode, over all guest CPUs.
    pub cpu_user: Duration,
    /// CPU time in kernel mode, over all guest CPUs.
    pub cpu_system: Duration,
    /// Idle CPU time, over all guest CPUs.
    pub cpu_idle: Duration,
    /// Time since the guest kernel booted.
    pub uptime: Duration,
    /// Processes in the guest.
    pub processes: u32,
}

/// Creates VMs: the host backend's entry point, used by `create_vm`.
#[async_trait]
pub trait VmBackend: Send + Sync {
    /// Describe and reserve a VM (no guest code runs yet). On error nothing is left behind.
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] for a configuration the backend cannot run, or the failure
    /// of the reservation.
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
    ///
    /// # Errors
    /// The spawn failed, the VM was already started or is being released, or the VM did not
    /// get ready.
    async fn start(&self) -> Result<(), HostError>;
    /// Resolve when the VM process has ended. Cancel-safe; may be called more than once.
    async fn wait(&self) -> VmExit;
    /// Ask the VM to stop, forcibly after a deadline. Harmless on a VM that already ended.
    ///
    /// # Errors
    /// The VM could not be asked or made to stop; the controller logs it and releases anyway.
    async fn terminate(&self) -> Result<(), HostError>;
    /// Release everything the VM holds: processes, sockets, directories. The final close.
    /// Retryable: a later call finishes what a failed one left.
    ///
    /// # Errors
    /// Something could not be released; the controller leaves the VM Invalid.
    async fn release(&self) -> Result<(), HostError>;
}

/// Resource control and accounting of one VM on the host.
#[async_trait]
pub trait VmResources: Send + Sync {
    /// What the VM's host processes use.
    ///
    /// # Errors
    /// [`HostError::Gone`] when the VM process has ended, or the accounting could not be read.
    async fn stats(&self) -> Result<HostStats, HostError>;
    /// Move the VM into the host CPU group `group_id` (non-empty).
    ///
    /// # Errors
    /// [`HostError::NotFound`] for a group that does not exist, [`HostError::Unsupported`]
    /// where the backend has no CPU groups, or the move failed.
    async fn set_cpu_group(&self, group_id: &str) -> Result<(), HostError>;
    /// Apply CPU caps and weights.
    ///
    /// # Errors
    /// [`HostError::Unsupported`] where the backend cannot limit CPUs, or the change failed.
    async fn update_cpu_limits(&self, limits: CpuLimits) -> Result<(), HostError>;
    /// Set the guest's memory to `bytes`, already a multiple of [`VmResources::memory_granularity`].
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] for a size the VM cannot take, or the change failed.
    async fn update_memory(&self, bytes: u64) -> Result<(), HostError>;
    /// The unit memory sizes are rounded up to (bytes, a power of two).
    fn memory_granularity(&self) -> u64;
    /// Hot-add or hot-remove vCPUs so that the VM has `cpus` (at least 1; the controller
    /// checked). The guest brings added ones online itself.
    ///
    /// # Errors
    /// [`HostError::InvalidInput`] above the VM's maximum, [`HostError::Unsupported`] where
    /// the machine cannot, or the change failed.
    async fn update_cpus(&self, cpus: u32) -> Result<(), HostError>;
}

/// The whole host-side VM, as the controller drives it.
pub trait HostVm: VmLifetime + VmResources + HostDevices + HostNetwork + HostPci {}
impl<T: VmLifetime + VmResources + HostDevices + HostNetwork + HostPci + ?Sized> HostVm for T {}

/// Capabilities the guest advertised in its handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The capability names, as the agent spelled them.
    pub names: Vec<String>,
}

impl Capabilities {
    /// Whether the guest advertised `name`.
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
    /// The guest can copy files to and from the host.
    pub fn files(&self) -> bool {
        self.has("files")
    }
}

/// What the guest told us when it connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestInfo {
    /// The protocol version both sides agreed on.
    pub protocol_version: u32,
    /// The agent's own version.
    pub agent_version: String,
    /// What the agent can do.
    pub capabilities: Capabilities,
    /// Guest boot mark: kernel start → agent start.
    pub kernel_to_init: Duration,
    /// Guest boot mark: agent start → ready.
    pub init_to_ready: Duration,
}

/// Health of the link to the guest, separate from the VM state (as libvirt separates domain state
/// from control state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkHealth {
    /// No connection was made yet.
    NotConnected,
    /// Connected and answering.
    Connected,
    /// The connection broke (the VM exited, or the link collapsed).
    Lost,
    /// The host closed the connection.
    Closed,
}

/// Connecting to and disconnecting from the guest agent.
#[async_trait]
pub trait GuestConnection: Send + Sync {
    /// Listen for the guest before the VM starts, so its announcement cannot be missed.
    ///
    /// # Errors
    /// [`GuestError::Unsupported`] for an endpoint the link cannot use, or the listener could
    /// not be made.
    async fn prepare_connection(&self, endpoint: &GuestEndpoint) -> Result<(), GuestError>;
    /// Wait for the guest to announce itself, connect and handshake. No deadline of its own: the
    /// controller bounds it.
    ///
    /// # Errors
    /// [`GuestError::NotConnected`] without a prepared listener, [`GuestError::Protocol`] for
    /// a guest that speaks something else (another protocol version, garbage), or the
    /// connection failed.
    async fn connect(&self) -> Result<GuestInfo, GuestError>;
    /// Close the connection and release anything waiting on it. Idempotent.
    ///
    /// # Errors
    /// The close failed; the controller logs it and goes on with the release.
    async fn close_connection(&self) -> Result<(), GuestError>;
    /// Capabilities from the handshake (empty before).
    fn capabilities(&self) -> Capabilities;
    /// The link's health now.
    fn health(&self) -> LinkHealth;
    /// Resolve once the guest's log stream has been fully forwarded (or there never was one).
    async fn log_drained(&self);
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// A process to run in the guest (not in a container), with its stdio.
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in the `PATH` of `env`.
    pub args: Vec<String>,
    /// `KEY=VALUE` environment entries.
    pub env: Vec<String>,
    /// The working directory; `None` is `/`.
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal (stdout and stderr merged).
    pub terminal: bool,
    /// A terminal's size: its value when the process starts, then every change while it runs
    /// (the guest process gets SIGWINCH). Only with `terminal`; `None` leaves 80×24.
    pub terminal_size: Option<tokio::sync::watch::Receiver<TerminalSize>>,
    /// Fed to the process's stdin until it ends; `None` gives it an empty stdin.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Receives the process's stdout (and, with a terminal, its stderr); `None` discards it.
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Receives the process's stderr; `None` discards it. Not with a terminal.
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Told the process's guest pid once it exists (before any of its output), so a caller can
    /// tell "started" from "refused"; `None` tells nobody.
    pub started: Option<tokio::sync::oneshot::Sender<u32>>,
    /// Signal numbers to deliver to the process while it runs (the agent's `SignalProcess`);
    /// `None` sends none. Bounded: a sender that outpaces the guest waits (see
    /// [`EXEC_SIGNAL_QUEUE`] for a suitable capacity).
    pub signals: Option<tokio::sync::mpsc::Receiver<i32>>,
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
            .field("started", &self.started.is_some())
            .field("signals", &self.signals.is_some())
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
            started: None,
            signals: None,
        }
    }
}

/// A capacity for [`ExecRequest::signals`]: signals are few and small; more queued than this
/// means the guest is not taking them, and the sender should wait rather than pile them up.
pub const EXEC_SIGNAL_QUEUE: usize = 16;

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessExit {
    /// The status as a shell's `$?` has it: the exit code, or 128 + the signal number.
    pub code: i32,
    /// The signal that ended the process; `None` when it exited by itself (an `exit 137` is
    /// `code` 137 without a signal).
    pub signal: Option<i32>,
}

impl ProcessExit {
    /// A process that exited by itself with `code`.
    pub const fn exited(code: i32) -> ProcessExit {
        ProcessExit { code, signal: None }
    }

    /// A process ended by `signal` (its shell status is 128 + `signal`).
    pub const fn signalled(signal: i32) -> ProcessExit {
        ProcessExit {
            code: 128 + signal,
            signal: Some(signal),
        }
    }
}

/// Running processes in the guest.
#[async_trait]
pub trait GuestExec: Send + Sync {
    /// Run the process to completion, streaming its stdio; returns how it ended. Dropping the
    /// future before it resolves — even while the start request is still in flight — kills the
    /// process (SIGKILL) and reaps it in the guest.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] when the guest refuses to start it (with the kind: not found,
    /// permission denied, …), [`GuestError::Unsupported`] for a terminal size the guest cannot
    /// follow, or the link failed while it ran.
    async fn exec(&self, request: ExecRequest) -> Result<ProcessExit, GuestError>;
}

/// Looking inside the guest.
#[async_trait]
pub trait GuestDiagnostics: Send + Sync {
    /// What the agent's tasks are doing, as text.
    ///
    /// # Errors
    /// The guest refused or the link failed.
    async fn dump_stacks(&self) -> Result<String, GuestError>;
    /// The guest's own view of its memory, CPU time and processes.
    ///
    /// # Errors
    /// The guest refused or the link failed.
    async fn stats(&self) -> Result<GuestStats, GuestError>;
}

/// Security policy enforcement in the guest.
#[async_trait]
pub trait GuestPolicy: Send + Sync {
    /// Make `policy` the guest's security policy.
    ///
    /// # Errors
    /// [`GuestError::Unsupported`] where the guest enforces no policy, or the guest refused it.
    async fn set_security_policy(&self, policy: &SecurityPolicy) -> Result<(), GuestError>;
    /// Add `fragment` to the guest's security policy.
    ///
    /// # Errors
    /// [`GuestError::Unsupported`] where the guest enforces no policy, or the guest refused it.
    async fn inject_policy_fragment(&self, fragment: &PolicyFragment) -> Result<(), GuestError>;
}

/// A file's permission bits and size, as copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Permission bits, at most `0o7777`.
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
}

/// The reader a file is copied in from.
pub type CopySource<'a> = &'a mut (dyn AsyncRead + Send + Unpin);
/// The writer a file is copied out to.
pub type CopySink<'a> = &'a mut (dyn AsyncWrite + Send + Unpin);

/// Copying single files between the host and the guest. Each request to the guest has its own
/// deadline (the link's); a whole copy has none, as it may be large.
#[async_trait]
pub trait GuestFiles: Send + Sync {
    /// Write exactly `meta.size` bytes read from `source` (no more are read) to the absolute
    /// `path` in the guest, with `meta.mode`. A file already there is replaced atomically: a copy
    /// that fails or is dropped half-way leaves the old file (or none), never a partial one.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] when the guest refuses the path (its kind: not found for a missing
    /// parent, permission denied, invalid argument, failed precondition for a directory there,
    /// resource exhausted for a full disk); [`GuestError::Io`] when `source` fails or ends before
    /// `meta.size` bytes; or the link failed.
    async fn copy_in(
        &self,
        path: &str,
        meta: FileMeta,
        source: CopySource<'_>,
    ) -> Result<(), GuestError>;
    /// Read the regular file at the absolute `path` in the guest into `sink`: `on_header` gets
    /// its mode and size first, then `sink` exactly that many bytes. A file above `max_size` is
    /// refused before any data.
    ///
    /// # Errors
    /// [`GuestError::Rejected`] when the guest refuses (not found, permission denied, failed
    /// precondition for a file that is not regular, resource exhausted above `max_size`);
    /// [`GuestError::Protocol`] when the guest sends more or less than it announced;
    /// [`GuestError::Io`] when `sink` fails; or the link failed.
    async fn copy_out(
        &self,
        path: &str,
        max_size: u64,
        on_header: &mut (dyn FnMut(FileMeta) + Send),
        sink: CopySink<'_>,
    ) -> Result<FileMeta, GuestError>;
}

/// Asking the guest to power its VM off cleanly.
#[async_trait]
pub trait GuestPower: Send + Sync {
    /// Ask the guest to flush and power off. Returns once the guest accepted; the VM process
    /// ends afterwards, by itself ([`VmLifetime::wait`] tells when).
    ///
    /// # Errors
    /// [`GuestError::Unsupported`] where the guest cannot power off on request, or the guest
    /// refused, or the link failed.
    async fn shutdown(&self) -> Result<(), GuestError>;
}

/// The whole guest side, as the controller drives it.
pub trait Guest:
    GuestConnection
    + GuestExec
    + GuestDiagnostics
    + GuestPolicy
    + GuestFiles
    + GuestMounts
    + GuestNetwork
    + GuestPci
    + GuestPower
{
}
impl<
        T: GuestConnection
            + GuestExec
            + GuestDiagnostics
            + GuestPolicy
            + GuestFiles
            + GuestMounts
            + GuestNetwork
            + GuestPci
            + GuestPower
            + ?Sized,
    > Guest for T
{
}
