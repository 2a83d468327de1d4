//! # uvm-vm — one utility VM from the real pieces
//!
//! [`Vm`] wires a [`uvm::Controller`] to the QEMU backend (`uvm-qemu`), the vsock guest link
//! (`uvm-guest`) and the guest image (`uvm-image`), and keeps a handle on the QEMU VM and the
//! link for their boot marks. Shared by the CLI (`uvmctl run`, `command-line`), the benchmark
//! (`uvm-bench`) and the real-VM tests.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uvm::seams::{
    DiskSpec, HostVm, NetworkConfig, NetworkMode, SecurityPolicy, ShareSpec, VmBackend, VmConfig,
};
use uvm::{Controller, ControllerError, HostError, Timeouts};
use uvm_guest::{GuestLinkConfig, VsockGuest};
use uvm_image::{Image, ImageError, ImageSpec, KernelFlavor};
pub use uvm_qemu::{Accel, CommandLines, Machine};
use uvm_qemu::{QemuBackend, QemuConfig, QemuVm};

/// What can go wrong around the controller.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The guest image could not be found or built.
    #[error("preparing the guest image failed")]
    Image(#[from] ImageError),
    /// The controller refused or failed.
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

/// How to make a VM.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// Guest memory at boot, in MiB.
    pub memory_mib: u64,
    /// The most it may grow to, in MiB (q35, virtio-mem: [`VmConfig::max_memory_mib`]).
    pub max_memory_mib: Option<u64>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// The most vCPUs it may have (q35, hot-added: [`VmConfig::max_cpus`]).
    pub max_cpus: Option<u32>,
    /// KVM or TCG (auto: KVM only where the CPU advertises vmx/svm).
    pub accel: Accel,
    /// The machine model (q35 or microvm).
    pub machine: Machine,
    /// The controller's deadlines.
    pub timeouts: Timeouts,
    /// Where runtime directories go (default: the system temp dir).
    pub runtime_root: Option<PathBuf>,
    /// Appended to the guest kernel command line.
    pub extra_cmdline: String,
    /// Disks given at create: attached cold, mounted by `start_vm` ([`VmConfig::disks`]).
    pub disks: Vec<DiskSpec>,
    /// Shares added cold at create (the `i`-th under `uvm::seams::cold_share_tag(i)`); the
    /// guest mounts them when asked (`GuestMounts::mount_share`).
    pub shares: Vec<ShareSpec>,
    /// Serve shares over 9p even where virtiofsd is installed (9p shares exist only cold).
    pub nine_p_shares: bool,
    /// Spare PCIe root ports for hot-added shares (q35); `None` keeps the backend's default.
    pub share_hotplug_ports: Option<u8>,
    /// The Rego policy the guest enforces from start on ([`VmConfig::security_policy`]),
    /// compiled by the caller already (`uvm_policy::Policy::compile`).
    pub security_policy: Option<SecurityPolicy>,
    /// Its network from the start ([`VmConfig::network`]); user-mode networking without
    /// nameservers gets slirp's resolver.
    pub network: NetworkConfig,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mib: 256,
            max_memory_mib: None,
            cpus: 1,
            max_cpus: None,
            accel: Accel::Auto,
            machine: Machine::Q35,
            timeouts: Timeouts::default(),
            runtime_root: None,
            extra_cmdline: String::new(),
            disks: Vec::new(),
            shares: Vec::new(),
            nine_p_shares: false,
            share_hotplug_ports: None,
            security_policy: None,
            network: NetworkConfig::default(),
        }
    }
}

/// The default guest image, built on first use and cached by content.
pub fn default_image() -> Result<Image, VmError> {
    image_with(None)
}

/// The guest image with `kernel` (ours or Debian's) instead of the default choice.
pub fn image_with(kernel: Option<KernelFlavor>) -> Result<Image, VmError> {
    let spec = ImageSpec::from_env_with(kernel)?;
    Ok(uvm_image::ensure_image(&spec)?)
}

/// Removes the runtime directories under `options`' runtime root that processes left
/// when they died without releasing their VMs ([`uvm_qemu::sweep_stale_runtime_dirs`]: only
/// directories whose owner process is gone and that no process mentions); returns them.
pub fn sweep_stale_runtime_dirs(options: &VmOptions) -> Vec<PathBuf> {
    let root = options
        .runtime_root
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    uvm_qemu::sweep_stale_runtime_dirs(&root, Some(uvm_qemu::DEFAULT_CGROUP_PARENT)).unwrap_or_else(|e| {
        tracing::warn!(root = %root.display(), error = %e, "cannot sweep stale runtime directories");
        Vec::new()
    })
}

/// The QEMU backend configuration a [`Vm`] with `options` runs `image` with (also what the
/// benchmark's floor starts by hand).
pub fn qemu_config(image: &Image, options: &VmOptions) -> QemuConfig {
    let mut qemu = QemuConfig::new(image.kernel.clone(), image.initramfs.clone());
    qemu.accel = options.accel;
    qemu.machine = options.machine;
    qemu.extra_cmdline = options.extra_cmdline.clone();
    if options.nine_p_shares {
        qemu.virtiofsd = None;
    }
    if let Some(ports) = options.share_hotplug_ports {
        qemu.share_hotplug_ports = ports;
    }
    if let Some(root) = &options.runtime_root {
        qemu.runtime_root = root.clone();
    }
    // Each `uvmctl` invocation is a new process: keep the host's TSC frequency for the boot
    // instead of spending a measuring interval on it every time.
    qemu.tsc_cache = uvm_image::cache_dir_from_env()
        .ok()
        .map(|dir| dir.join("host-tsc-khz"));
    qemu
}

