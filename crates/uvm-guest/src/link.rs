//! [`VsockGuest`]: connection management, the log forwarder, and the simple calls.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uvm::seams::{
    Capabilities, CopySink, CopySource, DiskLocation, DiskMount, ExecRequest, FileMeta,
    GuestConnection, GuestDiagnostics, GuestEndpoint, GuestExec, GuestFiles, GuestInfo,
    GuestMounts, GuestPolicy, GuestPower, GuestStats, LinkHealth, PolicyFragment, ProcessExit,
    SecurityPolicy, ShareMount, ShareTransport,
};
use uvm::{GuestError, GuestRequest, Rejection};
use uvm_agent_proto::agent::{AddPolicyFragmentRequest, Empty, HandshakeRequest, SetPolicyRequest};
use uvm_agent_proto::agent_ttrpc::AgentClient;
use uvm_agent_proto::announce::{read_bounded_line, read_ready_line, ReadyError, ReadyLine};
use uvm_agent_proto::{
    capabilities, hybrid_vsock, ttrpc, AGENT_VSOCK_PORT, HOST_ANNOUNCE_PORT, MAX_ENTROPY_BYTES,
    MAX_LOG_LINE, PROTOCOL_VERSION,
};
// Poisoning is recovered from: the link state and the recent log are only ever replaced whole.
use uvm_util::lock;

use crate::hybrid;

/// Tuning of one guest link.
#[derive(Debug, Clone)]
pub struct GuestLinkConfig {
    /// The VM's id, for log lines.
    pub vm_id: String,
    /// Deadline of one request/response (not of a whole exec), default 10 s.
    pub call_timeout: Duration,
    /// After the connection is closed, how long the log forwarder may still drain, default 2 s.
    pub log_drain_grace: Duration,
    /// How many recent guest log lines are kept for diagnosis, default 200.
    pub recent_log_lines: usize,
}

impl GuestLinkConfig {
    /// The defaults for VM `vm_id`: 10 s per call, 2 s of log drain, 200 recent log lines.
    pub fn new(vm_id: impl Into<String>) -> Self {
        GuestLinkConfig {
            vm_id: vm_id.into(),
            call_timeout: Duration::from_secs(10),
            log_drain_grace: Duration::from_secs(2),
            recent_log_lines: 200,
        }
    }
}

/// Guest log lines after a point ([`VsockGuest::log_after`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSlice {
    /// The lines, oldest first.
    pub lines: Vec<String>,
    /// Lines after the point asked for that are no longer kept.
    pub skipped: u64,
    /// The count of lines forwarded so far: the point to ask after next time.
    pub next: u64,
}

/// When the link's milestones happened (host clock), for boot-phase timings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkMarks {
    /// The announce listener was bound.
    pub prepared: Option<Instant>,
    /// The guest's ready line arrived.
    pub announced: Option<Instant>,
    /// The connection to the agent's ttrpc port was open (vsock connected).
    pub connected: Option<Instant>,
    /// The handshake with the agent completed.
    pub handshaken: Option<Instant>,
}

struct LinkState {
    marks: LinkMarks,
    uds: Option<PathBuf>,
    listener: Option<UnixListener>,
    listener_path: Option<PathBuf>,
    client: Option<AgentClient>,
    health: LinkHealth,
    capabilities: Capabilities,
    forwarder_started: bool,
}

pub(crate) struct Shared {
    pub(crate) cfg: GuestLinkConfig,
    state: Mutex<LinkState>,
    /// Cancelled by `close_connection`: releases every pending call.
    pub(crate) closing: CancellationToken,
    drained: watch::Sender<bool>,
    recent_log: Mutex<VecDeque<String>>,
    /// How many guest log lines were ever forwarded; changes with each new line (a follower
    /// waits on it instead of polling).
    log_lines: watch::Sender<u64>,
}

/// The guest link over hybrid vsock + ttrpc. One per VM.
#[derive(Clone)]
pub struct VsockGuest {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for VsockGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockGuest")
            .field("vm", &self.shared.cfg.vm_id)
            .field("health", &self.health())
            .finish()
    }
}

