//! Create validation, operations on VMs that never ran, and start failures with stand-in programs
//! (no QEMU needed: `/bin/false`, shell scripts).

use std::os::unix::fs::PermissionsExt;

use super::*;

struct Fixture {
    root: tempfile::TempDir,
    files: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let files = tempfile::tempdir().expect("tempdir");
        std::fs::write(files.path().join("vmlinux"), b"kernel").expect("write");
        std::fs::write(files.path().join("initramfs"), b"initramfs").expect("write");
        Fixture {
            root: tempfile::tempdir().expect("tempdir"),
            files,
        }
    }

    fn config(&self) -> QemuConfig {
        QemuConfig {
            qemu: "/bin/true".into(),
            vhost_vsock: "/bin/true".into(),
            virtiofsd: None,
            share_hotplug_ports: 0,
            device_hotplug_ports: 0,
            kernel: self.files.path().join("vmlinux"),
            initramfs: self.files.path().join("initramfs"),
            accel: crate::Accel::Tcg,
            machine: crate::Machine::Q35,
            qboot: self.files.path().join("qboot.rom"),
            runtime_root: self.root.path().to_path_buf(),
            extra_cmdline: String::new(),
            terminate_grace: Duration::from_secs(1),
            tsc_cache: None,
            // Unit tests leave the host's cgroups alone (the real-VM tests use them).
            cgroup_parent: None,
        }
    }

    /// An executable shell script in the files directory.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let path = self.files.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn runtime_entries(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.root.path())
            .expect("read root")
            .map(|e| e.expect("entry").path())
            .collect()
    }
}

/// Asserts that `r` is the `InvalidInput` error about `what`.
fn assert_invalid<T: std::fmt::Debug>(r: &Result<T, HostError>, what: &str) {
    assert!(
        matches!(r, Err(HostError::InvalidInput { what: w, .. }) if *w == what),
        "expected invalid {what}, got {r:?}"
    );
}

fn vm_config(memory_mib: u64, cpus: u32) -> VmConfig {
    VmConfig {
        memory_mib,
        cpus,
        security_policy: None,
        ..VmConfig::default()
    }
}

#[test]
fn create_refuses_too_little_memory() {
    let f = Fixture::new();
    let r = QemuBackend::new(f.config()).create_vm("a", &vm_config(63, 1));
    assert_invalid(&r, "memory size");
    assert!(f.runtime_entries().is_empty());
}

#[tokio::test]
async fn create_refuses_a_memory_maximum_that_cannot_be_plugged() {
    let f = Fixture::new();
    let backend = QemuBackend::new(f.config());
    let with_max = |memory_mib, max| VmConfig {
        max_memory_mib: Some(max),
        ..vm_config(memory_mib, 1)
    };
    // Not above the boot memory; not in virtio-mem's 2 MiB blocks.
    for config in [
        with_max(256, 256),
        with_max(256, 128),
        with_max(257, 512),
        with_max(256, 513),
    ] {
        assert_invalid(&backend.create_vm("a", &config), "memory maximum");
    }
    let mut microvm = f.config();
    microvm.machine = crate::Machine::Microvm;
    std::fs::write(&microvm.qboot, b"rom").expect("qboot");
    assert_invalid(
        &QemuBackend::new(microvm).create_vm("a", &with_max(256, 512)),
        "memory maximum",
    );
    assert!(f.runtime_entries().is_empty());
    // A good one: its memory moves in 2 MiB blocks, up to the maximum.
    let vm = backend.create_vm("a", &with_max(256, 512)).expect("create");
    assert_eq!(vm.memory_granularity(), 2 << 20);
    assert_invalid(&vm.update_memory(514 << 20).await, "memory size");
    assert_invalid(&vm.update_memory(301 << 20).await, "memory size");
    vm.release().await.expect("release");
}

