//! The ttrpc API (`uvm.agent.v1.Agent`): request checks, and dispatch to the process table,
//! diagnostics and power. [`serve`] runs it on any listener — vsock in the guest, a unix
//! socket in tests.

use std::sync::Arc;
use std::time::Duration;

use uvm_agent_proto::agent::{
    disk_location, AddPolicyFragmentRequest, BootMarks, ConfigureDnsRequest,
    ConfigureInterfaceRequest, DeconfigureInterfaceRequest, DiskLocation, DumpStacksResponse,
    EjectDiskRequest, Empty, ExecRequest, ExecResponse, FileHandle, GuestStatsResponse,
    HandshakeRequest, HandshakeResponse, MountDiskRequest, MountShareRequest, OpenReadRequest,
    OpenReadResponse, OpenWriteRequest, OutputStream, ProcessRef, ReadChunkRequest,
    ReadChunkResponse, ReadOutputRequest, ReadOutputResponse, ResizeRequest, SetPolicyRequest,
    SignalRequest, TerminalSize, UnmountDiskRequest, UnmountShareRequest, WaitPciDeviceRequest,
    WaitResponse, WriteChunkRequest, WriteStdinRequest, WriteStdinResponse,
};
use uvm_agent_proto::ttrpc::r#async::transport::Listener;
use uvm_agent_proto::ttrpc::r#async::{Server, TtrpcContext};
use uvm_agent_proto::{
    agent_ttrpc, async_trait, capabilities, ttrpc, DEFAULT_DEVICE_WAIT_MS, MAX_DEVICE_WAIT_MS,
    MAX_ENTROPY_BYTES, MAX_OUTPUT_CHUNK, MAX_STDIN_CHUNK, PROTOCOL_VERSION,
};
use uvm_policy::Rule;

use crate::clock::{self, BootTimes};
use crate::error::ApiError;
use crate::files::{FileLimits, Files};
use crate::mounts::disk::{self, Location, Sysfs};
use crate::mounts::share;
use crate::mounts::Decide;
use crate::policy::{self, Guard};
use crate::power::{self, ShutdownAction};
use crate::process::{ExecSpec, Processes};
use crate::{entropy, info, stacks, stats, warn};

/// A wall clock further off than this from the host's is corrected at handshake (init only).
const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// What the service may do to the machine.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// PID-1 duties at handshake: credit the host's entropy, correct the wall clock.
    pub system_duties: bool,
    /// What `Shutdown` does.
    pub shutdown: ShutdownAction,
}

/// The API implementation.
#[derive(Debug)]
pub struct AgentService {
    procs: Arc<Processes>,
    files: Arc<Files>,
    boot: Arc<BootTimes>,
    config: ServiceConfig,
    sysfs: Sysfs,
    policy: Arc<Guard>,
}

impl AgentService {
    /// A service over `procs` (whose reaper must be running).
    pub fn new(procs: Arc<Processes>, boot: Arc<BootTimes>, config: ServiceConfig) -> Self {
        AgentService {
            procs,
            files: Files::new(FileLimits::default()),
            boot,
            config,
            sysfs: Sysfs::default(),
            policy: Arc::default(),
        }
    }

