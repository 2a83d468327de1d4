//! The command lines of the VM's two processes, as pure functions: the backend runs them, and the
//! benchmark "floor" runs the same commands without the controller.

use std::path::{Path, PathBuf};

use crate::{AccelKind, Machine};

/// The files of one VM inside its runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimePaths {
    /// The runtime directory itself.
    pub dir: PathBuf,
    /// vhost-user control socket between QEMU and vhost-device-vsock.
    pub vhost_socket: PathBuf,
    /// Hybrid vsock: host side of the guest's vsock (`CONNECT <port>\n`, and `<uds>_<port>`
    /// listeners for guest-initiated connections).
    pub vsock_socket: PathBuf,
    /// QMP server socket.
    pub qmp_socket: PathBuf,
    /// The guest serial console.
    pub console_log: PathBuf,
    /// QEMU's stdout/stderr.
    pub qemu_log: PathBuf,
    /// vhost-device-vsock's stdout/stderr.
    pub vhost_log: PathBuf,
}

impl RuntimePaths {
    /// The paths of the files in `dir` (nothing is created).
    pub fn new(dir: &Path) -> RuntimePaths {
        RuntimePaths {
            dir: dir.to_path_buf(),
            vhost_socket: dir.join("vhost.sock"),
            vsock_socket: dir.join("vsock.sock"),
            qmp_socket: dir.join("qmp.sock"),
            console_log: dir.join("console.log"),
            qemu_log: dir.join("qemu.log"),
            vhost_log: dir.join("vhost-device-vsock.log"),
        }
    }

    /// The longest unix socket path this directory will hold: a guest-to-host listener
    /// `<vsock.sock>_<u32 port>`. It must fit `sun_path` (108 bytes with the terminating NUL).
    pub fn longest_socket_path(dir: &Path) -> PathBuf {
        dir.join(format!("vsock.sock_{}", u32::MAX))
    }
}

/// What the QEMU command line is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuCommand<'a> {
    /// The guest kernel (`-kernel`).
    pub kernel: &'a Path,
    /// The guest initramfs (`-initrd`).
    pub initramfs: &'a Path,
    /// The accelerator (`-M <machine>,accel=`); it also picks the CPU model (`host` or `max`).
    pub accel: AccelKind,
    /// The machine model (`-M`); it also picks the devices' bus (PCI or virtio-mmio).
    pub machine: Machine,
    /// Firmware (`-bios`), for microvm's qboot.
    pub bios: Option<&'a Path>,
    /// Guest memory in MiB (`-m`, and the size of the shared memfd backing it).
    pub memory_mib: u64,
    /// The most the guest may grow to, in MiB: `-m …,maxmem=` and a `virtio-mem-pci` device
    /// (id `vmem0`, 2 MiB blocks, nothing plugged at boot) over a second shared memfd
    /// for the rest; the guest onlines hot-added blocks movable, so they can be unplugged again.
    pub max_memory_mib: Option<u64>,
    /// Virtual CPUs (`-smp`).
    pub cpus: u32,
    /// The most vCPUs it may have (`-smp …,maxcpus=`: hot-pluggable slots; QEMU picks the
    /// topology, one socket with a core per vCPU).
    pub max_cpus: Option<u32>,
    /// Where the sockets and logs go.
    pub paths: &'a RuntimePaths,
    /// Appended to [`BASE_KERNEL_CMDLINE`] and [`FAST_BOOT_ARGS`].
    pub extra_cmdline: &'a str,
    /// The disks' arguments (SCSI controllers, cold disks), appended as they are.
    pub disk_args: &'a [String],
}

