//! [`QemuBackend`] (the seam's `VmBackend`) and [`QemuVm`] (`VmLifetime` + `VmResources`): the
//! runtime directory, the supervisor thread, QMP, and the operations the controller drives.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rustix::process::Signal;
use uvm::seams::{
    CpuLimits, CpuThrottling, GuestEndpoint, HostStats, HostVm, VmBackend, VmConfig, VmLifetime,
    VmResources,
};
use uvm::{HostError, VmExit};
use uvm_util::{lock, short_id};

use crate::cgroup::{self, Placement};
use crate::cmdline::{
    qemu_command_line, vhost_vsock_command_line, QemuCommand, RuntimePaths, VIRTIO_MEM_BLOCK,
};
use crate::disks::{self, DiskTable};
use crate::error::QemuError;
use crate::network::Network;
use crate::qmp::{QmpClient, QmpError, QmpEvent, QmpObserver, QueryBalloon, Quit};
use crate::shares::{self, ShareHost, Shares};
use crate::stats;
use crate::supervisor::{self, BootMarks, Launch, QemuState, Shared, Which};
use crate::{AccelKind, Machine, QemuConfig};

/// Smallest guest the backend creates (a Linux guest with an agent needs about this much).
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most vCPUs the backend gives a guest.
pub const MAX_CPUS: u32 = 64;
/// The unit of memory updates. The balloon moves 4 KiB pages; whole MiB keep sizes in the unit
/// `-m` uses and are far below anything a guest notices.
pub const MEMORY_GRANULARITY: u64 = 1 << 20;
/// Longest unix socket path (`sun_path` is 108 bytes with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Bound on QMP handshakes and commands other than `quit`.
pub(crate) const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a SIGKILLed child may take to be reaped.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Creates QEMU VMs.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    config: Arc<QemuConfig>,
    accel: AccelKind,
    /// Clock arguments for guests under TCG ([`uvm_host::tcg_kernel_args`]), when measurable.
    tcg_clock: Option<String>,
}

impl QemuBackend {
    /// A backend running VMs as `config` says; [`crate::Accel::Auto`] is resolved here, once.
    pub fn new(config: QemuConfig) -> Self {
        let accel = config.accel.resolve();
        // Under TCG the guest's TSC is the host's: hand its frequency over, so the guest neither
        // calibrates badly (q35) nor hangs calibrating (microvm). See `uvm_host::tsc`.
        let tcg_clock = match accel {
            AccelKind::Kvm => None,
            AccelKind::Tcg => match uvm_host::tcg_kernel_args_with(config.tsc_cache.as_deref()) {
                Ok(args) => Some(args),
                Err(e) => {
                    tracing::warn!(error = %e, "no TSC frequency for TCG guests");
                    None
                }
            },
        };
        tracing::info!(accel = accel.as_str(), machine = %config.machine, "QEMU backend ready");
        QemuBackend {
            config: Arc::new(config),
            accel,
            tcg_clock,
        }
    }

    /// The configuration this backend was made with.
    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator every VM of this backend uses.
    pub fn accel(&self) -> AccelKind {
        self.accel
    }