/// Exactly what a [`Vm`] with `options` would run for `image`, with its runtime files (sockets,
/// logs) under `dir`, after the checks `create_vm` makes ([`QemuBackend::command_lines`]).
pub fn command_lines(
    image: &Image,
    options: &VmOptions,
    dir: &Path,
) -> Result<CommandLines, HostError> {
    QemuBackend::new(qemu_config(image, options)).command_lines(dir, &vm_config(options))
}

/// The controller's configuration of a VM made with `options` (what `create_vm` gets).
pub fn vm_config(options: &VmOptions) -> VmConfig {
    VmConfig {
        memory_mib: options.memory_mib,
        max_memory_mib: options.max_memory_mib,
        cpus: options.cpus,
        max_cpus: options.max_cpus,
        security_policy: options.security_policy.clone(),
        disks: options.disks.clone(),
        shares: options.shares.clone(),
        network: network_config(&options.network),
        ..VmConfig::default()
    }
}

/// `network` as the controller takes it: user-mode networking without nameservers gets
/// slirp's resolver (10.0.2.3), which forwards to the host's.
pub fn network_config(network: &NetworkConfig) -> NetworkConfig {
    let mut out = network.clone();
    if matches!(out.mode, NetworkMode::User { .. }) && out.dns.nameservers.is_empty() {
        out.dns.nameservers.push(uvm_qemu::USER_DNS.into());
    }
    out
}

/// One utility VM: its controller and the concrete pieces under it.
#[derive(Debug)]
pub struct Vm {
    /// The VM's id.
    pub id: String,
    /// The controller driving it.
    pub controller: Controller,
    /// The guest link (the controller holds it too), for what the controller does not expose.
    pub guest: VsockGuest,
    /// What it was made with.
    pub options: VmOptions,
    /// The QEMU VM the controller drives, once created.
    host: HostSlot,
}

/// Where [`TrackingBackend`] leaves the VM it created (only ever replaced whole, so it is used
/// across a poisoning: [`uvm_util::lock`]).
type HostSlot = Arc<Mutex<Option<Arc<QemuVm>>>>;

/// The QEMU backend, keeping a handle on the VM it creates so that [`Vm::qemu_vm`] can show its
/// processes and start marks (the controller only sees it as a `dyn HostVm`).
struct TrackingBackend {
    inner: QemuBackend,
    created: HostSlot,
}

#[async_trait::async_trait]
impl VmBackend for TrackingBackend {
    async fn create(&self, id: &str, config: &VmConfig) -> Result<Arc<dyn HostVm>, HostError> {
        let vm = Arc::new(self.inner.create_vm_async(id, config).await?);
        *uvm_util::lock(&self.created) = Some(vm.clone());
        Ok(vm)
    }
}

/// Host-clock marks of one boot, for `--timings` and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// create_vm (runtime dir, validation).
    pub create: Duration,
    /// start_vm called → guest announce listener bound.
    pub prepare: Duration,
    /// listener bound → the guest announced itself (QEMU spawn + firmware + kernel + agent init).
    pub to_announce: Duration,
    /// Guest's own clock: kernel start → agent (`/init`) start.
    pub guest_kernel_to_init: Duration,
    /// Guest's own clock: agent start → announce.
    pub guest_init_to_ready: Duration,
    /// announce → handshake done.
    pub handshake: Duration,
    /// The part of `handshake` spent opening the connection to the agent's port (the rest is
    /// the Handshake RPC).
    pub handshake_connect: Duration,
    /// start_vm called → Running.
    pub start: Duration,
}

impl Vm {
    /// A NotCreated VM with a fresh id, over the QEMU backend and the vsock guest link.
    pub fn new(image: &Image, options: VmOptions) -> Vm {
        Vm::with_id(image, options, new_vm_id())
    }

    /// A NotCreated VM with the id `id` (a supervisor's, chosen before its record exists).
    pub fn with_id(image: &Image, options: VmOptions, id: String) -> Vm {
        let host = HostSlot::default();
        let backend = Arc::new(TrackingBackend {
            inner: QemuBackend::new(qemu_config(image, &options)),
            created: host.clone(),
        });
        let mut link = GuestLinkConfig::new(id.clone());
        link.call_timeout = options.timeouts.guest_call;
        let guest = VsockGuest::new(link);
        let controller = Controller::new(
            id.clone(),
            backend,
            Arc::new(guest.clone()),
            options.timeouts,
        );
        Vm {
            id,
            controller,
            guest,
            options,
            host,
        }
    }

    /// The QEMU VM under the controller once `create_vm` succeeded: its process ids, runtime
    /// directory and start marks (QEMU spawn time), for the benchmark and diagnostics.
    pub fn qemu_vm(&self) -> Option<Arc<QemuVm>> {
        uvm_util::lock(&self.host).clone()
    }

    /// create_vm + start_vm, with the boot's phase marks.
    pub async fn boot(&self) -> Result<BootTimings, ControllerError> {
        let t0 = Instant::now();
        self.controller.create_vm(vm_config(&self.options)).await?;
        let t1 = Instant::now();
        self.controller.start_vm().await?;
        let t2 = Instant::now();
        let marks = self.guest.marks();
        let info = self.controller.guest_info().unwrap_or_default();
        let since = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        };
        Ok(BootTimings {
            create: t1 - t0,
            prepare: since(Some(t1), marks.prepared),
            to_announce: since(marks.prepared, marks.announced),
            guest_kernel_to_init: info.kernel_to_init,
            guest_init_to_ready: info.init_to_ready,
            handshake: since(marks.announced, marks.handshaken),
            handshake_connect: since(marks.announced, marks.connected),
            start: t2 - t1,
        })
    }
}

/// A short unique VM id: time-derived and process-derived, no randomness source needed.
pub fn new_vm_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:04x}{:x}",
        std::process::id() & 0xffff,
        nanos >> 16,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