/// The base kernel command line: serial console, quiet, and reboot at once on panic — which
/// `-no-reboot` turns into QEMU exiting, so a panicked guest ends the VM. [`FAST_BOOT_ARGS`]
/// follow it.
pub const BASE_KERNEL_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Kernel arguments that only shorten the boot. Each removes a cost measured under TCG (the
/// figures are in BENCHMARKS.md, "Where the kernel's time went") and is harmless under KVM:
/// - `noreplace-smp`: a kernel that finds one CPU present rewrites every `lock` prefix of its
///   text, one `text_poke` each, to run as a uniprocessor — emulated instruction by
///   instruction, for no measurable gain afterwards.
/// - `no_timer_check`: skips q35's check that the IO-APIC timer interrupt works, which waits
///   for timer ticks. KVM guests skip it too.
/// - `reserved_poison=off` (our kernel's patch 0002; other kernels pass it to init as an
///   unused environment variable): frees the init sections and the initrd without filling
///   them with a poison byte first, one emulated store at a time.
/// - `scsi_mod.scan=manual`: the kernel does not scan a virtio-scsi bus when its controller
///   comes up — 256 targets, an INQUIRY each, ≈ 160 ms of a q35 boot under TCG for a bus with
///   no disk or a few. The agent asks for exactly the LUN it waits for (`…/scan`), and a
///   hot-added disk is announced by virtio-scsi's own event, which needs no scan.
pub const FAST_BOOT_ARGS: &str =
    "noreplace-smp no_timer_check reserved_poison=off scsi_mod.scan=manual";

/// QEMU's arguments (without the program name).
///
/// Guest memory is a shared memfd because vhost-device-vsock, a separate process, maps it. The
/// paths go into QEMU option strings, where a comma separates options: the backend refuses
/// runtime roots that contain one.
pub fn qemu_command_line(cmd: &QemuCommand<'_>) -> Vec<String> {
    let cpu = match cmd.accel {
        AccelKind::Kvm => "host",
        AccelKind::Tcg => "max",
    };
    let mut append = format!("{BASE_KERNEL_CMDLINE} {FAST_BOOT_ARGS}");
    let extra = cmd.extra_cmdline.trim();
    if !extra.is_empty() {
        append.push(' ');
        append.push_str(extra);
    }
    let p = cmd.paths;
    let m = cmd.memory_mib;
    let hot_memory = cmd.max_memory_mib.filter(|max| *max > m);
    if hot_memory.is_some() {
        append.push_str(" memhp_default_state=online_movable");
    }
    // q35 puts virtio devices on PCI (hot-pluggable); microvm on virtio-mmio, which QEMU
    // announces on the kernel command line itself.
    let (machine, bus) = match cmd.machine {
        Machine::Q35 => (format!("q35,accel={}", cmd.accel.as_str()), "pci"),
        Machine::Microvm => (
            format!(
                "microvm,accel={},x-option-roms=off,isa-serial=on,rtc=on",
                cmd.accel.as_str()
            ),
            "device",
        ),
    };
    let mut args: Vec<String> = Vec::with_capacity(40);
    if let Some(bios) = cmd.bios {
        args.extend(["-bios".to_owned(), display(bios)]);
    }
    args.extend([
        "-M".to_owned(),
        machine,
        "-cpu".to_owned(),
        cpu.to_owned(),
        "-smp".to_owned(),
        match cmd.max_cpus.filter(|max| *max > cmd.cpus) {
            Some(max) => format!("{},maxcpus={max}", cmd.cpus),
            None => cmd.cpus.to_string(),
        },
        "-m".to_owned(),
        match hot_memory {
            Some(max) => format!("{m},maxmem={max}M"),
            None => m.to_string(),
        },
        "-object".to_owned(),
        format!("memory-backend-memfd,id=mem,size={m}M,share=on"),
        "-machine".to_owned(),
        "memory-backend=mem".to_owned(),
        "-nodefaults".to_owned(),
        "-no-user-config".to_owned(),
        "-nographic".to_owned(),
        "-no-reboot".to_owned(),
        "-kernel".to_owned(),
        display(cmd.kernel),
        "-initrd".to_owned(),
        display(cmd.initramfs),
        "-append".to_owned(),
        append,
        "-serial".to_owned(),
        format!("file:{}", display(&p.console_log)),
        "-chardev".to_owned(),
        format!("socket,id=vsock,path={}", display(&p.vhost_socket)),
        "-device".to_owned(),
        format!("vhost-user-vsock-{bus},chardev=vsock"),
        "-device".to_owned(),
        format!("virtio-balloon-{bus},id=balloon0"),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", display(&p.qmp_socket)),
    ]);
    if let Some(max) = hot_memory {
        args.extend([
            "-object".to_owned(),
            format!("memory-backend-memfd,id=vmem,size={}M,share=on", max - m),
            "-device".to_owned(),
            format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev=vmem,block-size={}M,requested-size=0",
                VIRTIO_MEM_BLOCK >> 20
            ),
        ]);
    }
    args.extend(cmd.disk_args.iter().cloned());
    args
}

