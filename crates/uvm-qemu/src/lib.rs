//! # uvm-qemu — the QEMU host backend of uvmctl
//!
//! [`QemuBackend`] implements [`uvm::seams::VmBackend`]: each VM it creates is a [`QemuVm`]
//! ([`uvm::seams::VmLifetime`] + [`uvm::seams::VmResources`]) made of two host processes:
//!
//! ```text
//!   vhost-device-vsock ──vhost.sock── qemu-system-x86_64 ──qmp.sock── controller (QMP)
//!          │                                 │
//!      vsock.sock (hybrid vsock, host side)  console.log (guest serial)
//! ```
//!
//! Both run from a private runtime directory (`<runtime_root>/uvm-<id>-<random>`, mode 0700).
//! The children are spawned by one supervisor thread per VM (module `supervisor`), which also reaps
//! them: they die with that thread (`PR_SET_PDEATHSIG`), with the controller, and on
//! [`QemuVm`]'s drop.

#![warn(missing_docs)]

mod cgroup;
mod cmdline;
mod cpus;
mod devices;
mod disks;
mod error;
mod hotplug;
mod memory;
mod network;
pub use network::USER_DNS;
mod qmp;
mod shares;
mod stale;
mod stats;
mod supervisor;
mod vm;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cmdline::{
    qemu_command_line, vhost_vsock_command_line, QemuCommand, RuntimePaths, BASE_KERNEL_CMDLINE,
    FAST_BOOT_ARGS,
};
pub use disks::{check_host_path, MAX_SCSI_CONTROLLERS, SCSI_FIRST_PCI_SLOT};
pub use error::QemuError;
pub use qmp::{QemuVersion, QmpError, QmpEvent, QmpGreeting, QmpMessage, ShutdownEvent};
pub use shares::MAX_TAG_BYTES;
pub use stale::{sweep_stale_runtime_dirs, OWNER_FILE};
pub use supervisor::BootMarks;
pub use vm::{CommandLines, QemuBackend, QemuVm, MAX_CPUS, MEMORY_GRANULARITY, MIN_MEMORY_MIB};

/// The machine model a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Machine {
    /// `-M q35`: PCI Express, so disks, NICs, CPUs and memory can be hot-plugged. The default,
    /// for full-featured VMs.
    #[default]
    Q35,
    /// `-M microvm` with qboot firmware and virtio-mmio devices: no PCI, no hotplug, the fastest
    /// boot. Needs `tsc_early_khz=` under TCG (added by the backend): microvm has no timer to
    /// calibrate the TSC against and the boot can hang without it.
    Microvm,
}

impl Machine {
    /// The name QEMU knows it by (`-M <name>`), which [`Machine`]'s `FromStr` accepts back.
    pub const fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Machine {
    type Err = QemuError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "q35" => Ok(Machine::Q35),
            "microvm" => Ok(Machine::Microvm),
            other => Err(QemuError::UnknownMachine {
                name: other.to_owned(),
            }),
        }
    }
}

/// Spare PCIe root ports of a q35 VM for hot-added NICs and PCI devices, by default.
pub const DEFAULT_DEVICE_HOTPLUG_PORTS: u8 = 1;

/// Spare PCIe root ports of a q35 VM for hot-added shares, by default.
pub const DEFAULT_SHARE_HOTPLUG_PORTS: u8 = 2;

/// Where Debian's qemu-system-data installs qboot, the minimal firmware microvm boots with.
pub const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";

/// Which accelerator QEMU should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM only if the CPU advertises hardware virtualization (`vmx`/`svm` in `/proc/cpuinfo`)
    /// **and** `/dev/kvm` opens; TCG otherwise. A `/dev/kvm` without `vmx`/`svm` is a
    /// software-nested KVM that crashes stock kernels, so it is not used.
    #[default]
    Auto,
    /// Force KVM.
    Kvm,
    /// Force TCG (software emulation).
    Tcg,
}

/// The accelerator QEMU actually runs with: what an [`Accel`] resolves to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelKind {
    /// KVM (hardware virtualization).
    Kvm,
    /// TCG (software emulation).
    Tcg,
}

impl AccelKind {
    /// The name QEMU knows it by (`-M accel=<name>`).
    pub const fn as_str(self) -> &'static str {
        match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Tcg => "tcg",
        }
    }
}