    fn share_host(&self) -> ShareHost<'_> {
        ShareHost {
            machine: self.config.machine,
            virtiofsd: self.config.virtiofsd.as_deref(),
            spare_ports: self.config.share_hotplug_ports,
        }
    }

    /// The exact QEMU arguments this backend runs a VM with (machine, firmware, clock arguments
    /// under TCG, root ports, cold shares, and the device ports and user-mode NIC): what the
    /// benchmark's "floor" runs by hand. A namespace's NICs are left out (their taps exist
    /// only once `create_vm` made them).
    pub fn qemu_args(&self, paths: &RuntimePaths, config: &VmConfig) -> Vec<String> {
        let mut args = self.base_args(paths, config);
        let mut printable = config.clone();
        if let uvm::seams::NetworkMode::Namespace { .. } = printable.network.mode {
            printable.network.mode = uvm::seams::NetworkMode::None;
        }
        match self.printable_network_args(&printable) {
            Ok(net) => args.extend(net),
            Err(e) => {
                tracing::warn!(error = %uvm_util::error_chain(&e), "QEMU arguments without the network")
            }
        }
        args
    }

    /// The arguments before the network's.
    fn base_args(&self, paths: &RuntimePaths, config: &VmConfig) -> Vec<String> {
        let c = &self.config;
        let mut extra_cmdline = String::new();
        if let Some(clock) = &self.tcg_clock {
            extra_cmdline.push_str(clock);
            extra_cmdline.push(' ');
        }
        extra_cmdline.push_str(&c.extra_cmdline);
        let plan = self.share_host().plan(config);
        let mut args = qemu_command_line(&QemuCommand {
            kernel: &c.kernel,
            initramfs: &c.initramfs,
            accel: self.accel,
            machine: c.machine,
            bios: (c.machine == Machine::Microvm).then_some(c.qboot.as_path()),
            memory_mib: config.memory_mib,
            max_memory_mib: config.max_memory_mib,
            cpus: config.cpus,
            max_cpus: config.max_cpus,
            paths,
            extra_cmdline: &extra_cmdline,
            disk_args: &disks::command_line(c.machine, config.scsi_controllers, &config.disks),
        });
        args.extend(shares::qemu_args(&plan, c.machine, paths));
        args
    }

    /// Exactly what [`QemuBackend::create_vm`] would run for `config`, with the runtime files
    /// under `dir` (which is neither created nor used), after the same checks: to run or
    /// profile a VM by hand without a copy of the command line that drifts from ours.
    ///
    /// # Errors
    ///
    /// [`HostError::InvalidInput`] when `config` or the backend's configuration fails the checks
    /// of [`QemuBackend::create_vm`] (memory, CPUs, kernel, initramfs, binaries, qboot), or
    /// `dir` contains a comma or is too long for its socket paths; [`HostError::Io`] when `dir`
    /// cannot be made absolute.
    pub fn command_lines(&self, dir: &Path, config: &VmConfig) -> Result<CommandLines, HostError> {
        self.check(config)?;
        let dir = std::path::absolute(dir).map_err(|source| HostError::Io {
            operation: "resolve the runtime directory",
            source,
        })?;
        check_runtime_dir("runtime directory", &dir, &dir)?;
        let paths = RuntimePaths::new(&dir);
        let program = |p: &Path| p.display().to_string();
        let c = &self.config;
        Ok(CommandLines {
            vhost_vsock: std::iter::once(program(&c.vhost_vsock))
                .chain(vhost_vsock_command_line(&paths))
                .collect(),
            qemu: std::iter::once(program(&c.qemu))
                .chain(self.base_args(&paths, config))
                .chain(self.printable_network_args(config)?)
                .collect(),
        })
    }

    /// The network part of the QEMU arguments `create_vm` adds, for a VM whose NICs need
    /// nothing made on the host (none, user-mode); a namespace's taps exist only once made.
    fn printable_network_args(&self, config: &VmConfig) -> Result<Vec<String>, HostError> {
        if let uvm::seams::NetworkMode::Namespace { path } = &config.network.mode {
            return Err(invalid(
                "network",
                format!(
                    "a VM in the namespace {} has taps made at create, which a printed command line cannot hold",
                    path.display()
                ),
            ));
        }
        let cold = Network::cold(
            self.config.machine,
            self.config.device_hotplug_ports,
            config,
        )?;
        Ok(self.network_args(config, cold.args, &cold.network))
    }

    /// The ACPI-hotplug switch when only the device ports need it, then `cold_args`.
    fn network_args(
        &self,
        config: &VmConfig,
        cold_args: Vec<String>,
        network: &Network,
    ) -> Vec<String> {
        let mut args = Vec::new();
        if self.share_host().plan(config).ports == 0 && network.ports() > 0 {
            args.extend(shares::acpi_hotplug_off());
        }
        args.extend(cold_args);
        args
    }

    /// The checks that do not depend on where the VM's files go; the guest memory in bytes.
    fn check(&self, config: &VmConfig) -> Result<u64, HostError> {
        let c = &self.config;
        let memory_bytes = validate(c, config)?;
        disks::check_cold(c.machine, config.scsi_controllers, &config.disks)?;
        for spec in &config.shares {
            shares::check_host_dir(&spec.share)?;
        }
        if c.machine == Machine::Microvm {
            if !c.qboot.is_file() {
                return Err(invalid(
                    "machine",
                    format!(
                        "microvm needs the qboot firmware, and {} does not exist (package qemu-system-data)",
                        c.qboot.display()
                    ),
                ));
            }
            if self.accel == AccelKind::Tcg && self.tcg_clock.is_none() {
                return Err(invalid(
                    "machine",
                    "microvm under TCG needs the host TSC frequency, which could not be measured"
                        .to_owned(),
                ));
            }
        }
        Ok(memory_bytes)
    }

    /// [`QemuBackend::create_vm`] off the async threads when it has a namespace's taps to make
    /// (threads that enter the namespace, netlink round trips).
    ///
    /// # Errors
    /// As [`QemuBackend::create_vm`].
    pub async fn create_vm_async(&self, id: &str, config: &VmConfig) -> Result<QemuVm, HostError> {
        if !matches!(
            config.network.mode,
            uvm::seams::NetworkMode::Namespace { .. }
        ) {
            return self.create_vm(id, config);
        }
        let (this, id, config) = (self.clone(), id.to_owned(), config.clone());
        tokio::task::spawn_blocking(move || this.create_vm(&id, &config))
            .await
            .map_err(|e| HostError::Failed {
                operation: "create VM",
                source: Box::new(e),
            })?
    }

    /// [`VmBackend::create`] with the concrete type: checks the request, makes the VM's runtime
    /// directory (mode 0700, with its owner record) and prepares the command lines. Nothing is
    /// spawned until [`VmLifetime::start`].
    ///
    /// # Errors
    ///
    /// [`HostError::InvalidInput`] when memory or CPUs are out of range, the kernel or
    /// initramfs is not a file, a binary is not executable, microvm lacks qboot or (under TCG)
    /// the host TSC frequency, or the runtime root contains a comma or is too long for socket
    /// paths; [`HostError::Io`] when the runtime directory cannot be made or recorded.
    #[tracing::instrument(skip_all, fields(vm = %id, op = "create"))]
    pub fn create_vm(&self, id: &str, config: &VmConfig) -> Result<QemuVm, HostError> {
        let c = &self.config;
        let memory_bytes = self.check(config)?;
        let root = std::path::absolute(&c.runtime_root).map_err(|source| HostError::Io {
            operation: "resolve the runtime root",
            source,
        })?;
        let prefix = format!("uvm-{}-", short_id(id, 12));
        check_runtime_dir("runtime root", &root, &root.join(format!("{prefix}XXXXXX")))?;
        // On any error below, the TempDir's drop removes the directory: nothing is left behind.
        let dir = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(6)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(&root)
            .map_err(|source| HostError::Io {
                operation: "create the runtime directory",
                source,
            })?;
        // The owner record lets a later sweep tell this directory from one whose controller died.
        crate::stale::write_owner(dir.path()).map_err(|source| HostError::Io {
            operation: "record the runtime directory's owner",
            source,
        })?;
        let paths = RuntimePaths::new(dir.path());
        let share_host = self.share_host();
        let plan = share_host.plan(config);
        let helpers = match (&c.virtiofsd, share_host.transport()) {
            (Some(virtiofsd), uvm::seams::ShareTransport::VirtioFs) => plan
                .cold
                .iter()
                .map(|s| shares::helper_launch(virtiofsd, s.id, &s.config, &paths))
                .collect(),
            _ => Vec::new(),
        };
        // Its cgroup, named after the runtime directory (unique), before any process exists.
        let name = dir.path().file_name().map_or_else(
            || short_id(id, 12).to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let placement = Placement::make(c.cgroup_parent.as_deref(), &name)?;
        let shared = placement
            .cgroup()
            .map(uvm_cgroup::VmCgroup::joiner)
            .transpose()
            .map_err(|e| cgroup::host_error("open the VM's cgroup", e))
            .and_then(|joiner| {
                Shared::new(paths.clone(), joiner).map_err(|source| HostError::Io {
                    operation: "create the supervisor's wake-up",
                    source,
                })
            });
        let shared = match shared {
            Ok(s) => s,
            Err(e) => {
                let _ = placement.release();
                return Err(e);
            }
        };
        // The NICs given at create: taps made and joined in their namespace now, so that a
        // namespace that does not hold is refused before anything runs.
        let cold_net = match Network::cold(c.machine, c.device_hotplug_ports, config) {
            Ok(n) => n,
            Err(e) => {
                let _ = placement.release();
                return Err(e);
            }
        };
        let mut qemu_args = self.base_args(&paths, config);
        qemu_args.extend(self.network_args(config, cold_net.args, &cold_net.network));
        let launch = Launch {
            vsock_program: c.vhost_vsock.clone(),
            vsock_args: vhost_vsock_command_line(&paths),
            helpers,
            qemu_program: c.qemu.clone(),
            qemu_args,
            qemu_fds: cold_net.fds,
        };
        let runtime_dir = dir.keep();
        tracing::info!(dir = %runtime_dir.display(), "VM created");
        Ok(QemuVm {
            id: id.to_owned(),
            memory_bytes,
            max_memory_bytes: config.max_memory_mib.map(|m| m << 20),
            machine: c.machine,
            accel: self.accel,
            grace: c.terminate_grace,
            shared: Arc::new(shared),
            placement: Arc::new(Mutex::new(placement)),
            resources: Arc::new(Mutex::new(CpuLimits::default())),
            cpus: config.cpus,
            vcpus: std::sync::atomic::AtomicU32::new(config.cpus),
            max_cpus: config.max_cpus.unwrap_or(config.cpus),
            shares: Shares::new(&share_host, &plan),
            network: cold_net.network,
            launch,
            runtime_dir,
            qmp: tokio::sync::Mutex::new(None),
            scsi_controllers: match c.machine {
                Machine::Q35 => config.scsi_controllers,
                Machine::Microvm => 0,
            },
            disks: DiskTable::new(disks::cold_table(&config.disks)),
            supervisor: Mutex::new(None),
        })
    }
}