impl VsockGuest {
    /// A link configured by `cfg`, not connected yet: it does no I/O until
    /// [`GuestConnection::prepare_connection`] binds the announce listener.
    pub fn new(cfg: GuestLinkConfig) -> VsockGuest {
        VsockGuest {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(LinkState {
                    marks: LinkMarks::default(),
                    uds: None,
                    listener: None,
                    listener_path: None,
                    client: None,
                    health: LinkHealth::NotConnected,
                    capabilities: Capabilities::default(),
                    forwarder_started: false,
                }),
                closing: CancellationToken::new(),
                drained: watch::channel(false).0,
                recent_log: Mutex::new(VecDeque::new()),
                log_lines: watch::channel(0).0,
            }),
        }
    }

    /// When the link's milestones happened.
    pub fn marks(&self) -> LinkMarks {
        self.state().marks
    }

    /// The last guest log lines (the agent's own log), oldest first.
    pub fn recent_log(&self) -> Vec<String> {
        lock(&self.shared.recent_log).iter().cloned().collect()
    }

    /// The kept guest log lines after the first `seen` ever forwarded, and the count to pass
    /// next time. Lines that fell out of the kept window are skipped: their number is
    /// `skipped`.
    pub fn log_after(&self, seen: u64) -> LogSlice {
        let recent = lock(&self.shared.recent_log);
        let total = *self.shared.log_lines.borrow();
        let oldest_kept = total - recent.len() as u64;
        let from = seen.clamp(oldest_kept, total);
        let skip = usize::try_from(from - oldest_kept).unwrap_or(usize::MAX);
        LogSlice {
            lines: recent.iter().skip(skip).cloned().collect(),
            skipped: from - seen.min(from),
            next: total,
        }
    }

    /// Changes whenever a guest log line is forwarded (its value: the lines forwarded so far).
    pub fn subscribe_log(&self) -> watch::Receiver<u64> {
        self.shared.log_lines.subscribe()
    }

    /// Whether the guest's log stream has ended and was fully forwarded.
    pub fn log_is_drained(&self) -> bool {
        *self.shared.drained.borrow()
    }

    /// Changes once the guest's log stream has ended and was fully forwarded.
    pub fn subscribe_drained(&self) -> watch::Receiver<bool> {
        self.shared.drained.subscribe()
    }

    fn state(&self) -> MutexGuard<'_, LinkState> {
        lock(&self.shared.state)
    }

    pub(crate) fn client(&self) -> Result<AgentClient, GuestError> {
        let s = self.state();
        match (&s.client, s.health) {
            (Some(c), LinkHealth::Connected) => Ok(c.clone()),
            (_, LinkHealth::Lost) => Err(GuestError::ConnectionLost),
            _ => Err(GuestError::NotConnected),
        }
    }

    pub(crate) fn mark_lost(&self) {
        if self.set_lost() {
            tracing::warn!(vm = %self.shared.cfg.vm_id, "guest connection lost");
        }
    }

    /// Connected → Lost; says whether it changed.
    fn set_lost(&self) -> bool {
        let mut s = self.state();
        let was_connected = s.health == LinkHealth::Connected;
        if was_connected {
            s.health = LinkHealth::Lost;
        }
        was_connected
    }

    /// A ttrpc context. Deadlines are ours (a dropped call is abandoned by the client), so the
    /// context carries none: one clock, one error variant.
    pub(crate) fn ctx() -> ttrpc::context::Context {
        ttrpc::context::Context::default()
    }

    /// Runs one RPC: bounded by `timeout` when given, released when the connection closes, errors
    /// mapped (a broken transport marks the link lost).
    pub(crate) async fn call<T, F>(
        &self,
        request: GuestRequest,
        timeout: Option<Duration>,
        fut: F,
    ) -> Result<T, GuestError>
    where
        F: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let bounded = async {
            match timeout {
                Some(after) => match tokio::time::timeout(after, fut).await {
                    Ok(r) => Ok(r),
                    Err(_) => Err(GuestError::Timeout {
                        operation: request.as_str(),
                        after,
                    }),
                },
                None => Ok(fut.await),
            }
        };
        let result = tokio::select! {
            () = self.shared.closing.cancelled() => return Err(GuestError::ConnectionLost),
            r = bounded => r?,
        };
        result.map_err(|e| self.map_ttrpc(request, e))
    }

    /// Whether `e` is the agent's NOT_FOUND (e.g. an exec id it does not know, or no longer
    /// knows).
    pub(crate) fn is_not_found(e: &GuestError) -> bool {
        matches!(
            e,
            GuestError::Rejected {
                kind: Rejection::NotFound,
                ..
            }
        )
    }

    fn map_ttrpc(&self, request: GuestRequest, e: ttrpc::Error) -> GuestError {
        match e {
            ttrpc::Error::RpcStatus(status) => {
                // A deadline the ttrpc layer enforced is still a deadline.
                if status.code() == ttrpc::Code::DEADLINE_EXCEEDED {
                    return GuestError::Timeout {
                        operation: request.as_str(),
                        after: self.shared.cfg.call_timeout,
                    };
                }
                GuestError::Rejected {
                    request,
                    kind: match status.code() {
                        ttrpc::Code::NOT_FOUND => Rejection::NotFound,
                        ttrpc::Code::PERMISSION_DENIED => Rejection::PermissionDenied,
                        ttrpc::Code::INVALID_ARGUMENT => Rejection::InvalidArgument,
                        ttrpc::Code::FAILED_PRECONDITION => Rejection::FailedPrecondition,
                        ttrpc::Code::RESOURCE_EXHAUSTED => Rejection::ResourceExhausted,
                        // The agent's code for "in use, retry once it is not" (EBUSY).
                        ttrpc::Code::UNAVAILABLE => Rejection::Busy,
                        _ => Rejection::Other,
                    },
                    message: format!("{:?}: {}", status.code(), status.message()),
                }
            }
            ttrpc::Error::Socket(_)
            | ttrpc::Error::Eof
            | ttrpc::Error::RemoteClosed
            | ttrpc::Error::LocalClosed
            | ttrpc::Error::Nix(_) => {
                self.mark_lost();
                GuestError::ConnectionLost
            }
            other => {
                // Malformed frames, oversized messages, undecodable payloads.
                self.mark_lost();
                GuestError::Protocol {
                    message: other.to_string(),
                }
            }
        }
    }

    async fn forward_log(self, mut reader: BufReader<UnixStream>) {
        let shared = &self.shared;
        let vm = shared.cfg.vm_id.clone();
        let read_all = async {
            loop {
                match read_bounded_line(&mut reader).await {
                    Ok(Some(line)) => {
                        tracing::info!(target: "uvm_guest::agent", vm = %vm, "{}", line.text);
                        let mut recent = lock(&shared.recent_log);
                        if recent.len() >= shared.cfg.recent_log_lines {
                            recent.pop_front();
                        }
                        recent.push_back(line.text);
                        // Under the lines' lock: a reader sees the count and the lines agree.
                        shared.log_lines.send_modify(|n| *n += 1);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(vm = %vm, error = %e, "guest log stream ended");
                        break;
                    }
                }
            }
        };
        // Read until EOF; once the link is closing, only for a grace period (a vsock proxy does
        // not always propagate the end of the stream).
        let grace = shared.cfg.log_drain_grace;
        let closing = shared.closing.clone();
        tokio::pin!(read_all);
        tokio::select! {
            () = &mut read_all => {}
            () = async { closing.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::debug!(vm = %vm, "stopped draining the guest log after the grace period");
            }
        }
        // The guest's stream ended by itself: the VM is going away (or the agent died). During a
        // terminate this is expected, so it is not a warning here; calls that fail say so.
        if !shared.closing.is_cancelled() && self.set_lost() {
            tracing::info!(vm = %vm, "the guest's log stream ended; link marked lost");
        }
        shared.drained.send_replace(true);
    }
}