impl Accel {
    /// Resolve against this machine: reads `/proc/cpuinfo` and tries to open `/dev/kvm`
    /// (only for [`Accel::Auto`]).
    pub fn resolve(self) -> AccelKind {
        match self {
            Accel::Kvm => AccelKind::Kvm,
            Accel::Tcg => AccelKind::Tcg,
            Accel::Auto => {
                let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
                // Only open /dev/kvm when it could be used at all.
                let kvm_opens = cpu_has_hardware_virt(&cpuinfo) && kvm_device_opens();
                self.resolve_from(&cpuinfo, kvm_opens)
            }
        }
    }

    /// Resolve from the text of `/proc/cpuinfo` and whether `/dev/kvm` opens (pure).
    pub fn resolve_from(self, cpuinfo: &str, kvm_opens: bool) -> AccelKind {
        match self {
            Accel::Kvm => AccelKind::Kvm,
            Accel::Tcg => AccelKind::Tcg,
            Accel::Auto if kvm_opens && cpu_has_hardware_virt(cpuinfo) => AccelKind::Kvm,
            Accel::Auto => AccelKind::Tcg,
        }
    }
}

/// Whether `/proc/cpuinfo` text shows hardware virtualization (`vmx` or `svm` in a `flags` line).
pub fn cpu_has_hardware_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| {
            flags
                .split_ascii_whitespace()
                .any(|f| f == "vmx" || f == "svm")
        })
}

fn kvm_device_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// How the backend runs QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock` (rust-vmm), the vsock device backend.
    pub vhost_vsock: PathBuf,
    /// `virtiofsd` (the Rust one), which serves virtio-fs shares; `None` serves shares over 9p
    /// (given at create only: QEMU cannot hot-add 9p).
    pub virtiofsd: Option<PathBuf>,
    /// Spare PCIe root ports a q35 VM gets at create for hot-added shares (each cold share gets
    /// a port of its own besides). Each costs a little boot time (BENCHMARKS.md).
    pub share_hotplug_ports: u8,
    /// Spare PCIe root ports a q35 VM gets for hot-added NICs and assigned PCI devices (each
    /// cold NIC gets a port of its own besides).
    pub device_hotplug_ports: u8,
    /// The guest kernel (an uncompressed `vmlinux` boots fastest: PVH entry).
    pub kernel: PathBuf,
    /// The guest initramfs (the agent is its `/init`).
    pub initramfs: PathBuf,
    /// The accelerator to use; [`QemuBackend::new`] resolves it once.
    pub accel: Accel,
    /// The machine model; [`Machine::Microvm`] boots with [`QemuConfig::qboot`].
    pub machine: Machine,
    /// The qboot firmware for [`Machine::Microvm`].
    pub qboot: PathBuf,
    /// Where runtime directories are made. Keep it short: socket paths must stay < 108 bytes.
    pub runtime_root: PathBuf,
    /// Appended to the kernel command line ([`crate::BASE_KERNEL_CMDLINE`], [`crate::FAST_BOOT_ARGS`], then this).
    pub extra_cmdline: String,
    /// How long `terminate` waits after QMP `quit` before SIGKILL.
    pub terminate_grace: Duration,
    /// Where the host's measured TSC frequency is kept for the rest of the host's boot (see
    /// [`uvm_host::host_tsc_khz_with`]); `None`: measured once per process (one measuring interval, under TCG only).
    pub tsc_cache: Option<PathBuf>,
    /// Where each VM's cgroup goes, relative to each cgroup hierarchy's root (default
    /// [`DEFAULT_CGROUP_PARENT`]; the VM's is `<parent>/<runtime directory name>`). `None`: no
    /// cgroups — the VM's processes stay where this process is, and CPU limits are
    /// unsupported. Where the host has no cgroups or refuses (not root), the VM runs without
    /// one too, with a warning.
    pub cgroup_parent: Option<String>,
}

/// Where VMs' cgroups go by default: `/sys/fs/cgroup/uvmctl/<vm>` on v2,
/// `/sys/fs/cgroup/<controller>/uvmctl/<vm>` on v1.
pub const DEFAULT_CGROUP_PARENT: &str = "uvmctl";