#[async_trait]
impl VmBackend for QemuBackend {
    async fn create(&self, id: &str, config: &VmConfig) -> Result<Arc<dyn HostVm>, HostError> {
        Ok(Arc::new(self.create_vm_async(id, config).await?))
    }
}

/// The two programs a VM runs, each as its program path followed by its arguments.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CommandLines {
    /// vhost-device-vsock, which runs first.
    pub vhost_vsock: Vec<String>,
    /// QEMU, which runs once vhost-device-vsock listens.
    pub qemu: Vec<String>,
}

/// Whether a VM's files can live in `dir` (absolute), which is in `what` (the runtime root,
/// or the directory itself): QEMU options cannot carry a comma, and every socket path must fit
/// `sun_path`.
fn check_runtime_dir(what: &'static str, shown: &Path, dir: &Path) -> Result<(), HostError> {
    if dir.to_string_lossy().contains(',') {
        return Err(invalid(
            what,
            format!(
                "{} contains a comma, which QEMU options cannot carry",
                shown.display()
            ),
        ));
    }
    let longest = RuntimePaths::longest_socket_path(dir);
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(invalid(
            what,
            format!(
                "{} is too long: socket paths such as {} exceed {MAX_SOCKET_PATH} bytes",
                shown.display(),
                longest.display()
            ),
        ));
    }
    Ok(())
}

fn invalid(what: &'static str, message: String) -> HostError {
    HostError::InvalidInput { what, message }
}