    fn handshake_checked(&self, req: &HandshakeRequest) -> Result<HandshakeResponse, ApiError> {
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(ApiError::ProtocolMismatch {
                host: req.protocol_version,
                agent: PROTOCOL_VERSION,
            });
        }
        if req.entropy.len() > MAX_ENTROPY_BYTES {
            return Err(ApiError::invalid(
                "entropy",
                format!(
                    "{} bytes, at most {MAX_ENTROPY_BYTES} allowed",
                    req.entropy.len()
                ),
            ));
        }
        if self.config.system_duties {
            if let Err(e) = entropy::seed(&req.entropy) {
                warn!("cannot seed the entropy pool: {e}");
            }
            if req.host_unix_time_ns != 0 {
                match clock::correct_realtime(req.host_unix_time_ns, CLOCK_TOLERANCE) {
                    Ok(true) => info!("wall clock set from the host's"),
                    Ok(false) => {}
                    Err(e) => warn!("cannot set the wall clock: {e}"),
                }
            }
        }
        let mut boot = BootMarks::new();
        boot.kernel_to_init_ns = clock::nanos(self.boot.agent_start);
        boot.init_to_ready_ns = self.boot.init_to_ready_ns();
        boot.modules_loaded_ns = self
            .boot
            .modules_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut resp = HandshakeResponse::new();
        resp.protocol_version = PROTOCOL_VERSION;
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        resp.capabilities = [
            capabilities::EXEC,
            capabilities::TERMINAL,
            capabilities::EXEC_OUTPUT_LINGER,
            capabilities::DUMP_STACKS,
            capabilities::STATS,
            capabilities::SHUTDOWN,
            capabilities::TERMINAL_RESIZE,
            capabilities::FILES,
            capabilities::DISKS,
            capabilities::SHARES,
            capabilities::POLICY,
            capabilities::NETWORK,
            capabilities::PCI,
        ]
        .map(str::to_owned)
        .to_vec();
        resp.boot = Some(boot).into();
        Ok(resp)
    }

    async fn read_output_checked(
        &self,
        req: &ReadOutputRequest,
    ) -> Result<ReadOutputResponse, ApiError> {
        let max = match req.max_bytes {
            0 => MAX_OUTPUT_CHUNK,
            n if n > MAX_OUTPUT_CHUNK => {
                return Err(ApiError::invalid(
                    "max_bytes",
                    format!("{n}, at most {MAX_OUTPUT_CHUNK} allowed"),
                ))
            }
            n => n,
        };
        let stream = req.stream.enum_value().map_err(|n| {
            ApiError::invalid("stream", format!("{n} is neither STDOUT nor STDERR"))
        })?;
        let proc = self.procs.get(&req.exec_id)?;
        let buf = match stream {
            OutputStream::STDOUT => &proc.stdout,
            OutputStream::STDERR => &proc.stderr,
        };
        let (data, eof) = buf.read(usize::try_from(max).unwrap_or(usize::MAX)).await;
        let mut resp = ReadOutputResponse::new();
        resp.data = data;
        resp.eof = eof;
        Ok(resp)
    }

    async fn write_stdin_checked(
        &self,
        req: &WriteStdinRequest,
    ) -> Result<WriteStdinResponse, ApiError> {
        if req.data.len() > MAX_STDIN_CHUNK {
            return Err(ApiError::invalid(
                "data",
                format!(
                    "{} bytes, at most {MAX_STDIN_CHUNK} allowed",
                    req.data.len()
                ),
            ));
        }
        let proc = self.procs.get(&req.exec_id)?;
        let stdin = proc.stdin.as_ref().ok_or_else(|| ApiError::NoStdin {
            exec_id: req.exec_id.clone(),
        })?;
        let written = stdin.write_all(&req.exec_id, &req.data).await?;
        let mut resp = WriteStdinResponse::new();
        resp.written = u32::try_from(written).unwrap_or(u32::MAX);
        Ok(resp)
    }
}

/// The disk location of a request, checked.
fn location(location: Option<&DiskLocation>) -> Result<Location, ApiError> {
    match location.and_then(|l| l.kind.as_ref()) {
        Some(disk_location::Kind::Scsi(scsi)) => Ok(Location::Scsi {
            controller: scsi.controller,
            lun: scsi.lun,
        }),
        Some(disk_location::Kind::VirtioBlkSerial(serial)) if !serial.is_empty() => {
            Ok(Location::VirtioBlk {
                serial: serial.clone(),
            })
        }
        Some(disk_location::Kind::VirtioBlkSerial(_)) => {
            Err(ApiError::invalid("location", "an empty virtio-blk serial"))
        }
        None => Err(ApiError::invalid("location", "no disk location")),
        // The generated oneof is non-exhaustive: a kind newer than this agent.
        Some(_) => Err(ApiError::invalid(
            "location",
            "a kind this agent does not know",
        )),
    }
}