impl QemuConfig {
    /// A configuration for `kernel` + `initramfs`, with the binaries found on `PATH` (then in
    /// `~/.cargo/bin`, where `cargo install vhost-device-vsock` puts it; virtiofsd only when
    /// found), automatic accelerator, the system temporary directory as runtime root, a 3 s
    /// terminate grace and [`DEFAULT_SHARE_HOTPLUG_PORTS`] hotplug ports.
    pub fn new(kernel: PathBuf, initramfs: PathBuf) -> Self {
        QemuConfig {
            qemu: find_binary("qemu-system-x86_64"),
            vhost_vsock: find_binary("vhost-device-vsock"),
            virtiofsd: Some(find_binary("virtiofsd")).filter(|p| is_executable(p)),
            share_hotplug_ports: DEFAULT_SHARE_HOTPLUG_PORTS,
            device_hotplug_ports: DEFAULT_DEVICE_HOTPLUG_PORTS,
            kernel,
            initramfs,
            accel: Accel::Auto,
            machine: Machine::Q35,
            qboot: PathBuf::from(QBOOT_ROM),
            runtime_root: std::env::temp_dir(),
            extra_cmdline: String::new(),
            terminate_grace: Duration::from_secs(3),
            tsc_cache: None,
            cgroup_parent: Some(DEFAULT_CGROUP_PARENT.to_owned()),
        }
    }
}

/// The first executable `name` on `PATH` or in `~/.cargo/bin`; the bare name when none is found
/// (the spawn then fails with a clear error, and `create` reports it first).
pub fn find_binary(name: &str) -> PathBuf {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .map(|c| c.join("bin"));
    path_dirs
        .into_iter()
        .chain(cargo_bin)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPUINFO_NO_VIRT: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep hypervisor lahf_lm\n\n\
        processor\t: 1\nflags\t\t: fpu vme de pse tsc hypervisor\n";
    const CPUINFO_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme vmx tsc\n";
    const CPUINFO_SVM: &str = "processor\t: 0\nflags\t\t: fpu svm tsc\n";
    // `vmx flags` is a separate line on recent kernels: it must not count by itself.
    const CPUINFO_VMX_FLAGS_LINE_ONLY: &str =
        "processor\t: 0\nflags\t\t: fpu tsc\nvmx flags\t: vnmi preemption_timer\n";

    #[test]
    fn hardware_virt_probe_reads_the_flags_line() {
        assert!(!cpu_has_hardware_virt(CPUINFO_NO_VIRT));
        assert!(cpu_has_hardware_virt(CPUINFO_VMX));
        assert!(cpu_has_hardware_virt(CPUINFO_SVM));
        assert!(!cpu_has_hardware_virt(CPUINFO_VMX_FLAGS_LINE_ONLY));
        assert!(!cpu_has_hardware_virt(""));
    }

    #[test]
    fn auto_uses_kvm_only_with_vmx_or_svm_and_an_openable_device() {
        assert_eq!(
            Accel::Auto.resolve_from(CPUINFO_NO_VIRT, true),
            AccelKind::Tcg
        );
        assert_eq!(Accel::Auto.resolve_from(CPUINFO_VMX, false), AccelKind::Tcg);
        assert_eq!(Accel::Auto.resolve_from(CPUINFO_VMX, true), AccelKind::Kvm);
        assert_eq!(Accel::Auto.resolve_from(CPUINFO_SVM, true), AccelKind::Kvm);
    }

    #[test]
    fn forced_accelerators_ignore_the_probe() {
        assert_eq!(
            Accel::Kvm.resolve_from(CPUINFO_NO_VIRT, false),
            AccelKind::Kvm
        );
        assert_eq!(Accel::Tcg.resolve_from(CPUINFO_VMX, true), AccelKind::Tcg);
    }

    #[test]
    fn config_defaults() {
        let c = QemuConfig::new("/k".into(), "/i".into());
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(c.terminate_grace, Duration::from_secs(3));
        assert_eq!(c.runtime_root, std::env::temp_dir());
        assert!(c.qemu.ends_with("qemu-system-x86_64"));
        assert!(c.vhost_vsock.ends_with("vhost-device-vsock"));
    }
}