/// Check the request and the files it needs; the guest memory in bytes.
fn validate(c: &QemuConfig, config: &VmConfig) -> Result<u64, HostError> {
    if config.memory_mib < MIN_MEMORY_MIB {
        return Err(invalid(
            "memory size",
            format!(
                "{} MiB is below the minimum of {MIN_MEMORY_MIB} MiB",
                config.memory_mib
            ),
        ));
    }
    let memory_bytes = config.memory_mib.checked_mul(1 << 20).ok_or_else(|| {
        invalid(
            "memory size",
            format!("{} MiB is too large", config.memory_mib),
        )
    })?;
    if let Some(max) = config.max_memory_mib {
        let block_mib = VIRTIO_MEM_BLOCK >> 20;
        if c.machine != Machine::Q35 {
            return Err(invalid(
                "memory maximum",
                "microvm has no virtio-mem: its memory can only be ballooned below the boot size"
                    .to_owned(),
            ));
        }
        if max <= config.memory_mib {
            return Err(invalid(
                "memory maximum",
                format!(
                    "{max} MiB is not above the boot memory of {} MiB",
                    config.memory_mib
                ),
            ));
        }
        if max.checked_mul(1 << 20).is_none() {
            return Err(invalid("memory maximum", format!("{max} MiB is too large")));
        }
        if !config.memory_mib.is_multiple_of(block_mib) || !max.is_multiple_of(block_mib) {
            return Err(invalid(
                "memory maximum",
                format!("with a maximum, the boot memory and the maximum must be multiples of {block_mib} MiB (virtio-mem's block)"),
            ));
        }
    }
    if !(1..=MAX_CPUS).contains(&config.cpus) {
        return Err(invalid(
            "CPU count",
            format!("{} is outside 1..={MAX_CPUS}", config.cpus),
        ));
    }
    if let Some(max) = config.max_cpus {
        if c.machine != Machine::Q35 {
            return Err(invalid(
                "CPU maximum",
                "microvm cannot hot-add vCPUs".to_owned(),
            ));
        }
        if !(config.cpus..=MAX_CPUS).contains(&max) {
            return Err(invalid(
                "CPU maximum",
                format!("{max} is outside {}..={MAX_CPUS}", config.cpus),
            ));
        }
    }
    for (what, path) in [("kernel", &c.kernel), ("initramfs", &c.initramfs)] {
        if !path.is_file() {
            return Err(invalid(
                what,
                format!("{} is not a readable file", path.display()),
            ));
        }
    }
    for (what, path) in [
        ("QEMU binary", &c.qemu),
        ("vhost-device-vsock binary", &c.vhost_vsock),
    ] {
        let executable = std::fs::metadata(path)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if !executable {
            return Err(invalid(
                what,
                format!("{} is not an executable file", path.display()),
            ));
        }
    }
    Ok(memory_bytes)
}

/// One QEMU VM: its runtime directory and, once started, its two processes.
#[derive(Debug)]
pub struct QemuVm {
    id: String,
    memory_bytes: u64,
    /// The most the guest may grow to (virtio-mem above `memory_bytes`); `None`: no hot-add.
    max_memory_bytes: Option<u64>,
    machine: Machine,
    accel: AccelKind,
    grace: Duration,
    shared: Arc<Shared>,
    /// Its cgroup, if it has one (replaced when it moves into a CPU group).
    placement: Arc<Mutex<Placement>>,
    /// The CPU limits last set (applied again after a move into a CPU group or a vCPU change);
    /// held while either changes, so a limit and a move never interleave.
    resources: Arc<Mutex<CpuLimits>>,
    /// Its vCPUs now (a CPU limit is a share of them).
    vcpus: std::sync::atomic::AtomicU32,
    /// Its vCPUs at boot (what a CPU limit is a share of).
    cpus: u32,
    /// The most it may have (its boot count without hot-add).
    max_cpus: u32,
    /// Its shared directories.
    pub(crate) shares: Shares,
    /// Its NICs and assigned PCI devices.
    pub(crate) network: Network,
    launch: Launch,
    runtime_dir: PathBuf,
    /// The negotiated QMP connection; (re)made on demand while QEMU runs.
    qmp: tokio::sync::Mutex<Option<Arc<QmpClient>>>,
    /// The SCSI controllers QEMU has (none on microvm).
    pub(crate) scsi_controllers: u8,
    /// The disks attached, hot or cold.
    pub(crate) disks: DiskTable,
    /// Only ever replaced whole, so it is used across a poisoning ([`lock`]).
    supervisor: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Records QEMU's SHUTDOWN reason for the exit status, and hands every event to those waiting
/// for one (`Shared::events`: subscribe, then ask).
struct EventObserver {
    shared: Arc<Shared>,
}

impl QmpObserver for EventObserver {
    fn event(&self, event: &QmpEvent) {
        if let Some(shutdown) = event.shutdown() {
            tracing::info!(reason = %shutdown.reason, guest = shutdown.guest, "QEMU shutting down");
            self.shared.record_shutdown(shutdown.reason);
        }
        // Nobody waiting is the usual case.
        let _ = self.shared.events.send(event.clone());
    }
}

impl QemuVm {
    /// CPU time and RSS of QEMU and vhost-device-vsock, from `/proc`.
    fn process_stats(&self) -> Result<HostStats, HostError> {
        let procs = self.shared.lock();
        if procs.qemu_state() != QemuState::Running {
            return Err(HostError::Gone);
        }
        // Read under the lock: the supervisor cannot reap (and the PID cannot be reused) meanwhile.
        let mut total = HostStats::default();
        for which in [Which::Qemu, Which::Vsock] {
            let Some(p) = procs.get(which).filter(|p| !p.reaped) else {
                continue;
            };
            match stats::process_stats(p.pid) {
                Ok(s) => total = stats::add(total, s),
                Err(procfs::ProcError::NotFound(_)) if which == Which::Vsock => {}
                Err(procfs::ProcError::NotFound(_)) => return Err(HostError::Gone),
                Err(e) => {
                    return Err(HostError::Failed {
                        operation: "read process statistics",
                        source: format!("{} (pid {}): {e}", which.name(), p.pid).into(),
                    })
                }
            }
        }
        Ok(total)
    }