#[async_trait]
impl GuestConnection for VsockGuest {
    async fn prepare_connection(&self, endpoint: &GuestEndpoint) -> Result<(), GuestError> {
        let GuestEndpoint::HybridVsock { uds } = endpoint;
        let path = hybrid_vsock::host_port_path(uds, HOST_ANNOUNCE_PORT);
        let listener = UnixListener::bind(&path).map_err(|source| GuestError::Io {
            operation: "bind the guest announce listener",
            source,
        })?;
        let mut s = self.state();
        s.uds = Some(uds.clone());
        s.listener = Some(listener);
        s.listener_path = Some(path);
        s.marks.prepared = Some(Instant::now());
        Ok(())
    }

    async fn connect(&self) -> Result<GuestInfo, GuestError> {
        let (listener, path, uds) = {
            let mut s = self.state();
            match (s.listener.take(), s.uds.clone()) {
                (Some(l), Some(uds)) => (l, s.listener_path.take(), uds),
                _ => return Err(GuestError::NotConnected),
            }
        };
        // The guest announces itself: an event, not a poll. The controller bounds the wait.
        let accepted = tokio::select! {
            () = self.shared.closing.cancelled() => return Err(GuestError::ConnectionLost),
            r = listener.accept() => r,
        };
        drop(listener);
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
        let (stream, _) = accepted.map_err(|source| GuestError::Io {
            operation: "accept the guest announcement",
            source,
        })?;
        let mut reader = BufReader::with_capacity(MAX_LOG_LINE, stream);
        let ready = self.read_ready(&mut reader).await?;
        {
            let mut s = self.state();
            s.forwarder_started = true;
            s.marks.announced = Some(Instant::now());
        }
        tokio::spawn(self.clone().forward_log(reader));

        let port = ready.agent_port().unwrap_or(AGENT_VSOCK_PORT);
        let stream = self
            .connect_step("connect to the agent", hybrid::connect(&uds, port))
            .await?;
        self.state().marks.connected = Some(Instant::now());
        let client = hybrid_vsock::client_from_stream(stream);
        let mut entropy = vec![0u8; MAX_ENTROPY_BYTES.min(64)];
        rustix::rand::getrandom(&mut entropy, rustix::rand::GetRandomFlags::empty()).map_err(
            |e| GuestError::Io {
                operation: "read host entropy",
                source: e.into(),
            },
        )?;
        let request = HandshakeRequest {
            protocol_version: PROTOCOL_VERSION,
            entropy,
            host_unix_time_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .unwrap_or(0),
            ..HandshakeRequest::default()
        };
        let t = self.shared.cfg.call_timeout;
        let response = self
            .call(
                GuestRequest::Handshake,
                Some(t),
                client.handshake(Self::ctx(), &request),
            )
            .await?;
        if response.protocol_version != PROTOCOL_VERSION {
            return Err(GuestError::Protocol {
                message: format!(
                    "the agent answered protocol v{}, we speak v{PROTOCOL_VERSION}",
                    response.protocol_version
                ),
            });
        }
        let capabilities = Capabilities {
            names: response.capabilities.clone(),
        };
        let boot = response.boot.as_ref();
        let info = GuestInfo {
            protocol_version: response.protocol_version,
            agent_version: response.agent_version.clone(),
            capabilities: capabilities.clone(),
            kernel_to_init: Duration::from_nanos(boot.map_or(0, |b| b.kernel_to_init_ns)),
            init_to_ready: Duration::from_nanos(boot.map_or(0, |b| b.init_to_ready_ns)),
        };
        let mut s = self.state();
        if self.shared.closing.is_cancelled() {
            return Err(GuestError::ConnectionLost);
        }
        s.client = Some(client);
        s.capabilities = capabilities;
        s.health = LinkHealth::Connected;
        s.marks.handshaken = Some(Instant::now());
        Ok(info)
    }

