//! Real-process tests: they spawn `vhost-device-vsock` and boot `qemu-system-x86_64` (TCG unless
//! the CPU has vmx/svm). Every test is named `real_vm_*`: nextest runs them in the `real-vm`
//! group (`.config/nextest.toml`), and `make check` leaves them out. None talks to the guest
//! agent: the guest is only booted.
//!
//! They boot the default image, as `uvmctl run` does (`uvm_image::ImageSpec::from_env`: our
//! kernel when built, the agent from `make agent`). A machine without what they need fails
//! them, naming what is missing and the command that provides it (`make test` runs the set-up
//! first); no test passes without running.

use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

use uvm::seams::{VmConfig, VmLifetime, VmResources};
use uvm::testing::{FakeGuest, Script};
use uvm::{Controller, Reason, State, Timeouts};
use uvm_image::ImageSpec;
use uvm_qemu::{find_binary, QemuBackend, QemuConfig, QemuVm};

/// Keeps the guest alive whatever its `/init` does: a panicking kernel halts instead of
/// rebooting (later `panic=` wins over the base command line's `panic=-1`).
const HALT_ON_PANIC: &str = "panic=0";

/// Fails the test: a real-VM test whose prerequisites are missing says which, and how to get it.
fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` and `make agent` first)"
    )
}

fn require_binaries() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        if !find_binary(name).is_absolute() {
            missing(format_args!(
                "{name} is not installed; `make setup` installs it"
            ));
        }
    }
}

/// A config for a real boot of the default image.
fn real_config(root: &Path) -> QemuConfig {
    require_binaries();
    let spec = ImageSpec::from_env().unwrap_or_else(|e| missing(e));
    let image = uvm_image::ensure_image(&spec).expect("build the guest image");
    let mut config = QemuConfig::new(image.kernel, image.initramfs);
    config.runtime_root = root.to_path_buf();
    config.extra_cmdline = HALT_ON_PANIC.to_owned();
    config.terminate_grace = Duration::from_secs(3);
    config
}

fn short_root() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("uvmq")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

fn small_vm() -> VmConfig {
    VmConfig {
        memory_mib: 256,
        cpus: 1,
        security_policy: None,
        ..VmConfig::default()
    }
}

/// Whether `pid` is (still) a child of this test process — running or a zombie.
fn is_our_child(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the `(comm)`: state ppid ...
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ppid = after_comm.split_whitespace().nth(1);
    ppid == Some(std::process::id().to_string().as_str())
}

fn assert_gone(vm: &QemuVm, pids: &[u32], dir: &Path) {
    for &pid in pids {
        assert!(
            !is_our_child(pid),
            "process {pid} is still our child (running or zombie)"
        );
    }
    assert!(!dir.exists(), "runtime dir {} remains", dir.display());
    assert!(vm.qemu_pid().is_some());
}

async fn started(config: QemuConfig, id: &str) -> QemuVm {
    let vm = QemuBackend::new(config)
        .create_vm(id, &small_vm())
        .expect("create");
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), vm.start())
        .await
        .expect("start within 60 s")
        .expect("start");
    let m = vm.boot_marks();
    let ms = |a: Option<Instant>, b: Option<Instant>| {
        b.zip(a)
            .map(|(b, a)| b.duration_since(a).as_secs_f64() * 1e3)
    };
    eprintln!(
        "{id}: start() {:.1} ms; vsock spawn→listening {:.1?} ms; qemu spawn→QMP ready {:.1?} ms",
        t0.elapsed().as_secs_f64() * 1e3,
        ms(m.vsock_spawned, m.vsock_ready),
        ms(m.qemu_spawned, m.qmp_ready),
    );
    vm
}

fn console_tail(vm: &QemuVm) -> String {
    let text = std::fs::read_to_string(&vm.paths().console_log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_boot_stats_quit_release() {
    let root = short_root();
    let config = real_config(root.path());
    let vm = started(config, "quit").await;
    let qemu = vm.qemu_pid().expect("qemu spawned");
    let vsock = vm.vsock_pid().expect("vsock spawned");
    assert!(is_our_child(qemu) && is_our_child(vsock));
    // (vhost.sock is gone already: vhost-device-vsock unlinks it once QEMU has connected.)
    for f in ["vsock.sock", "qmp.sock", "console.log"] {
        assert!(vm.runtime_dir().join(f).exists(), "{f} missing");
    }

    // TCG is busy booting: CPU time shows up within a few clock ticks.
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let s = vm.stats().await.expect("stats");
        if !s.cpu_time.is_zero() || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("stats: {stats:?}");
    assert!(!stats.cpu_time.is_zero());
    assert!(stats.rss_bytes > 1 << 20);

    // QEMU takes the balloon target whether or not the guest's driver is loaded yet.
    vm.update_memory(128 << 20).await.expect("balloon");
    assert!(vm.balloon_actual().await.expect("query-balloon") > 0);

    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("console:\n{}", console_tail(&vm));
    vm.terminate().await.expect("terminate");
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .expect("wait resolves after terminate");
    assert_eq!(exit.reason.as_deref(), Some("host-qmp-quit"), "{exit:?}");
    assert_eq!(exit.code, Some(0));
    assert_eq!(exit.signal, None);
    // wait() may be called again and concurrently.
    let (a, b) = tokio::join!(vm.wait(), vm.wait());
    assert_eq!((&a, &b), (&exit, &exit));
    // terminate on an ended VM is harmless; stats says it is gone.
    vm.terminate().await.expect("terminate again");
    assert!(matches!(vm.stats().await, Err(uvm::HostError::Gone)));

    let dir = vm.runtime_dir().to_path_buf();
    vm.release().await.expect("release");
    assert_gone(&vm, &[qemu, vsock], &dir);
    vm.release().await.expect("release is idempotent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_killed_from_outside_reports_the_signal() {
    let root = short_root();
    let config = real_config(root.path());
    let vm = started(config, "killed").await;
    let qemu = vm.qemu_pid().expect("qemu spawned");
    let vsock = vm.vsock_pid().expect("vsock spawned");
    let pid = rustix::process::Pid::from_raw(i32::try_from(qemu).expect("pid fits")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill qemu");
    let exit = tokio::time::timeout(Duration::from_secs(5), vm.wait())
        .await
        .expect("wait resolves after SIGKILL");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert_eq!(exit.code, None);
    assert_eq!(exit.reason, None);
    let dir = vm.runtime_dir().to_path_buf();
    vm.release().await.expect("release");
    assert_gone(&vm, &[qemu, vsock], &dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_terminate_kills_a_qemu_that_does_not_answer() {
    let root = short_root();
    let mut config = real_config(root.path());
    config.terminate_grace = Duration::from_millis(500);
    let vm = started(config, "stopped").await;
    let qemu = vm.qemu_pid().expect("qemu spawned");
    let vsock = vm.vsock_pid().expect("vsock spawned");
    // A stopped QEMU cannot answer QMP: terminate must escalate to SIGKILL after the grace.
    let pid = rustix::process::Pid::from_raw(i32::try_from(qemu).expect("pid fits")).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("stop qemu");
    let t0 = Instant::now();
    vm.terminate().await.expect("terminate");
    eprintln!("terminate took {:?}", t0.elapsed());
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert_eq!(vm.wait().await.signal, Some(9));
    let dir = vm.runtime_dir().to_path_buf();
    vm.release().await.expect("release");
    assert_gone(&vm, &[qemu, vsock], &dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_dropping_the_vm_kills_and_reaps_its_processes() {
    let root = short_root();
    let config = real_config(root.path());
    let vm = started(config, "dropped").await;
    let pids = [
        vm.qemu_pid().expect("qemu spawned"),
        vm.vsock_pid().expect("vsock spawned"),
    ];
    let dir = vm.runtime_dir().to_path_buf();
    drop(vm);
    assert!(!dir.exists());
    // The supervisor thread reaps them right after the kill.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| is_our_child(p)) {
        assert!(Instant::now() < deadline, "children not reaped after drop");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_qemu_exiting_at_once_fails_start_and_ends_the_vsock_device() {
    require_binaries();
    let root = short_root();
    let files = tempfile::tempdir().expect("tempdir");
    let fake_qemu = files.path().join("qemu");
    std::fs::write(
        &fake_qemu,
        "#!/bin/sh\necho 'qemu: bad option' >&2\nexit 1\n",
    )
    .expect("write");
    std::fs::set_permissions(
        &fake_qemu,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::write(files.path().join("k"), b"k").expect("write");
    let mut config = QemuConfig::new(files.path().join("k"), files.path().join("k"));
    config.qemu = fake_qemu;
    config.runtime_root = root.path().to_path_buf();
    let vm = QemuBackend::new(config)
        .create_vm("bad", &small_vm())
        .expect("create");
    let r = tokio::time::timeout(Duration::from_secs(10), vm.start())
        .await
        .expect("start fails fast");
    assert!(
        matches!(&r, Err(e @ uvm::HostError::Failed { operation: "start VM", .. })
            if { let message = uvm_util::error_chain(e); message.contains("qemu exited") && message.contains("bad option") }),
        "{r:?}"
    );
    let exit = vm.wait().await;
    assert_eq!((exit.code, exit.reason.as_deref()), (Some(1), None));
    let pids = [
        vm.qemu_pid().expect("spawned"),
        vm.vsock_pid().expect("spawned"),
    ];
    let dir = vm.runtime_dir().to_path_buf();
    vm.release().await.expect("release");
    assert_gone(&vm, &pids, &dir);
}

fn controller(config: QemuConfig, id: &str) -> Controller {
    let guest = Arc::new(FakeGuest::new(Script::default()));
    Controller::new(
        id,
        Arc::new(QemuBackend::new(config)),
        guest,
        Timeouts::default(),
    )
}

fn runtime_dirs(root: &Path) -> usize {
    std::fs::read_dir(root).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_controller_starts_and_terminates_a_qemu_vm() {
    let root = short_root();
    let config = real_config(root.path());
    let c = controller(config, "ctl-quit");
    c.create_vm(small_vm()).await.expect("create_vm");
    assert_eq!(runtime_dirs(root.path()), 1);
    c.start_vm().await.expect("start_vm");
    assert_eq!(c.state(), State::Running);
    let stats = c.stats().await.expect("stats");
    assert!(stats.rss_bytes > 0);
    assert_eq!(
        c.update_memory(100 << 20).await.expect("update_memory"),
        100 << 20
    );
    // A group that does not exist is a typed NotFound (the VM has a cgroup: CI runs as root).
    assert!(matches!(
        c.update_cpu_group("no-such-group").await,
        Err(uvm::ControllerError::Host {
            source: uvm::HostError::NotFound { .. },
            ..
        })
    ));
    c.terminate_vm().await.expect("terminate_vm");
    assert_eq!(c.state(), State::Terminated);
    let status = c.exit_status().expect("exit status");
    let exit = status.exit.expect("the VM ran");
    assert_eq!(exit.reason.as_deref(), Some("host-qmp-quit"), "{exit:?}");
    assert_eq!(runtime_dirs(root.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_controller_sees_a_guest_that_ends_by_itself() {
    let root = short_root();
    let mut config = real_config(root.path());
    // No init anywhere: the kernel panics and reboots (panic=-1), which -no-reboot makes an exit.
    config.extra_cmdline = "rdinit=/nonexistent root=/dev/nonexistent".to_owned();
    let c = controller(config, "ctl-reset");
    c.create_vm(small_vm()).await.expect("create_vm");
    c.start_vm().await.expect("start_vm");
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.state() == State::Running {
        assert!(Instant::now() < deadline, "the guest never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(c.state(), State::Terminated);
    let status = c.exit_status().expect("exit status");
    let Reason::Exited(exit) = &status.reason else {
        panic!("not an exit: {:?}", status.reason);
    };
    assert_eq!(exit.reason.as_deref(), Some("guest-reset"), "{exit:?}");
    assert_eq!(exit.code, Some(0));
    // The controller released the VM after its exit: nothing of it remains.
    assert_eq!(runtime_dirs(root.path()), 0);
}

// --- Shares: the virtiofsd the backend spawns, without a guest ---

/// An executable script `name` in `dir` that prints `message` and fails.
fn failing_program(dir: &Path, name: &str, message: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\necho '{message}' >&2\nexit 3\n")).expect("write");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

fn share_spec(host_path: &Path) -> uvm::seams::ShareSpec {
    uvm::seams::ShareSpec {
        share: uvm::seams::ShareConfig {
            host_path: host_path.to_path_buf(),
            read_only: false,
        },
        mount: uvm::seams::ShareMount {
            guest_path: "/mnt".into(),
            read_only: false,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_virtiofsd_failing_at_start_fails_the_start_and_leaves_nothing() {
    let root = short_root();
    let files = tempfile::tempdir().expect("tempdir");
    let mut config = real_config(root.path());
    config.virtiofsd = Some(failing_program(
        files.path(),
        "virtiofsd",
        "virtiofsd: bad dir",
    ));
    let mut vm_config = small_vm();
    vm_config.shares = vec![share_spec(files.path())];
    let vm = QemuBackend::new(config)
        .create_vm("badfs", &vm_config)
        .expect("create");
    let r = tokio::time::timeout(Duration::from_secs(20), vm.start())
        .await
        .expect("start fails fast");
    assert!(
        matches!(&r, Err(e @ uvm::HostError::Failed { operation: "start VM", .. })
            if { let m = uvm_util::error_chain(e); m.contains("virtiofsd exited") && m.contains("bad dir") }),
        "{r:?}"
    );
    assert_eq!(vm.qemu_pid(), None, "QEMU never started without its share");
    let mut pids = vm.helper_pids();
    pids.extend(vm.vsock_pid());
    let dir = vm.runtime_dir().to_path_buf();
    vm.release().await.expect("release");
    for pid in pids {
        assert!(!is_our_child(pid), "process {pid} remains");
    }
    assert!(!dir.exists(), "runtime dir {} remains", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_hot_added_share_whose_virtiofsd_fails_is_refused_and_the_vm_runs_on() {
    use uvm::seams::{HostDevices, ShareConfig};
    let root = short_root();
    let files = tempfile::tempdir().expect("tempdir");
    let mut config = real_config(root.path());
    config.virtiofsd = Some(failing_program(
        files.path(),
        "virtiofsd",
        "virtiofsd: no way",
    ));
    let vm = started(config, "hotfs").await;
    let share = ShareConfig {
        host_path: files.path().to_path_buf(),
        read_only: true,
    };
    let r = vm.add_share("t", &share).await;
    assert!(
        matches!(&r, Err(e @ uvm::HostError::Failed { operation: "add share", .. })
            if uvm_util::error_chain(e).contains("no way")),
        "{r:?}"
    );
    assert!(vm.share_tags().is_empty());
    assert!(
        vm.helper_pids().is_empty(),
        "the failed virtiofsd is forgotten"
    );
    let share_files: Vec<_> = std::fs::read_dir(vm.runtime_dir())
        .expect("runtime dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("share-"))
        .collect();
    assert!(share_files.is_empty(), "{share_files:?}");
    vm.stats().await.expect("the VM still runs");
    let pids = [vm.qemu_pid().expect("qemu"), vm.vsock_pid().expect("vsock")];
    let dir = vm.runtime_dir().to_path_buf();
    vm.terminate().await.expect("terminate");
    vm.release().await.expect("release");
    assert_gone(&vm, &pids, &dir);
}