    /// The VM's cgroup: `v1 /uvmctl/<runtime dir name>` (its version and its path in each
    /// hierarchy), or `none: <why>`.
    pub fn cgroup_description(&self) -> String {
        lock(&self.placement).describe()
    }

    /// The VM's cgroup directories, one per hierarchy (none without a cgroup).
    pub fn cgroup_paths(&self) -> Vec<PathBuf> {
        lock(&self.placement)
            .cgroup()
            .map(uvm_cgroup::VmCgroup::paths)
            .unwrap_or_default()
    }

    /// The guest's memory at boot, bytes.
    pub(crate) fn boot_memory(&self) -> u64 {
        self.memory_bytes
    }

    /// The most it may grow to, bytes (`None`: no hot memory).
    pub(crate) fn max_memory(&self) -> Option<u64> {
        self.max_memory_bytes
    }

    /// QEMU's PID once spawned (it stays `Some` after QEMU exits and is reaped).
    pub fn qemu_pid(&self) -> Option<u32> {
        self.shared.lock().get(Which::Qemu).map(|p| p.pid)
    }

    /// vhost-device-vsock's PID once spawned (it stays `Some` after it exits and is reaped).
    pub fn vsock_pid(&self) -> Option<u32> {
        self.shared.lock().get(Which::Vsock).map(|p| p.pid)
    }

    /// The PIDs of the helpers (virtiofsd, one per virtio-fs share) running or not yet
    /// forgotten.
    pub fn helper_pids(&self) -> Vec<u32> {
        self.shared.lock().helpers.values().map(|p| p.pid).collect()
    }

    /// The tags of the VM's shares now.
    pub fn share_tags(&self) -> Vec<String> {
        self.shares.entries().into_iter().map(|e| e.tag).collect()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The VM's private runtime directory (`<runtime_root>/uvm-<id>-<random>`).
    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// The files of the runtime directory (sockets, console log, process logs).
    pub fn paths(&self) -> &RuntimePaths {
        &self.shared.paths
    }

    /// The accelerator this VM runs with.
    pub fn accel(&self) -> AccelKind {
        self.accel
    }

    /// The machine model it runs on.
    pub fn machine(&self) -> Machine {
        self.machine
    }

    /// Whether QEMU runs (spawned and not exited).
    pub(crate) fn qemu_running(&self) -> bool {
        self.shared.lock().qemu_state() == QemuState::Running
    }

    /// When each step of the start was reached.
    pub fn boot_marks(&self) -> BootMarks {
        self.shared.lock().marks
    }

    /// The guest's memory as the balloon device reports it (QMP `query-balloon`), in bytes.
    /// It follows [`VmResources::update_memory`] only once the guest's balloon driver runs.
    ///
    /// # Errors
    ///
    /// [`HostError::Gone`] once QEMU has exited; [`HostError::Timeout`] when QMP does not
    /// answer in time; [`HostError::Io`] or [`HostError::Failed`] when connecting to QMP or the
    /// query fails.
    pub async fn balloon_actual(&self) -> Result<u64, HostError> {
        let qmp = self.qmp().await?;
        match tokio::time::timeout(QMP_TIMEOUT, qmp.execute(&QueryBalloon {})).await {
            Ok(Ok(info)) => Ok(info.actual),
            Ok(Err(source)) => Err(QemuError::Qmp {
                command: "query-balloon",
                source,
            }
            .into_host("query memory")),
            Err(_) => Err(HostError::Timeout {
                operation: "query memory",
                after: QMP_TIMEOUT,
            }),
        }
    }

    /// The QMP connection, made now if there is none (e.g. `start` was cancelled after QEMU
    /// came up). `Gone` once QEMU has exited.
    pub(crate) async fn qmp(&self) -> Result<Arc<QmpClient>, HostError> {
        let mut slot = self.qmp.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        if self.shared.lock().qemu_state() != QemuState::Running {
            return Err(HostError::Gone);
        }
        let stream = tokio::net::UnixStream::connect(&self.shared.paths.qmp_socket)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    HostError::Gone
                }
                _ => HostError::Io {
                    operation: "connect to QMP",
                    source,
                },
            })?;
        let client = self.handshake(stream).await?;
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn handshake(&self, stream: tokio::net::UnixStream) -> Result<Arc<QmpClient>, HostError> {
        let connect = QmpClient::connect(
            stream,
            Arc::new(EventObserver {
                shared: self.shared.clone(),
            }),
            self.shared.qmp_reader(),
        );
        match tokio::time::timeout(QMP_TIMEOUT, connect).await {
            Ok(Ok(client)) => Ok(Arc::new(client)),
            Ok(Err(source)) => Err(QemuError::Qmp {
                command: "qmp_capabilities",
                source,
            }
            .into_host("connect to QMP")),
            Err(_) => Err(HostError::Timeout {
                operation: "connect to QMP",
                after: QMP_TIMEOUT,
            }),
        }
    }