/// A `MountDiskRequest`, checked (the guest path is checked by the mount).
fn disk_mount(req: MountDiskRequest) -> Result<disk::DiskMount, ApiError> {
    let wait_ms = match req.wait_ms {
        0 => DEFAULT_DEVICE_WAIT_MS,
        n if n > MAX_DEVICE_WAIT_MS => {
            return Err(ApiError::invalid(
                "wait_ms",
                format!("{n}, at most {MAX_DEVICE_WAIT_MS} allowed"),
            ))
        }
        n => n,
    };
    Ok(disk::DiskMount {
        location: location(req.location.as_ref())?,
        guest_path: req.guest_path,
        partition: req.partition,
        read_only: req.read_only,
        fs_type: (!req.fs_type.is_empty()).then_some(req.fs_type),
        options: req.options,
        wait: Duration::from_millis(u64::from(wait_ms)),
    })
}

/// The share a `MountShare` asks for, its fields checked here (the tag and path by
/// [`share::mount_share`]).
fn share_request(req: MountShareRequest) -> Result<share::ShareRequest, ApiError> {
    use uvm_agent_proto::agent::ShareTransport;
    let transport = match req.transport.enum_value() {
        Ok(ShareTransport::VIRTIO_FS) => share::Transport::VirtioFs,
        Ok(ShareTransport::NINE_P) => share::Transport::NineP,
        Err(n) => {
            return Err(ApiError::invalid(
                "transport",
                format!("{n} is neither VIRTIO_FS nor NINE_P"),
            ))
        }
    };
    if req.wait_ms > MAX_DEVICE_WAIT_MS {
        return Err(ApiError::invalid(
            "wait_ms",
            format!("{}, at most {MAX_DEVICE_WAIT_MS} allowed", req.wait_ms),
        ));
    }
    Ok(share::ShareRequest {
        tag: req.tag,
        transport,
        guest_path: req.guest_path,
        read_only: req.read_only,
        wait: Duration::from_millis(u64::from(req.wait_ms)),
    })
}

/// Run a mount request on the blocking pool: it makes system calls that may wait.
async fn blocking_mount(
    f: impl FnOnce() -> Result<(), ApiError> + Send + 'static,
) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::Share(share::ShareError::System {
            what: "run the mount request",
            source: std::io::Error::other(e.to_string()),
        }))
    })
}