    async fn close_connection(&self) -> Result<(), GuestError> {
        self.shared.closing.cancel();
        let (path, forwarder_started) = {
            let mut s = self.state();
            s.client = None;
            s.listener = None;
            if s.health != LinkHealth::Lost {
                s.health = LinkHealth::Closed;
            }
            (s.listener_path.take(), s.forwarder_started)
        };
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
        if !forwarder_started {
            self.shared.drained.send_replace(true);
        }
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        self.state().capabilities.clone()
    }

    fn health(&self) -> LinkHealth {
        self.state().health
    }

    async fn log_drained(&self) {
        let mut rx = self.shared.drained.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }
}

impl VsockGuest {
    /// The guest's ready line, as a step of `connect`.
    async fn read_ready(
        &self,
        reader: &mut BufReader<UnixStream>,
    ) -> Result<ReadyLine, GuestError> {
        const OP: &str = "read the ready line";
        self.connect_step(OP, async {
            read_ready_line(reader).await.map_err(|e| match e {
                ReadyError::Io(source) => GuestError::Io {
                    operation: OP,
                    source,
                },
                other => GuestError::Protocol {
                    message: other.to_string(),
                },
            })
        })
        .await
    }

    /// A step of `connect`, released when the connection closes and bounded by the call
    /// deadline.
    async fn connect_step<T>(
        &self,
        operation: &'static str,
        fut: impl std::future::Future<Output = Result<T, GuestError>>,
    ) -> Result<T, GuestError> {
        let after = self.shared.cfg.call_timeout;
        tokio::select! {
            () = self.shared.closing.cancelled() => Err(GuestError::ConnectionLost),
            r = tokio::time::timeout(after, fut) => r.unwrap_or(Err(GuestError::Timeout { operation, after })),
        }
    }
}

#[async_trait]
impl GuestExec for VsockGuest {
    async fn exec(&self, request: ExecRequest) -> Result<ProcessExit, GuestError> {
        crate::exec::run(self, request).await
    }
}

#[async_trait]
impl GuestPower for VsockGuest {
    /// The agent's `Shutdown`: it syncs, replies, then powers the VM off.
    async fn shutdown(&self) -> Result<(), GuestError> {
        if !self.capabilities().has(capabilities::SHUTDOWN) {
            return Err(GuestError::Unsupported {
                operation: "a guest shutdown on request",
            });
        }
        let client = self.client()?;
        let t = self.shared.cfg.call_timeout;
        self.call(
            GuestRequest::Shutdown,
            Some(t),
            client.shutdown(Self::ctx(), &Empty::new()),
        )
        .await
        .map(drop)
    }
}