    async fn wait_exit_for(&self, limit: Duration) -> Option<VmExit> {
        tokio::time::timeout(limit, self.wait()).await.ok()
    }

    async fn start_inner(&self) -> Result<(), HostError> {
        const OP: &str = "start VM";
        // Hold the QMP slot until QMP is negotiated, so that a concurrent terminate uses this
        // connection instead of queueing a second one behind it.
        let mut slot = self.qmp.lock().await;
        // No await from marking the VM started to spawning its supervisor: `release` waits for
        // a supervisor whenever `started` is set.
        {
            let mut procs = self.shared.lock();
            if procs.stopping {
                return Err(HostError::Failed {
                    operation: OP,
                    source: "the VM was terminated or released".into(),
                });
            }
            if procs.started {
                return Err(HostError::Failed {
                    operation: OP,
                    source: "the VM was already started".into(),
                });
            }
            procs.started = true;
        }
        let (handle, answer) =
            match supervisor::spawn(self.shared.clone(), self.launch.clone(), &self.id) {
                Ok(spawned) => spawned,
                Err(e) => {
                    self.shared.publish(not_started());
                    self.shared.mark_done_without_start();
                    return Err(e.into_host(OP));
                }
            };
        *lock(&self.supervisor) = Some(handle);
        let stream = answer
            .await
            .map_err(|_| QemuError::SupervisorLost.into_host(OP))?
            .map_err(|e| e.into_host(OP))?;
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream))
            .map_err(|source| HostError::Io {
                operation: "connect to QMP",
                source,
            })?;
        let client = self.handshake(stream).await?;
        let marks = {
            let mut procs = self.shared.lock();
            procs.marks.qmp_ready = Some(Instant::now());
            procs.marks
        };
        let greeting = client.greeting();
        *slot = Some(client.clone());
        tracing::info!(
            qemu = %format!("{}.{}.{}", greeting.version.major, greeting.version.minor, greeting.version.micro),
            accel = self.accel.as_str(),
            qemu_pid = ?self.qemu_pid(),
            vsock_ready_ms = ?since(marks.vsock_spawned, marks.vsock_ready),
            qmp_ready_ms = ?since(marks.qemu_spawned, marks.qmp_ready),
            "VM started"
        );
        Ok(())
    }
}

impl QemuVm {
    /// A start that failed because QEMU refused an image given at create that another QEMU
    /// writes (its image locking) is bad input, whichever step noticed QEMU's exit.
    fn explain_start_failure(&self, e: HostError) -> HostError {
        if matches!(e, HostError::InvalidInput { .. }) {
            return e;
        }
        let log = uvm_host::log_tail(&self.shared.paths.qemu_log);
        match log.lines().find(|l| disks::is_lock_refusal(l)) {
            Some(line) => HostError::InvalidInput {
                what: "disk",
                message: format!(
                    "a disk given at create is in use: another VM (or process) has it open for writing ({})",
                    line.trim()
                ),
            },
            None => e,
        }
    }
}

fn since(from: Option<Instant>, to: Option<Instant>) -> Option<u128> {
    Some(to?.saturating_duration_since(from?).as_millis())
}

fn not_started() -> VmExit {
    VmExit {
        code: None,
        signal: None,
        reason: Some("not-started".to_owned()),
    }
}