/// (rows, columns) of a wire size; `None` for no size or 0×0 (leave the size alone). Either
/// alone being 0, or a value beyond a `u16`, is invalid.
fn terminal_size(size: Option<&TerminalSize>) -> Result<Option<(u16, u16)>, ApiError> {
    let Some(size) = size else {
        return Ok(None);
    };
    let (Ok(rows), Ok(cols)) = (u16::try_from(size.rows), u16::try_from(size.cols)) else {
        return Err(ApiError::invalid(
            "size",
            format!("{}x{} exceeds 65535", size.rows, size.cols),
        ));
    };
    match (rows, cols) {
        (0, 0) => Ok(None),
        (0, _) | (_, 0) => Err(ApiError::invalid(
            "size",
            format!("{rows}x{cols}: rows and columns are both 0 or both set"),
        )),
        _ => Ok(Some((rows, cols))),
    }
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn handshake(
        &self,
        _ctx: &TtrpcContext,
        req: HandshakeRequest,
    ) -> ttrpc::Result<HandshakeResponse> {
        Ok(self.handshake_checked(&req)?)
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecRequest,
    ) -> ttrpc::Result<ExecResponse> {
        let size = terminal_size(req.size.as_ref())?;
        let mut spec = ExecSpec {
            args: req.args,
            env: req.env,
            cwd: req.cwd,
            terminal: req.terminal,
            stdin: req.stdin,
            size,
            program: None,
        };
        spec.validate()?;
        // Resolved once: the policy decides on the very file the spawn runs.
        spec.program = Some(crate::process::program_path(&spec));
        self.policy
            .check(Rule::Exec, || policy::exec_input(&spec))?;
        let proc = self.procs.start(&spec)?;
        let mut resp = ExecResponse::new();
        resp.exec_id = proc.exec_id.clone();
        resp.pid = proc.pid;
        Ok(resp)
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        Ok(self.write_stdin_checked(&req).await?)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: ProcessRef) -> ttrpc::Result<Empty> {
        let proc = self.procs.get(&req.exec_id)?;
        let stdin = proc.stdin.as_ref().ok_or_else(|| ApiError::NoStdin {
            exec_id: req.exec_id.clone(),
        })?;
        stdin.close(&req.exec_id).await?;
        Ok(Empty::new())
    }

    async fn read_output(
        &self,
        _ctx: &TtrpcContext,
        req: ReadOutputRequest,
    ) -> ttrpc::Result<ReadOutputResponse> {
        Ok(self.read_output_checked(&req).await?)
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: ProcessRef,
    ) -> ttrpc::Result<WaitResponse> {
        let exit = self.procs.wait(&req.exec_id).await?;
        let mut resp = WaitResponse::new();
        resp.exit_code = exit.code;
        resp.signal = exit.signal;
        Ok(resp)
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalRequest,
    ) -> ttrpc::Result<Empty> {
        if self.policy.enforced() {
            let proc = self.procs.get(&req.exec_id)?;
            self.policy.check(Rule::Signal, || {
                policy::signal_input(&req.exec_id, req.signal, &proc.args)
            })?;
        }
        self.procs.signal(&req.exec_id, req.signal)?;
        Ok(Empty::new())
    }

    async fn resize_terminal(
        &self,
        _ctx: &TtrpcContext,
        req: ResizeRequest,
    ) -> ttrpc::Result<Empty> {
        let size = terminal_size(req.size.as_ref())?
            .ok_or_else(|| ApiError::invalid("size", "a resize needs rows and columns"))?;
        self.procs.resize(&req.exec_id, size)?;
        Ok(Empty::new())
    }

    async fn open_write(
        &self,
        _ctx: &TtrpcContext,
        req: OpenWriteRequest,
    ) -> ttrpc::Result<FileHandle> {
        self.policy
            .check(Rule::WriteFile, || policy::write_file_input(&req))?;
        let handle = self.files.open_write(&req.path, req.mode, req.size).await?;
        Ok(FileHandle {
            handle,
            ..FileHandle::default()
        })
    }

    async fn write_chunk(
        &self,
        _ctx: &TtrpcContext,
        req: WriteChunkRequest,
    ) -> ttrpc::Result<Empty> {
        self.files
            .write_chunk(&req.handle, req.offset, req.data)
            .await?;
        Ok(Empty::new())
    }

    async fn commit_write(&self, _ctx: &TtrpcContext, req: FileHandle) -> ttrpc::Result<Empty> {
        self.files.commit_write(&req.handle).await?;
        Ok(Empty::new())
    }

    async fn open_read(
        &self,
        _ctx: &TtrpcContext,
        req: OpenReadRequest,
    ) -> ttrpc::Result<OpenReadResponse> {
        self.policy
            .check(Rule::ReadFile, || policy::read_file_input(&req))?;
        let opened = self.files.open_read(&req.path, req.max_size).await?;
        Ok(OpenReadResponse {
            handle: opened.handle,
            mode: opened.mode,
            size: opened.size,
            ..OpenReadResponse::default()
        })
    }

    async fn read_chunk(
        &self,
        _ctx: &TtrpcContext,
        req: ReadChunkRequest,
    ) -> ttrpc::Result<ReadChunkResponse> {
        let data = self
            .files
            .read_chunk(&req.handle, req.offset, req.max_bytes)
            .await?;
        Ok(ReadChunkResponse {
            data,
            ..ReadChunkResponse::default()
        })
    }

    async fn close_file(&self, _ctx: &TtrpcContext, req: FileHandle) -> ttrpc::Result<Empty> {
        self.files.close(&req.handle)?;
        Ok(Empty::new())
    }

    async fn mount_disk(&self, _ctx: &TtrpcContext, req: MountDiskRequest) -> ttrpc::Result<Empty> {
        // Decided on the path asked for (before anything is made), and again on where the
        // mount lands when a symlink leads elsewhere.
        self.policy
            .check(Rule::MountDisk, || policy::mount_disk_input(&req))?;
        let guard = self.policy.clone();
        let (asked, mut input) = (req.guest_path.clone(), policy::mount_disk_input(&req));
        let mount = disk_mount(req)?;
        let decide: Decide = Box::new(move |resolved| {
            if resolved == std::path::Path::new(&asked) {
                return Ok(());
            }
            guard.check(Rule::MountDisk, move || {
                input["guest_path"] = resolved.display().to_string().into();
                input
            })
        });
        disk::mount_disk(&self.sysfs, &mount, decide).await?;
        Ok(Empty::new())
    }

    async fn unmount_disk(
        &self,
        _ctx: &TtrpcContext,
        req: UnmountDiskRequest,
    ) -> ttrpc::Result<Empty> {
        self.policy
            .check(Rule::UnmountDisk, || policy::unmount_input(&req.guest_path))?;
        disk::unmount_disk(req.guest_path).await?;
        Ok(Empty::new())
    }

    async fn eject_disk(&self, _ctx: &TtrpcContext, req: EjectDiskRequest) -> ttrpc::Result<Empty> {
        let location = location(req.location.as_ref())?;
        disk::eject_disk(&self.sysfs, &location)?;
        Ok(Empty::new())
    }

    async fn mount_share(
        &self,
        _ctx: &TtrpcContext,
        req: MountShareRequest,
    ) -> ttrpc::Result<Empty> {
        // Decided on the path asked for (before anything is made), and again on where the
        // mount lands when a symlink leads elsewhere.
        self.policy.check(Rule::MountShare, || {
            policy::mount_share_input(
                &req.tag,
                req.transport.enum_value(),
                &req.guest_path,
                req.read_only,
            )
        })?;
        let guard = self.policy.clone();
        let (tag, transport, read_only) =
            (req.tag.clone(), req.transport.enum_value(), req.read_only);
        let asked = req.guest_path.clone();
        let decide: Decide = Box::new(move |resolved| {
            if resolved == std::path::Path::new(&asked) {
                return Ok(());
            }
            guard.check(Rule::MountShare, || {
                policy::mount_share_input(
                    &tag,
                    transport,
                    &resolved.display().to_string(),
                    read_only,
                )
            })
        });
        let req = share_request(req)?;
        let (tag, path) = (req.tag.clone(), req.guest_path.clone());
        blocking_mount(move || share::mount_share(&req, decide)).await?;
        info!("share {tag:?} mounted at {path}");
        Ok(Empty::new())
    }

    async fn unmount_share(
        &self,
        _ctx: &TtrpcContext,
        req: UnmountShareRequest,
    ) -> ttrpc::Result<Empty> {
        self.policy.check(Rule::UnmountShare, || {
            policy::unmount_input(&req.guest_path)
        })?;
        let path = req.guest_path;
        let shown = path.clone();
        blocking_mount(move || share::unmount_share(&path)).await?;
        info!("share at {shown} unmounted");
        Ok(Empty::new())
    }

    async fn configure_interface(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureInterfaceRequest,
    ) -> ttrpc::Result<Empty> {
        crate::network::configure_interface(&req).await?;
        info!("interface {} configured: {:?}", req.mac, req.addresses);
        Ok(Empty::new())
    }

    async fn deconfigure_interface(
        &self,
        _ctx: &TtrpcContext,
        req: DeconfigureInterfaceRequest,
    ) -> ttrpc::Result<Empty> {
        crate::network::deconfigure_interface(&req).await?;
        info!("interface {} deconfigured", req.mac);
        Ok(Empty::new())
    }

    async fn configure_dns(
        &self,
        _ctx: &TtrpcContext,
        req: ConfigureDnsRequest,
    ) -> ttrpc::Result<Empty> {
        tokio::task::spawn_blocking(move || {
            crate::network::configure_dns(std::path::Path::new("/"), &req)
        })
        .await
        .map_err(|e| ttrpc::Error::Others(format!("the resolver task failed: {e}")))??;
        Ok(Empty::new())
    }

    async fn wait_pci_device(
        &self,
        _ctx: &TtrpcContext,
        req: WaitPciDeviceRequest,
    ) -> ttrpc::Result<Empty> {
        crate::network::wait_pci_device(std::path::Path::new("/sys"), &req).await?;
        Ok(Empty::new())
    }

    async fn set_policy(&self, _ctx: &TtrpcContext, req: SetPolicyRequest) -> ttrpc::Result<Empty> {
        self.policy.set(&req.rego)?;
        Ok(Empty::new())
    }

    async fn add_policy_fragment(
        &self,
        _ctx: &TtrpcContext,
        req: AddPolicyFragmentRequest,
    ) -> ttrpc::Result<Empty> {
        self.policy.add_fragment(&req.rego)?;
        Ok(Empty::new())
    }

    async fn dump_stacks(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<DumpStacksResponse> {
        self.policy
            .check(Rule::DumpStacks, || serde_json::json!({}))?;
        let mut resp = DumpStacksResponse::new();
        resp.text = stacks::dump(&self.procs.snapshot());
        Ok(resp)
    }

    async fn guest_stats(
        &self,
        _ctx: &TtrpcContext,
        _req: Empty,
    ) -> ttrpc::Result<GuestStatsResponse> {
        Ok(stats::collect()?)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        info!("shutdown requested by the host");
        power::schedule(&self.config.shutdown);
        Ok(Empty::new())
    }
}

/// Serves `service` on `listener`; the returned server runs until dropped or shut down.
/// Must be called inside the runtime.
pub async fn serve(listener: Listener, service: AgentService) -> ttrpc::Result<Server> {
    // Ends by itself once the service (and its file table) is gone.
    tokio::spawn(Files::sweep(Arc::downgrade(&service.files)));
    let mut server = Server::new()
        .add_listener(listener)
        .register_service(agent_ttrpc::create_agent(Arc::new(service)));
    server.start().await?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm_agent_proto::agent::ScsiAddress;

    fn scsi(controller: u32, lun: u32) -> DiskLocation {
        DiskLocation {
            kind: Some(disk_location::Kind::Scsi(ScsiAddress {
                controller,
                lun,
                ..ScsiAddress::default()
            })),
            ..DiskLocation::default()
        }
    }

    #[test]
    fn a_mount_request_without_location_or_with_a_huge_wait_is_invalid() {
        let no_location = MountDiskRequest {
            guest_path: "/mnt/d".into(),
            ..MountDiskRequest::default()
        };
        assert!(matches!(
            disk_mount(no_location),
            Err(ApiError::InvalidArgument {
                field: "location",
                ..
            })
        ));
        let empty_serial = DiskLocation {
            kind: Some(disk_location::Kind::VirtioBlkSerial(String::new())),
            ..DiskLocation::default()
        };
        assert!(matches!(
            location(Some(&empty_serial)),
            Err(ApiError::InvalidArgument { .. })
        ));
        let huge = MountDiskRequest {
            location: Some(scsi(0, 1)).into(),
            wait_ms: MAX_DEVICE_WAIT_MS + 1,
            ..MountDiskRequest::default()
        };
        assert!(matches!(
            disk_mount(huge),
            Err(ApiError::InvalidArgument {
                field: "wait_ms",
                ..
            })
        ));
    }

    #[test]
    fn a_mount_request_becomes_a_disk_mount_with_defaults_filled_in() {
        let req = MountDiskRequest {
            location: Some(scsi(2, 5)).into(),
            guest_path: "/mnt/d".into(),
            partition: 1,
            read_only: true,
            options: vec!["noatime".into()],
            ..MountDiskRequest::default()
        };
        let m = disk_mount(req).expect("valid");
        assert_eq!(
            m.location,
            Location::Scsi {
                controller: 2,
                lun: 5
            }
        );
        assert_eq!(m.fs_type, None);
        assert_eq!(
            m.wait,
            Duration::from_millis(u64::from(DEFAULT_DEVICE_WAIT_MS))
        );
        assert_eq!((m.partition, m.read_only), (1, true));
    }
}