#[test]
fn create_refuses_cpu_counts_outside_1_to_64() {
    let f = Fixture::new();
    let backend = QemuBackend::new(f.config());
    for cpus in [0, 65] {
        let r = backend.create_vm("a", &vm_config(256, cpus));
        assert_invalid(&r, "CPU count");
    }
    assert!(f.runtime_entries().is_empty());
}

#[test]
fn create_refuses_missing_boot_files_and_binaries() {
    let f = Fixture::new();
    type Breaks = fn(&mut QemuConfig);
    let cases: [(&str, Breaks); 4] = [
        ("kernel", |c| c.kernel = "/nonexistent/vmlinux".into()),
        ("initramfs", |c| c.initramfs = "/nonexistent/initrd".into()),
        ("QEMU binary", |c| c.qemu = "/nonexistent/qemu".into()),
        // A file, but not executable.
        ("vhost-device-vsock binary", |c| {
            c.vhost_vsock = c.kernel.clone()
        }),
    ];
    for (expected, breaks) in cases {
        let mut config = f.config();
        breaks(&mut config);
        let r = QemuBackend::new(config).create_vm("a", &vm_config(256, 1));
        assert_invalid(&r, expected);
    }
    assert!(f.runtime_entries().is_empty());
}

#[test]
fn create_refuses_microvm_without_its_firmware() {
    let f = Fixture::new();
    let mut config = f.config();
    config.machine = crate::Machine::Microvm;
    let r = QemuBackend::new(config).create_vm("a", &vm_config(256, 1));
    assert_invalid(&r, "machine");
    assert!(f.runtime_entries().is_empty());
}

#[test]
fn create_refuses_runtime_roots_unfit_for_sockets_or_qemu_options() {
    let f = Fixture::new();
    let mut config = f.config();
    config.runtime_root = f.root.path().join("x".repeat(90));
    let r = QemuBackend::new(config).create_vm("a", &vm_config(256, 1));
    assert_invalid(&r, "runtime root");
    let mut config = f.config();
    config.runtime_root = f.root.path().join("a,b");
    let r = QemuBackend::new(config).create_vm("a", &vm_config(256, 1));
    assert_invalid(&r, "runtime root");
    assert!(f.runtime_entries().is_empty());
}