#[async_trait]
impl VmLifetime for QemuVm {
    fn runtime_id(&self) -> String {
        self.runtime_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn guest_endpoint(&self) -> GuestEndpoint {
        GuestEndpoint::HybridVsock {
            uds: self.shared.paths.vsock_socket.clone(),
        }
    }

    /// Spawn vhost-device-vsock, wait until it listens, spawn QEMU, negotiate QMP. Cancel-safe:
    /// if the future is dropped the processes keep starting, and `terminate`/`release` stop them.
    #[tracing::instrument(skip_all, fields(vm = %self.id, op = "start"))]
    async fn start(&self) -> Result<(), HostError> {
        self.start_inner()
            .await
            .map_err(|e| self.explain_start_failure(e))
    }

    /// How QEMU ended; `reason` is its SHUTDOWN event's when one was seen. A VM whose start
    /// failed before QEMU was spawned, or that is released unstarted, ends with reason
    /// `not-started`. Pends before `start`.
    async fn wait(&self) -> VmExit {
        let mut exit = self.shared.subscribe_exit();
        let seen = exit.wait_for(Option::is_some).await;
        // The sender lives in `shared`, which `self` holds: the channel cannot close.
        seen.ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(not_started)
    }

    /// QMP `quit`, then SIGKILL if QEMU is still there after the grace period. Spawns nothing
    /// more afterwards; harmless on a VM that never started or already ended.
    #[tracing::instrument(skip_all, fields(vm = %self.id, op = "terminate"))]
    async fn terminate(&self) -> Result<(), HostError> {
        let state = {
            let mut procs = self.shared.lock();
            procs.stopping = true;
            procs.qemu_state()
        };
        match state {
            QemuState::Exited => return Ok(()),
            QemuState::NotSpawned => {
                // A start may be under way: it stops at its next step; end what it spawned.
                self.shared.signal(Which::Vsock, Signal::KILL);
                return Ok(());
            }
            QemuState::Running => {}
        }
        let deadline = Instant::now() + self.grace;
        let quit = async {
            let qmp = self.qmp().await?;
            match qmp.execute(&Quit {}).await {
                // QEMU may close the connection before its reply: the quit still happens.
                Ok(_) | Err(QmpError::Closed) => Ok(()),
                Err(source) => Err(QemuError::Qmp {
                    command: "quit",
                    source,
                }
                .into_host("terminate VM")),
            }
        };
        match tokio::time::timeout(self.grace, quit).await {
            Ok(Ok(())) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if let Some(exit) = self.wait_exit_for(left).await {
                    tracing::info!(%exit, "QEMU quit");
                    return Ok(());
                }
                tracing::warn!(grace = ?self.grace, "QEMU did not quit in time; killing it");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %uvm_util::error_chain(&e), "QMP quit failed; killing QEMU")
            }
            Err(_) => tracing::warn!(grace = ?self.grace, "QMP quit timed out; killing QEMU"),
        }
        self.shared.signal(Which::Qemu, Signal::KILL);
        match self.wait_exit_for(KILL_WAIT).await {
            Some(_) => Ok(()),
            None => Err(HostError::Timeout {
                operation: "terminate VM",
                after: self.grace + KILL_WAIT,
            }),
        }
    }

    /// Kill and reap both processes, then remove the runtime directory. Idempotent.
    #[tracing::instrument(skip_all, fields(vm = %self.id, op = "release"))]
    async fn release(&self) -> Result<(), HostError> {
        let started = {
            let mut procs = self.shared.lock();
            procs.stopping = true;
            procs.started
        };
        self.shared.stop_and_kill();
        if !started {
            self.shared.publish(not_started());
            self.shared.mark_done_without_start();
        }
        let mut done = self.shared.subscribe_done();
        if tokio::time::timeout(KILL_WAIT, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            return Err(HostError::Timeout {
                operation: "release VM",
                after: KILL_WAIT,
            });
        }
        let handle = lock(&self.supervisor).take();
        if let Some(handle) = handle {
            // It has reaped everything and is returning; it never blocks after `done`.
            if handle.join().is_err() {
                tracing::error!("the supervisor thread panicked after reaping");
            }
        }
        self.qmp.lock().await.take();
        // QEMU is gone and its tap fds with it: the namespaces' redirects and our fds go.
        self.network.release_async().await;
        // Every child is reaped; whatever else got into the cgroup dies with it.
        let cgroup = lock(&self.placement).cgroup().cloned();
        if let Some(cg) = cgroup {
            tokio::task::spawn_blocking(move || cgroup::release(&cg))
                .await
                .map_err(|e| HostError::Failed {
                    operation: "remove the VM's cgroup",
                    source: Box::new(e),
                })??;
        }
        match tokio::fs::remove_dir_all(&self.runtime_dir).await {
            Ok(()) => {
                tracing::info!(dir = %self.runtime_dir.display(), "VM released");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(HostError::Io {
                operation: "remove the runtime directory",
                source,
            }),
        }
    }
}

#[async_trait]
impl VmResources for QemuVm {
    /// RSS of QEMU and vhost-device-vsock together (from `/proc`); CPU time, memory charged and
    /// throttling from the VM's cgroup, which holds every process of the VM (without one, CPU
    /// time is QEMU's and vhost-device-vsock's from `/proc`).
    async fn stats(&self) -> Result<HostStats, HostError> {
        let mut total = self.process_stats()?;
        let cgroup = lock(&self.placement).cgroup().cloned();
        if let Some(cg) = cgroup {
            let c = cg.stats();
            total.cpu_time = c.cpu_usage.unwrap_or(total.cpu_time);
            total.memory_current_bytes = c.memory_current;
            total.memory_peak_bytes = c.memory_peak;
            total.cpu_throttling = c.throttling.map(|t| CpuThrottling {
                periods: t.periods,
                throttled_periods: t.throttled,
                throttled_time: t.throttled_time,
            });
        }
        Ok(total)
    }