/// The qdev id of the `virtio-mem-pci` device of a VM with a memory maximum.
pub const VIRTIO_MEM_ID: &str = "vmem0";
/// Its block size, bytes: what memory above the boot size is plugged and unplugged in.
pub const VIRTIO_MEM_BLOCK: u64 = 2 << 20;

/// vhost-device-vsock's arguments (without the program name): one device for guest CID 3,
/// hybrid vsock on `vsock.sock`.
pub fn vhost_vsock_command_line(paths: &RuntimePaths) -> Vec<String> {
    vec![
        "--vm".to_owned(),
        format!(
            "guest-cid=3,socket={},uds-path={}",
            display(&paths.vhost_socket),
            display(&paths.vsock_socket)
        ),
    ]
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(accel: AccelKind, extra: &str) -> Vec<String> {
        let paths = RuntimePaths::new(Path::new("/tmp/uvm-a-XYZ"));
        qemu_command_line(&QemuCommand {
            kernel: Path::new("/img/vmlinux"),
            initramfs: Path::new("/img/initramfs.cpio"),
            accel,
            machine: Machine::Q35,
            bios: None,
            memory_mib: 256,
            max_memory_mib: None,
            cpus: 2,
            max_cpus: None,
            paths: &paths,
            extra_cmdline: extra,
            disk_args: &[],
        })
    }

    /// The value following `flag` (every occurrence).
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn microvm_boots_qboot_with_virtio_mmio_devices() {
        let paths = RuntimePaths::new(Path::new("/tmp/uvm-a-XYZ"));
        let args = qemu_command_line(&QemuCommand {
            kernel: Path::new("/img/vmlinux"),
            initramfs: Path::new("/img/initramfs.cpio"),
            accel: AccelKind::Tcg,
            machine: Machine::Microvm,
            bios: Some(Path::new("/usr/share/qemu/qboot.rom")),
            memory_mib: 256,
            max_memory_mib: None,
            cpus: 1,
            max_cpus: None,
            paths: &paths,
            extra_cmdline: "tsc_early_khz=2596138 tsc=reliable",
            disk_args: &[],
        });
        assert_eq!(values(&args, "-bios"), ["/usr/share/qemu/qboot.rom"]);
        assert_eq!(
            values(&args, "-M"),
            ["microvm,accel=tcg,x-option-roms=off,isa-serial=on,rtc=on"]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "vhost-user-vsock-device,chardev=vsock",
                "virtio-balloon-device,id=balloon0"
            ]
        );
        assert!(values(&args, "-append")[0].ends_with("tsc_early_khz=2596138 tsc=reliable"));
    }

    #[test]
    fn machine_names_parse_and_unknown_ones_are_refused() {
        assert_eq!("q35".parse::<Machine>().ok(), Some(Machine::Q35));
        assert_eq!("microvm".parse::<Machine>().ok(), Some(Machine::Microvm));
        assert!(matches!(
            "pc".parse::<Machine>(),
            Err(crate::QemuError::UnknownMachine { ref name }) if name == "pc"
        ));
    }

    #[test]
    fn memory_is_a_shared_memfd_the_size_of_the_guest() {
        let args = line(AccelKind::Tcg, "");
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-memfd,id=mem,size=256M,share=on"]
        );
        assert_eq!(values(&args, "-machine"), ["memory-backend=mem"]);
        assert_eq!(values(&args, "-m"), ["256"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
    }

    #[test]
    fn a_memory_maximum_adds_a_virtio_mem_device_for_the_rest_onlined_movable() {
        let paths = RuntimePaths::new(Path::new("/tmp/uvm-a-XYZ"));
        let args = qemu_command_line(&QemuCommand {
            kernel: Path::new("/img/vmlinux"),
            initramfs: Path::new("/img/initramfs.cpio"),
            accel: AccelKind::Tcg,
            machine: Machine::Q35,
            bios: None,
            memory_mib: 256,
            max_memory_mib: Some(1024),
            cpus: 1,
            max_cpus: None,
            paths: &paths,
            extra_cmdline: "",
            disk_args: &[],
        });
        assert_eq!(values(&args, "-m"), ["256,maxmem=1024M"]);
        assert_eq!(
            values(&args, "-object"),
            [
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "memory-backend-memfd,id=vmem,size=768M,share=on"
            ]
        );
        assert!(values(&args, "-device")
            .contains(&"virtio-mem-pci,id=vmem0,memdev=vmem,block-size=2M,requested-size=0"));
        assert!(values(&args, "-append")[0].contains("memhp_default_state=online_movable"));
        // Without a maximum above the boot size: none of it.
        assert_eq!(values(&line(AccelKind::Tcg, ""), "-m"), ["256"]);
        assert!(!values(&line(AccelKind::Tcg, ""), "-append")[0].contains("memhp"));
    }

    #[test]
    fn accelerator_picks_machine_and_cpu_model() {
        let tcg = line(AccelKind::Tcg, "");
        assert_eq!(values(&tcg, "-M"), ["q35,accel=tcg"]);
        assert_eq!(values(&tcg, "-cpu"), ["max"]);
        assert!(!tcg.iter().any(|a| a.contains("kvm")));
        let kvm = line(AccelKind::Kvm, "");
        assert_eq!(values(&kvm, "-M"), ["q35,accel=kvm"]);
        assert_eq!(values(&kvm, "-cpu"), ["host"]);
    }

    #[test]
    fn kernel_command_line_appends_extra() {
        assert_eq!(
            values(&line(AccelKind::Tcg, ""), "-append"),
            [format!("{BASE_KERNEL_CMDLINE} {FAST_BOOT_ARGS}")]
        );
        assert_eq!(
            values(&line(AccelKind::Tcg, "  uvm.debug=1 "), "-append"),
            [format!(
                "{BASE_KERNEL_CMDLINE} {FAST_BOOT_ARGS} uvm.debug=1"
            )]
        );
    }

    #[test]
    fn devices_and_sockets_live_in_the_runtime_dir() {
        let args = line(AccelKind::Tcg, "");
        assert_eq!(
            values(&args, "-chardev"),
            ["socket,id=vsock,path=/tmp/uvm-a-XYZ/vhost.sock"]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "vhost-user-vsock-pci,chardev=vsock",
                "virtio-balloon-pci,id=balloon0"
            ]
        );
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/tmp/uvm-a-XYZ/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            values(&args, "-serial"),
            ["file:/tmp/uvm-a-XYZ/console.log"]
        );
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert_eq!(values(&args, "-kernel"), ["/img/vmlinux"]);
        assert_eq!(values(&args, "-initrd"), ["/img/initramfs.cpio"]);
    }

    #[test]
    fn vhost_vsock_serves_cid_3_on_the_runtime_sockets() {
        let paths = RuntimePaths::new(Path::new("/tmp/uvm-a-XYZ"));
        assert_eq!(
            vhost_vsock_command_line(&paths),
            [
                "--vm",
                "guest-cid=3,socket=/tmp/uvm-a-XYZ/vhost.sock,uds-path=/tmp/uvm-a-XYZ/vsock.sock"
            ]
        );
    }

    #[test]
    fn longest_socket_path_is_a_u32_port_listener() {
        assert_eq!(
            RuntimePaths::longest_socket_path(Path::new("/r")),
            Path::new("/r/vsock.sock_4294967295")
        );
    }
}