#[test]
fn create_failing_on_the_directory_leaves_nothing() {
    let f = Fixture::new();
    let mut config = f.config();
    config.runtime_root = f.root.path().join("missing");
    let r = QemuBackend::new(config).create_vm("a", &vm_config(256, 1));
    assert!(
        matches!(
            r,
            Err(HostError::Io {
                operation: "create the runtime directory",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(f.runtime_entries().is_empty());
}

#[tokio::test]
async fn create_makes_a_private_runtime_dir_named_after_the_vm() {
    let f = Fixture::new();
    let vm = QemuBackend::new(f.config())
        .create_vm("My VM/42!", &vm_config(256, 2))
        .expect("create");
    let dir = vm.runtime_dir().to_path_buf();
    assert_eq!(dir.parent(), Some(f.root.path()));
    let name = vm.runtime_id();
    assert!(name.starts_with("uvm-MyVM42-"), "{name}");
    assert_eq!(
        dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        Some(name)
    );
    let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(
        vm.guest_endpoint(),
        GuestEndpoint::HybridVsock {
            uds: dir.join("vsock.sock")
        }
    );
    assert_eq!(vm.qemu_pid(), None);
    assert_eq!(vm.boot_marks(), BootMarks::default());
    vm.release().await.expect("release");
    assert!(!dir.exists());
}

#[tokio::test]
async fn resources_are_typed_unsupported_or_checked() {
    let f = Fixture::new();
    let vm = QemuBackend::new(f.config())
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    assert!(matches!(
        vm.set_cpu_group("group").await,
        Err(HostError::Unsupported {
            backend: "qemu",
            operation: "set_cpu_group"
        })
    ));
    assert!(matches!(
        vm.update_cpu_limits(CpuLimits::default()).await,
        Err(HostError::Unsupported {
            backend: "qemu",
            operation: "update_cpu_limits"
        })
    ));
    assert_eq!(vm.memory_granularity(), 1 << 20);
    for bytes in [0, 257 << 20, (128 << 20) + 4096] {
        assert_invalid(&vm.update_memory(bytes).await, "memory size");
    }
    // Valid size, but no VM process.
    assert!(matches!(
        vm.update_memory(128 << 20).await,
        Err(HostError::Gone)
    ));
    assert!(matches!(vm.stats().await, Err(HostError::Gone)));
    vm.release().await.expect("release");
}

#[tokio::test]
async fn a_never_started_vm_terminates_and_releases_cleanly() {
    let f = Fixture::new();
    let vm = QemuBackend::new(f.config())
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    vm.terminate().await.expect("terminate");
    vm.release().await.expect("release");
    vm.release().await.expect("release is idempotent");
    let exit = vm.wait().await;
    assert_eq!(exit.reason.as_deref(), Some("not-started"));
    assert!(f.runtime_entries().is_empty());
    assert!(matches!(
        vm.start().await,
        Err(HostError::Failed {
            operation: "start VM",
            ..
        })
    ));
}

#[tokio::test]
async fn dropping_an_unreleased_vm_removes_its_directory() {
    let f = Fixture::new();
    let vm = QemuBackend::new(f.config())
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    assert_eq!(f.runtime_entries().len(), 1);
    drop(vm);
    assert!(f.runtime_entries().is_empty());
}

#[tokio::test]
async fn a_vsock_device_that_exits_fails_start_fast_with_its_output() {
    let f = Fixture::new();
    let mut config = f.config();
    config.vhost_vsock = f.script("vsock", "echo 'no such device' >&2; exit 3");
    let vm = QemuBackend::new(config)
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    let r = tokio::time::timeout(Duration::from_secs(5), vm.start())
        .await
        .expect("start fails fast");
    assert!(
        matches!(&r, Err(e @ HostError::Failed { operation: "start VM", .. })
            if { let message = uvm_util::error_chain(e); message.contains("vhost-device-vsock exited") && message.contains("no such device") }),
        "{r:?}"
    );
    assert_eq!(vm.wait().await.reason.as_deref(), Some("not-started"));
    assert!(vm.vsock_pid().is_some());
    assert_eq!(vm.qemu_pid(), None);
    vm.release().await.expect("release");
    assert!(f.runtime_entries().is_empty());
}

#[tokio::test]
async fn terminate_stops_a_start_that_is_waiting_for_the_vsock_device() {
    let f = Fixture::new();
    let mut config = f.config();
    // Never creates its socket.
    config.vhost_vsock = f.script("vsock", "exec sleep 30");
    let vm = Arc::new(
        QemuBackend::new(config)
            .create_vm("a", &vm_config(256, 1))
            .expect("create"),
    );
    let starting = tokio::spawn({
        let vm = vm.clone();
        async move { vm.start().await }
    });
    // Wait until the device process exists.
    while vm.vsock_pid().is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = vm.vsock_pid().expect("spawned");
    vm.terminate().await.expect("terminate");
    let r = tokio::time::timeout(Duration::from_secs(5), starting)
        .await
        .expect("start ends promptly")
        .expect("task ran");
    assert!(
        matches!(&r, Err(e @ HostError::Failed { operation: "start VM", .. }) if { let message = uvm_util::error_chain(e); message.contains("stopped") }),
        "{r:?}"
    );
    vm.release().await.expect("release");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(f.runtime_entries().is_empty());
}

#[test]
fn command_lines_are_exactly_what_create_vm_would_run() {
    let f = Fixture::new();
    let mut config = f.config();
    config.extra_cmdline = "loglevel=7".to_owned();
    let backend = QemuBackend::new(config);
    let vm = backend.create_vm("a", &vm_config(512, 2)).expect("create");
    let lines = backend
        .command_lines(&vm.runtime_dir, &vm_config(512, 2))
        .expect("command lines");
    let program = |p: &Path| p.display().to_string();
    let launch = &vm.launch;
    assert_eq!(lines.vhost_vsock[0], program(&launch.vsock_program));
    assert_eq!(lines.vhost_vsock[1..], launch.vsock_args[..]);
    assert_eq!(lines.qemu[0], program(&launch.qemu_program));
    assert_eq!(lines.qemu[1..], launch.qemu_args[..]);
    assert!(lines.qemu.iter().any(|a| a.ends_with(" loglevel=7")));
}

#[test]
fn command_lines_make_the_checks_create_vm_makes_and_create_nothing() {
    let f = Fixture::new();
    let backend = QemuBackend::new(f.config());
    let dir = f.root.path().join("vm");
    let r = backend.command_lines(&dir, &vm_config(1, 1));
    assert_invalid(&r, "memory size");
    for bad in [
        f.root.path().join("a,b"),
        f.root.path().join("x".repeat(90)),
    ] {
        let r = backend.command_lines(&bad, &vm_config(256, 1));
        assert_invalid(&r, "runtime directory");
    }
    let mut config = f.config();
    config.machine = crate::Machine::Microvm;
    let r = QemuBackend::new(config).command_lines(&dir, &vm_config(256, 1));
    assert_invalid(&r, "machine");
    let lines = backend
        .command_lines(&dir, &vm_config(256, 1))
        .expect("lines");
    assert!(lines
        .qemu
        .iter()
        .any(|a| a.contains(&*dir.to_string_lossy())));
    assert!(f.runtime_entries().is_empty(), "nothing is created");
}

#[tokio::test]
async fn disks_are_checked_before_qemu_is_asked_and_empty_slots_detach() {
    use uvm::seams::{DiskConfig, DiskLocation, HostDevices, ScsiSlot};
    let f = Fixture::new();
    let vm = QemuBackend::new(f.config())
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    let image = f.files.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).expect("image");
    let at = |controller, lun| ScsiSlot { controller, lun };
    assert_invalid(
        &vm.attach_disk(at(0, 0), &DiskConfig::raw(f.files.path().join("nope")))
            .await,
        "disk",
    );
    // One controller by default: controller 1 and LUN 64 do not exist.
    assert_invalid(
        &vm.attach_disk(at(1, 0), &DiskConfig::raw(&image)).await,
        "SCSI slot",
    );
    assert_invalid(
        &vm.attach_disk(at(0, 64), &DiskConfig::raw(&image)).await,
        "SCSI slot",
    );
    // A good request reaches for QEMU, which is not running.
    assert!(matches!(
        vm.attach_disk(at(0, 0), &DiskConfig::raw(&image)).await,
        Err(HostError::Gone)
    ));
    vm.detach_disk(at(0, 0)).await.expect("nothing attached");
    assert_eq!(
        vm.disk_location(at(0, 5)),
        // LUN 0 stays empty (`disks::scsi_lun`).
        DiskLocation::Scsi {
            controller: 0,
            lun: 6
        }
    );
    vm.release().await.expect("release");
}

#[test]
fn disks_given_at_create_are_checked_and_put_on_the_command_line() {
    use uvm::seams::{DiskConfig, DiskMount, DiskSpec};
    let f = Fixture::new();
    let image = f.files.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).expect("image");
    let spec = |path: PathBuf| DiskSpec {
        disk: DiskConfig::raw(path),
        mount: DiskMount::at("/mnt/d"),
    };
    let backend = QemuBackend::new(f.config());
    let missing = VmConfig {
        disks: vec![spec(f.files.path().join("nope"))],
        ..vm_config(256, 1)
    };
    assert_invalid(&backend.create_vm("a", &missing), "disk");
    assert!(
        f.runtime_entries().is_empty(),
        "a refused create leaves nothing"
    );
    let good = VmConfig {
        disks: vec![spec(image.clone())],
        ..vm_config(256, 1)
    };
    let lines = backend
        .command_lines(&f.root.path().join("d"), &good)
        .expect("command lines");
    let qemu = lines.qemu.join(" ");
    assert!(
        qemu.contains("virtio-scsi-pci,id=scsi0,addr=0x10.0"),
        "{qemu}"
    );
    assert!(
        qemu.contains("scsi-hd,id=disk0,drive=disk0,bus=scsi0.0"),
        "{qemu}"
    );
    assert!(qemu.contains(&image.display().to_string()), "{qemu}");
}

#[tokio::test]
async fn a_share_at_create_whose_host_directory_is_missing_or_a_file_is_refused_leaving_nothing() {
    let f = Fixture::new();
    let file = f.files.path().join("vmlinux");
    for host_path in [f.files.path().join("missing"), file] {
        let mut config = vm_config(256, 1);
        config.shares = vec![uvm::seams::ShareSpec {
            share: uvm::seams::ShareConfig {
                host_path,
                read_only: false,
            },
            mount: uvm::seams::ShareMount {
                guest_path: "/mnt".into(),
                read_only: false,
            },
        }];
        let refused = QemuBackend::new(f.config()).create_vm("a", &config);
        assert!(matches!(
            refused,
            Err(HostError::InvalidInput {
                what: "share host path",
                ..
            })
        ));
        assert!(f.runtime_entries().is_empty());
    }
}

#[tokio::test]
async fn a_share_added_before_the_vm_runs_fails_and_leaves_nothing() {
    use uvm::seams::{HostDevices, ShareConfig, ShareTransport};
    let f = Fixture::new();
    let mut config = f.config();
    config.virtiofsd = Some("/bin/true".into());
    config.share_hotplug_ports = 1;
    let vm = QemuBackend::new(config)
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    assert_eq!(vm.share_transport("any"), ShareTransport::VirtioFs);
    let share = ShareConfig {
        host_path: f.files.path().to_path_buf(),
        read_only: true,
    };
    assert!(matches!(
        vm.add_share("t", &share).await,
        Err(HostError::Failed {
            operation: "add share",
            ..
        })
    ));
    assert!(vm.share_tags().is_empty());
    assert!(vm.helper_pids().is_empty());
    vm.remove_share("t")
        .await
        .expect("removing an unknown share is harmless");
    vm.release().await.expect("release");
    assert!(f.runtime_entries().is_empty());
}

#[tokio::test]
async fn a_hot_share_without_a_free_port_or_over_9p_is_refused_before_anything_runs() {
    use uvm::seams::{HostDevices, ShareConfig};
    let f = Fixture::new();
    let share = ShareConfig {
        host_path: f.files.path().to_path_buf(),
        read_only: true,
    };
    let mut no_port = f.config();
    no_port.virtiofsd = Some("/bin/true".into());
    no_port.share_hotplug_ports = 0;
    let vm = QemuBackend::new(no_port)
        .create_vm("a", &vm_config(256, 1))
        .expect("create");
    let r = vm.add_share("t", &share).await;
    assert!(
        matches!(&r, Err(e @ HostError::Failed { operation: "add share", .. })
            if uvm_util::error_chain(e).contains("no free PCIe hotplug port")),
        "{r:?}"
    );
    vm.release().await.expect("release");

    let mut nine_p = f.config();
    nine_p.virtiofsd = None;
    nine_p.share_hotplug_ports = 2;
    let vm = QemuBackend::new(nine_p)
        .create_vm("b", &vm_config(256, 1))
        .expect("create");
    assert_eq!(vm.share_transport("t"), uvm::seams::ShareTransport::NineP);
    assert!(matches!(
        vm.add_share("t", &share).await,
        Err(HostError::Unsupported {
            backend: "qemu",
            ..
        })
    ));
    vm.release().await.expect("release");
    assert!(f.runtime_entries().is_empty());
}