    /// Moves the VM's cpu-side cgroup directories under the CPU group `group_id`
    /// ([`uvm_cgroup::VmCgroup::move_into`]), points the spawning of later children there
    /// before the directories they replace go, and sets the VM's own CPU limits again on its
    /// new directory (on v1 a limit above the group's cap is refused by the kernel: the cap
    /// holds it then). All in one blocking task that records what it did itself, so a caller
    /// that gives up waiting never leaves the books behind the cgroups. An unknown group is
    /// InvalidInput; a VM without a cgroup is Unsupported.
    async fn set_cpu_group(&self, group_id: &str) -> Result<(), HostError> {
        const OP: &str = "set_cpu_group";
        lock(&self.placement).require(OP)?;
        let id = group_id.to_owned();
        let (placement, resources, shared) = (
            self.placement.clone(),
            self.resources.clone(),
            self.shared.clone(),
        );
        let vcpus = self.vcpus.load(std::sync::atomic::Ordering::Relaxed);
        let vm = self.id.clone();
        tokio::task::spawn_blocking(move || {
            let limits = lock(&resources);
            let current = lock(&placement).require(OP)?.clone();
            let layout = uvm_cgroup::Layout::detect().map_err(|e| cgroup::host_error(OP, e))?;
            let group =
                uvm_cgroup::CpuGroup::open(&layout, &id).map_err(|e| cgroup::host_error(OP, e))?;
            let moving = current
                .move_into(&group)
                .map_err(|e| cgroup::host_error(OP, e))?;
            *lock(&placement) = Placement::Cgroup(moving.cgroup().clone());
            let joiner = moving.cgroup().joiner();
            if let Ok(joiner) = &joiner {
                shared.set_joiner(joiner.clone());
            }
            let moved = moving.finish().map_err(|e| cgroup::host_error(OP, e))?;
            joiner.map_err(|e| cgroup::host_error(OP, e))?;
            if *limits != CpuLimits::default() {
                if let Err(e) = moved.set_cpu_limits(limits.limit, limits.weight, vcpus) {
                    tracing::warn!(%vm, error = %uvm_util::error_chain(&e), "the VM's own CPU limits do not fit its group; the group's cap holds it");
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| HostError::Failed {
            operation: OP,
            source: Box::new(e),
        })?
    }

    /// Writes the limit (a share of the VM's vCPUs now) and the weight into the VM's cgroup;
    /// Unsupported when it has none.
    async fn update_cpu_limits(&self, limits: CpuLimits) -> Result<(), HostError> {
        let mut kept = lock(&self.resources);
        let cg = lock(&self.placement).require("update_cpu_limits")?.clone();
        let vcpus = self.vcpus.load(std::sync::atomic::Ordering::Relaxed);
        cg.set_cpu_limits(limits.limit, limits.weight, vcpus)
            .map_err(|e| cgroup::host_error("update_cpu_limits", e))?;
        kept.limit = limits.limit.or(kept.limit);
        kept.weight = limits.weight.or(kept.weight);
        Ok(())
    }

    /// Balloon the guest below its boot memory, or (created with a maximum) plug virtio-mem
    /// memory above it, waiting until the guest has it (`memory.rs`).
    #[tracing::instrument(skip_all, fields(vm = %self.id, op = "update_memory", bytes))]
    async fn update_memory(&self, bytes: u64) -> Result<(), HostError> {
        self.resize_memory(bytes).await
    }

    fn memory_granularity(&self) -> u64 {
        crate::memory::granularity(self.max_memory_bytes.is_some())
    }

    /// Hot-adds or hot-removes vCPUs (`cpus.rs`); the VM must have been created with a
    /// maximum above its boot count.
    async fn update_cpus(&self, cpus: u32) -> Result<(), HostError> {
        if self.max_cpus == self.cpus {
            return if cpus == self.cpus {
                Ok(())
            } else {
                Err(invalid(
                    "cpu count",
                    format!(
                        "the VM has {} vCPUs and no maximum above it (create it with one to hot-add)",
                        self.cpus
                    ),
                ))
            };
        }
        self.set_cpus(cpus).await?;
        self.vcpus.store(cpus, std::sync::atomic::Ordering::Relaxed);
        // A limit is a share of the vCPUs: scale it to the new count.
        let limit = lock(&self.resources).limit;
        if let (Some(limit), Some(cg)) = (limit, lock(&self.placement).cgroup().cloned()) {
            cg.set_cpu_limits(Some(limit), None, cpus)
                .map_err(|e| cgroup::host_error("update_cpus", e))?;
        }
        Ok(())
    }
}

impl Drop for QemuVm {
    /// Children must not outlive their VM: kill them (the supervisor thread reaps them within
    /// moments) and remove the runtime directory and the cgroup, if `release` did not.
    fn drop(&mut self) {
        // The namespaces' redirects are ours to remove, released or not (a no-op after release).
        self.network.release();
        let cgroup = lock(&self.placement).cgroup().cloned();
        let released = *self.shared.subscribe_done().borrow()
            && !self.runtime_dir.exists()
            && cgroup
                .as_ref()
                .is_none_or(|cg| cg.paths().iter().all(|p| !p.exists()));
        if released {
            return;
        }
        self.shared.stop_and_kill();
        if let Some(cg) = cgroup {
            // Killed processes leave it as they exit: a short wait, not release's.
            let removed = cg
                .kill_all()
                .and_then(|()| cg.remove(Duration::from_millis(500)));
            if let Err(e) = removed {
                tracing::warn!(vm = %self.id, error = %uvm_util::error_chain(&e), "removing the VM's cgroup failed");
            }
        }
        match std::fs::remove_dir_all(&self.runtime_dir) {
            Ok(()) => tracing::warn!(vm = %self.id, "VM dropped without release; cleaned up"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(vm = %self.id, error = %e, "removing the runtime directory failed")
            }
        }
    }
}

#[cfg(test)]
#[path = "vm_tests.rs"]
mod tests;