#[async_trait]
impl GuestFiles for VsockGuest {
    async fn copy_in(
        &self,
        path: &str,
        meta: FileMeta,
        source: CopySource<'_>,
    ) -> Result<(), GuestError> {
        crate::files::copy_in(self, path, meta, source).await
    }

    async fn copy_out(
        &self,
        path: &str,
        max_size: u64,
        on_header: &mut (dyn FnMut(FileMeta) + Send),
        sink: CopySink<'_>,
    ) -> Result<FileMeta, GuestError> {
        crate::files::copy_out(self, path, max_size, on_header, sink).await
    }
}

#[async_trait]
impl GuestDiagnostics for VsockGuest {
    async fn dump_stacks(&self) -> Result<String, GuestError> {
        let client = self.client()?;
        let t = self.shared.cfg.call_timeout;
        let r = self
            .call(
                GuestRequest::DumpStacks,
                Some(t),
                client.dump_stacks(Self::ctx(), &Empty::new()),
            )
            .await?;
        Ok(r.text)
    }

    async fn stats(&self) -> Result<GuestStats, GuestError> {
        let client = self.client()?;
        let t = self.shared.cfg.call_timeout;
        let r = self
            .call(
                GuestRequest::GuestStats,
                Some(t),
                client.guest_stats(Self::ctx(), &Empty::new()),
            )
            .await?;
        Ok(GuestStats {
            mem_total_bytes: r.mem_total_bytes,
            mem_available_bytes: r.mem_available_bytes,
            cpu_user: Duration::from_nanos(r.cpu_user_ns),
            cpu_system: Duration::from_nanos(r.cpu_system_ns),
            cpu_idle: Duration::from_nanos(r.cpu_idle_ns),
            uptime: Duration::from_nanos(r.uptime_ns),
            processes: u32::try_from(r.processes).unwrap_or(u32::MAX),
        })
    }
}

/// The agent's Rego policy: set once at start, then fragments that add to it.
#[async_trait]
impl GuestPolicy for VsockGuest {
    async fn set_security_policy(&self, policy: &SecurityPolicy) -> Result<(), GuestError> {
        self.require_policy("security policy enforcement")?;
        let client = self.client()?;
        let t = self.shared.cfg.call_timeout;
        let req = SetPolicyRequest {
            rego: policy.0.clone(),
            ..SetPolicyRequest::default()
        };
        self.call(
            GuestRequest::SetSecurityPolicy,
            Some(t),
            client.set_policy(Self::ctx(), &req),
        )
        .await
        .map(drop)
    }

    async fn inject_policy_fragment(&self, fragment: &PolicyFragment) -> Result<(), GuestError> {
        self.require_policy("security policy fragments")?;
        let client = self.client()?;
        let t = self.shared.cfg.call_timeout;
        let req = AddPolicyFragmentRequest {
            rego: fragment.0.clone(),
            ..AddPolicyFragmentRequest::default()
        };
        self.call(
            GuestRequest::InjectPolicyFragment,
            Some(t),
            client.add_policy_fragment(Self::ctx(), &req),
        )
        .await
        .map(drop)
    }
}

impl VsockGuest {
    /// Unsupported unless the agent enforces policies.
    fn require_policy(&self, operation: &'static str) -> Result<(), GuestError> {
        if self.capabilities().has(capabilities::POLICY) {
            Ok(())
        } else {
            Err(GuestError::Unsupported { operation })
        }
    }
}

/// Disks and shares through the agent's mount requests (modules `disks` and `shares`).
#[async_trait]
impl GuestMounts for VsockGuest {
    async fn mount_disk(
        &self,
        location: &DiskLocation,
        mount: &DiskMount,
    ) -> Result<(), GuestError> {
        crate::disks::mount(self, location, mount).await
    }

    async fn unmount_disk(&self, guest_path: &str) -> Result<(), GuestError> {
        crate::disks::unmount(self, guest_path).await
    }

    async fn eject_disk(&self, location: &DiskLocation) -> Result<(), GuestError> {
        crate::disks::eject(self, location).await
    }

    async fn mount_share(
        &self,
        tag: &str,
        transport: ShareTransport,
        mount: &ShareMount,
    ) -> Result<(), GuestError> {
        crate::shares::mount(self, tag, transport, mount).await
    }

    async fn unmount_share(&self, guest_path: &str) -> Result<(), GuestError> {
        crate::shares::unmount(self, guest_path).await
    }
}
