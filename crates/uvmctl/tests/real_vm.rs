//! Real-VM tests: they boot QEMU (TCG here) with the default image (our kernel when built) and
//! our agent, on each machine profile (`real_vm_q35::*`, `real_vm_microvm::*`). The `real_vm_`
//! prefix lets nextest run at most a few at once (`.config/nextest.toml`), and every test checks
//! at its end that no process of its VM remains and its runtime directory is gone. A machine
//! without what they need (`make setup`, `make agent`) fails them, naming what is missing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uvm::seams::ExecRequest;
use uvm::testing::Capture;
use uvm::{
    ControllerError, GuestError, GuestRequest, Reason, Rejection, SeamError, StartStep, State,
    Timeouts,
};
use uvm_host::processes_mentioning;
use uvm_vm::{default_image, Machine, Vm, VmOptions};

/// A VM under test with its own runtime root, so leaks can be found by path.
struct TestVm {
    vm: Vm,
    root: tempfile::TempDir,
}

fn options(root: &Path) -> VmOptions {
    VmOptions {
        runtime_root: Some(root.to_path_buf()),
        timeouts: Timeouts {
            guest_connect: Duration::from_secs(90),
            ..Timeouts::default()
        },
        ..VmOptions::default()
    }
}

/// Fails the test: a real-VM test whose prerequisites are missing says which, and how to get it.
fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` and `make agent` first)"
    )
}

/// What booting the default image needs: QEMU, vhost-device-vsock and the image's inputs (the
/// agent, busybox, a kernel), each error naming the command that provides it.
fn require_prerequisites() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        if !uvm_qemu::find_binary(name).is_absolute() {
            missing(format_args!(
                "{name} is not installed; `make setup` installs it"
            ));
        }
    }
    uvm_image::ImageSpec::from_env().unwrap_or_else(|e| missing(e));
}

fn new_vm_with(machine: Machine, f: impl FnOnce(&mut VmOptions)) -> TestVm {
    require_prerequisites();
    let image = default_image().expect("build the guest image");
    let root = tempfile::Builder::new()
        .prefix("uvmt")
        .tempdir_in("/tmp")
        .expect("runtime root");
    let mut opts = options(root.path());
    opts.machine = machine;
    f(&mut opts);
    TestVm {
        vm: Vm::new(&image, opts),
        root,
    }
}

async fn booted(machine: Machine) -> TestVm {
    let t = new_vm_with(machine, |_| {});
    t.vm.boot().await.expect("boot");
    assert_eq!(t.vm.controller.state(), State::Running);
    t
}

impl TestVm {
    /// Terminates the VM and asserts nothing of it is left: no process, no runtime directory.
    async fn finish(self) {
        self.vm.controller.terminate_vm().await.expect("terminate");
        assert_eq!(self.vm.controller.state(), State::Terminated);
        self.assert_clean();
    }

    fn assert_clean(&self) {
        let root = self.root.path();
        let left = processes_mentioning(root);
        assert!(left.is_empty(), "processes of the VM remain: {left:?}");
        let entries: Vec<PathBuf> = std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "runtime files remain: {entries:?}");
    }
}

async fn exec(vm: &Vm, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let (out, err) = (Capture::default(), Capture::default());
    let mut req = ExecRequest::new(args.iter().copied());
    req.stdout = Some(Box::new(out.clone()));
    req.stderr = Some(Box::new(err.clone()));
    if let Some(input) = stdin {
        req.stdin = Some(Box::new(std::io::Cursor::new(input.to_vec())));
    }
    let code = vm.controller.exec_into_host(req).await.expect("exec");
    (code, out.text(), err.text())
}

async fn boots_and_exec_of_uname_prints_linux(machine: Machine) {
    let t = booted(machine).await;
    let (code, out, _) = exec(&t.vm, &["uname", "-a"], None).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("Linux "), "{out:?}");
    t.finish().await;
}

async fn a_non_zero_exit_code_and_stderr_propagate(machine: Machine) {
    let t = booted(machine).await;
    let (code, out, err) = exec(&t.vm, &["sh", "-c", "echo oops >&2; exit 7"], None).await;
    assert_eq!((code, out.as_str(), err.as_str()), (7, "", "oops\n"));
    t.finish().await;
}

async fn stdin_round_trips_through_the_guest(machine: Machine) {
    let t = booted(machine).await;
    let input: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    let (code, out, _) = exec(&t.vm, &["cat"], Some(&input)).await;
    assert_eq!(code, 0);
    assert_eq!(out.as_bytes(), &input[..], "stdin came back byte for byte");
    t.finish().await;
}

async fn dump_stacks_and_stats_answer(machine: Machine) {
    let t = booted(machine).await;
    let stacks = t.vm.controller.dump_stacks().await.expect("dump stacks");
    assert!(!stacks.trim().is_empty());
    let host = t.vm.controller.stats().await.expect("host stats");
    assert!(
        host.rss_bytes > 0 && host.cpu_time > Duration::ZERO,
        "{host:?}"
    );
    let guest = t.vm.controller.guest_stats().await.expect("guest stats");
    assert!(
        guest.mem_total_bytes > 0 && guest.uptime > Duration::ZERO,
        "{guest:?}"
    );
    t.finish().await;
}

async fn terminate_ends_terminated_with_an_exit_status(machine: Machine) {
    let t = booted(machine).await;
    t.vm.controller.terminate_vm().await.expect("terminate");
    let status = t.vm.controller.exit_status().expect("terminated");
    assert_eq!(status.reason, Reason::TerminateRequested);
    assert!(status.exit.is_some(), "the VM process's exit was recorded");
    t.vm.controller
        .wait(&CancellationToken::new())
        .await
        .expect("wait returns after terminate");
    t.finish().await;
}

async fn qemu_killed_from_outside_ends_terminated_and_releases_pending_calls(machine: Machine) {
    let t = booted(machine).await;
    let root = t.root.path().to_path_buf();
    let controller = t.vm.controller.clone();
    let pending = tokio::spawn(async move {
        controller
            .exec_into_host(ExecRequest::new(["sleep", "600"]))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let qemu: Vec<u32> = processes_mentioning(&root)
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().starts_with("qemu"))
                .unwrap_or(false)
        })
        .collect();
    assert_eq!(qemu.len(), 1, "exactly one QEMU for this VM: {qemu:?}");
    let pid = rustix::process::Pid::from_raw(i32::try_from(qemu[0]).expect("pid fits"))
        .expect("non-zero pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill QEMU");

    let err = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the pending exec is released")
        .expect("join")
        .expect_err("the VM died");
    assert!(
        matches!(
            err,
            ControllerError::Guest {
                source: GuestError::ConnectionLost,
                ..
            }
        ),
        "{err:?}"
    );
    tokio::time::timeout(
        Duration::from_secs(30),
        t.vm.controller.wait(&CancellationToken::new()),
    )
    .await
    .expect("wait returns")
    .expect("wait");
    assert_eq!(t.vm.controller.state(), State::Terminated);
    let status = t.vm.controller.exit_status().expect("terminated");
    assert!(
        matches!(status.reason, Reason::Exited(ref e) if e.signal == Some(9)),
        "{status:?}"
    );
    // The waiter released the VM: nothing left even before anyone calls terminate.
    t.assert_clean();
    t.finish().await;
}

async fn an_agent_that_never_connects_fails_start_at_its_deadline(machine: Machine) {
    // rdinit=/bin/sh: the guest boots into a shell instead of our agent and never announces.
    let t = new_vm_with(machine, |o| {
        o.timeouts.guest_connect = Duration::from_secs(8);
        o.extra_cmdline = "rdinit=/bin/sh".into();
    });
    let err = t.vm.boot().await.expect_err("no agent");
    assert!(
        matches!(
            err,
            ControllerError::StartFailed {
                step: StartStep::ConnectGuest,
                source: SeamError::Guest(GuestError::Timeout { .. }),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(t.vm.controller.state(), State::Invalid);
    t.finish().await;
}

async fn terminate_during_boot_cancels_the_start_and_cleans_up(machine: Machine) {
    // The guest boots into a shell and never announces: the start is surely still waiting for
    // it when the terminate comes, however fast the machine.
    let t = new_vm_with(machine, |o| o.extra_cmdline = "rdinit=/bin/sh".into());
    let controller = t.vm.controller.clone();
    let vm_boot = async { t.vm.boot().await };
    let terminate = async {
        // Let QEMU get going, then pull the plug while the start waits for the guest.
        tokio::time::sleep(Duration::from_millis(400)).await;
        controller.terminate_vm().await
    };
    let (booted, terminated) = tokio::join!(vm_boot, terminate);
    terminated.expect("terminate");
    assert!(
        matches!(booted, Err(ControllerError::StartCancelled { .. })),
        "{booted:?}"
    );
    assert_eq!(t.vm.controller.state(), State::Terminated);
    t.finish().await;
}

async fn virtio_drivers_the_controller_relies_on_are_bound(machine: Machine) {
    let t = booted(machine).await;
    // vsock carries the agent's API; the balloon carries update_memory.
    let script = "for d in vmw_vsock_virtio_transport virtio_balloon; do \
                    ls /sys/bus/virtio/drivers/$d | grep -q '^virtio' || echo \"unbound: $d\"; \
                  done";
    let (code, out, err) = exec(&t.vm, &["sh", "-c", script], None).await;
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));
    t.finish().await;
}

/// Under TCG the backend tells our kernel its APIC timer's frequency instead of letting it
/// calibrate (`lapic_timer_khz=`): a wrong value would make every sleep in the guest run fast
/// or slow by the same factor (4× for a 250 MHz vs 1 GHz mistake).
async fn guest_timers_tick_from_the_apic_at_the_right_rate(machine: Machine) {
    let t = booted(machine).await;
    let (code, out, _) = exec(
        &t.vm,
        &[
            "cat",
            "/sys/devices/system/clockevents/clockevent0/current_device",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0);
    assert!(
        out.trim().starts_with("lapic"),
        "clock event device: {out:?}"
    );
    let started = std::time::Instant::now();
    let (code, _, _) = exec(&t.vm, &["sleep", "1"], None).await;
    let took = started.elapsed();
    assert_eq!(code, 0);
    // Not a performance bound: a sleep of 1 s that lasts under 0.9 s or over 3.5 s is a timer
    // running at the wrong rate, however loaded the machine.
    assert!(
        took >= Duration::from_millis(900) && took <= Duration::from_millis(3500),
        "`sleep 1` took {took:?}"
    );
    t.finish().await;
}

async fn files_copy_in_and_out_byte_exact_and_refusals_are_typed(machine: Machine) {
    let t = booted(machine).await;
    let c = &t.vm.controller;
    let (code, _, err) = exec(&t.vm, &["mkdir", "-p", "/var/copy"], None).await;
    assert_eq!(code, 0, "{err}");
    let data: Vec<u8> = (0..10usize << 20)
        .map(|i| (i * 31 + i / 1021) as u8)
        .collect();
    let mut source = &data[..];
    c.copy_in("/var/copy/blob", 0o640, data.len() as u64, &mut source)
        .await
        .expect("copy in");
    let sink = Capture::default();
    let meta = c
        .copy_out("/var/copy/blob", &mut |_| {}, &mut sink.clone())
        .await
        .expect("copy out");
    assert_eq!((meta.mode, meta.size), (0o640, data.len() as u64));
    assert!(sink.bytes() == data, "10 MiB came back byte-exact");
    let (_, out, _) = exec(&t.vm, &["wc", "-c", "/var/copy/blob"], None).await;
    assert!(out.starts_with(&format!("{} ", data.len())), "{out:?}");

    // A path the guest refuses, a missing file, a file beyond the limit.
    let mut one = &b"x"[..];
    let err = c
        .copy_in("/proc/uvm-copy", 0o644, 1, &mut one)
        .await
        .expect_err("the guest refuses /proc");
    assert!(
        matches!(
            &err,
            ControllerError::Guest {
                source: GuestError::Rejected {
                    request: GuestRequest::OpenWrite,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    let err = c
        .copy_out("/var/copy/missing", &mut |_| {}, &mut Capture::default())
        .await
        .expect_err("missing");
    assert!(
        matches!(
            &err,
            ControllerError::Guest {
                source: GuestError::Rejected {
                    kind: Rejection::NotFound,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    c.set_copy_limit(1 << 20);
    let err = c
        .copy_out("/var/copy/blob", &mut |_| {}, &mut Capture::default())
        .await
        .expect_err("beyond the limit");
    assert!(
        matches!(
            &err,
            ControllerError::Guest {
                source: GuestError::Rejected {
                    kind: Rejection::ResourceExhausted,
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    t.finish().await;
}

/// Every case above, once per machine profile.
macro_rules! on_each_machine {
    ($($case:ident),* $(,)?) => {
        mod real_vm_q35 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Machine::Q35).await
                }
            )*
        }
        mod real_vm_microvm {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Machine::Microvm).await
                }
            )*
        }
    };
}

on_each_machine!(
    boots_and_exec_of_uname_prints_linux,
    a_non_zero_exit_code_and_stderr_propagate,
    stdin_round_trips_through_the_guest,
    dump_stacks_and_stats_answer,
    terminate_ends_terminated_with_an_exit_status,
    qemu_killed_from_outside_ends_terminated_and_releases_pending_calls,
    an_agent_that_never_connects_fails_start_at_its_deadline,
    terminate_during_boot_cancels_the_start_and_cleans_up,
    virtio_drivers_the_controller_relies_on_are_bound,
    guest_timers_tick_from_the_apic_at_the_right_rate,
    files_copy_in_and_out_byte_exact_and_refusals_are_typed,
);

/// A controller that is SIGKILLed with its VM booted: the VM's processes die with it (PDEATHSIG), its
/// runtime directory stays, and the next sweep (what every `uvmctl run` and `bench` does first)
/// removes it.
mod real_vm_restart {
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use uvm_host::processes_mentioning;

    fn runtime_dirs(root: &Path) -> Vec<PathBuf> {
        std::fs::read_dir(root)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with("uvm-"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sigkill(pid: u32) -> rustix::io::Result<()> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or(rustix::io::Errno::SRCH)?;
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
    }

    fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(started.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_killed_controller_takes_its_vm_down_and_the_next_sweep_removes_its_directory() {
        super::require_prerequisites();
        // A runtime root of the test's own (short: socket paths), given to uvmctl as TMPDIR.
        let root = tempfile::Builder::new()
            .prefix("sweep-test")
            .tempdir_in("/tmp")
            .expect("runtime root");
        let mut controller = std::process::Command::new(env!("CARGO_BIN_EXE_uvmctl"))
            .args(["run", "--", "sleep", "60"])
            .env("TMPDIR", root.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn uvmctl");
        let pid = controller.id();
        // Guard: whatever happens below, the controller does not outlive the test.
        struct Kill(u32);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = sigkill(self.0);
            }
        }
        let _guard = Kill(pid);

        // Wait until QEMU and vhost-device-vsock run from the VM's directory and the guest has
        // announced itself (the link removes its announce listener once it accepted).
        let dir = wait_for("the VM to boot", Duration::from_secs(60), || {
            runtime_dirs(root.path())
                .into_iter()
                .find(|d| processes_mentioning(d).len() >= 2 && !d.join("vsock.sock_1025").exists())
        });
        assert!(dir.join(uvm_qemu::OWNER_FILE).is_file());

        sigkill(pid).expect("SIGKILL the controller");
        controller.wait().expect("reap the controller");

        wait_for("the VM's processes to die", Duration::from_secs(10), || {
            processes_mentioning(&dir).is_empty().then_some(())
        });
        assert!(dir.is_dir(), "nobody removed the directory yet");

        // The VM's cgroup outlived its controller too (empty: its processes died).
        let name = dir.file_name().expect("name").to_owned();
        let cgroups = || -> Vec<std::path::PathBuf> {
            let base = std::path::Path::new("/sys/fs/cgroup");
            let mut found: Vec<_> = std::fs::read_dir(base)
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .chain([base.to_owned()])
                .map(|h| h.join(uvm_qemu::DEFAULT_CGROUP_PARENT).join(&name))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            found
        };
        assert!(!cgroups().is_empty(), "the VM had no cgroup");
        let removed =
            uvm_qemu::sweep_stale_runtime_dirs(root.path(), Some(uvm_qemu::DEFAULT_CGROUP_PARENT))
                .expect("sweep");
        assert_eq!(removed, std::slice::from_ref(&dir));
        assert!(!dir.exists());
        assert_eq!(
            cgroups(),
            Vec::<std::path::PathBuf>::new(),
            "the sweep left the cgroup"
        );
        assert!(runtime_dirs(root.path()).is_empty());
    }
}

/// The `uvmctl run` command line itself, end to end: what the README tells users to type.
mod real_vm_cli {
    use std::os::fd::OwnedFd;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Output, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rustix::termios;

    use uvm_host::processes_mentioning;

    /// `uvmctl run ARGS` with a runtime root of its own (TMPDIR); asserts nothing of the VM
    /// is left behind, whatever the outcome.
    fn uvmctl_run(args: &[&str]) -> Output {
        super::require_prerequisites();
        let root = tempfile::Builder::new()
            .prefix("cli-test")
            .tempdir_in("/tmp")
            .expect("runtime root");
        let out = Command::new(env!("CARGO_BIN_EXE_uvmctl"))
            .arg("run")
            .args(args)
            .env("TMPDIR", root.path())
            .stdin(Stdio::null())
            .output()
            .expect("run uvmctl");
        assert!(processes_mentioning(root.path()).is_empty());
        let left: Vec<_> = std::fs::read_dir(root.path())
            .expect("read root")
            .map(|e| e.expect("entry").path())
            .collect();
        assert!(left.is_empty(), "runtime files remain: {left:?}");
        out
    }

    #[test]
    fn run_passes_env_and_workdir_and_exits_with_the_commands_code() {
        let out = uvmctl_run(&[
            "-e",
            "FOO=bar",
            "--env",
            "X=a b",
            "-w",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"$FOO|$X|$(pwd)\"; echo oops >&2; exit 3",
        ]);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "bar|a b|/tmp\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    }

    #[test]
    fn run_names_a_missing_workdir_and_fails_without_running_anything() {
        let out = uvmctl_run(&["-w", "/nonexistent", "--", "true"]);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot start \"true\" in \"/nonexistent\""),
            "{stderr}"
        );
        assert!(
            !stderr.contains("guest log"),
            "a refusal is not a failure: {stderr}"
        );
    }

    #[test]
    fn run_exits_127_for_a_missing_program_and_126_for_one_it_cannot_execute() {
        let out = uvmctl_run(&["--", "/nonexistent/program"]);
        assert_eq!(out.status.code(), Some(127), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("/nonexistent/program"), "{stderr}");
        // A directory cannot be executed (EACCES).
        let out = uvmctl_run(&["--", "/dev"]);
        assert_eq!(out.status.code(), Some(126), "{out:?}");
    }

    fn set_size(master: &OwnedFd, rows: u16, cols: u16) {
        let ws = termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        termios::tcsetwinsize(master, ws).expect("set the window size");
    }

    fn canonical(slave: &OwnedFd) -> bool {
        termios::tcgetattr(slave)
            .expect("tcgetattr")
            .local_modes
            .contains(termios::LocalModes::ICANON | termios::LocalModes::ECHO)
    }

    /// `uvmctl run -t` on a terminal of the test's own, as a user at a terminal runs it: the
    /// terminal goes raw for the command, the guest's terminal takes its size and follows a
    /// resize, and the terminal's mode is back when uvmctl exits.
    #[test]
    fn run_with_a_terminal_goes_raw_follows_the_window_size_and_restores_the_terminal() {
        super::require_prerequisites();
        let root = tempfile::Builder::new()
            .prefix("cli-tty")
            .tempdir_in("/tmp")
            .expect("runtime root");
        let (master, slave) = uvmctl::terminal::pty_pair().expect("a pty pair");
        set_size(&master, 30, 100);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_uvmctl"));
        cmd.args([
            "run",
            "-t",
            "--",
            "sh",
            "-c",
            "trap 'stty size; exit 0' WINCH; stty size; while :; do sleep 0.05; done",
        ])
        .env("TMPDIR", root.path())
        .stdin(Stdio::from(slave.try_clone().expect("dup")))
        .stdout(Stdio::from(slave.try_clone().expect("dup")))
        .stderr(Stdio::from(slave.try_clone().expect("dup")));
        // SAFETY: setsid(2) and ioctl(2) only, both async-signal-safe, in the child before exec:
        // uvmctl leads a session whose controlling terminal is the pty, so a resize of the
        // pty sends it SIGWINCH, as a terminal emulator's would.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                Ok(())
            });
        }
        // Killed if the test fails before it exits; std never signals a child it has reaped,
        // so a reused pid is safe.
        struct KillOnDrop(std::process::Child);
        impl Drop for KillOnDrop {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = KillOnDrop(cmd.spawn().expect("spawn uvmctl"));
        let seen = Arc::new(Mutex::new(String::new()));
        let reader = {
            let seen = seen.clone();
            let master = master.try_clone().expect("dup");
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // Ends with EIO once every slave end is closed.
                while let Ok(n @ 1..) = rustix::io::read(&master, &mut buf) {
                    seen.lock()
                        .expect("lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        };
        let wait_for = |child: &mut std::process::Child, what: &str, f: &dyn Fn(&str) -> bool| {
            let started = Instant::now();
            while !f(&seen.lock().expect("lock")) {
                let exited = child.try_wait().expect("try_wait");
                assert!(
                    exited.is_none() && started.elapsed() < Duration::from_secs(60),
                    "no {what} (uvmctl: {exited:?}) in {:?}",
                    seen.lock().expect("lock")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait_for(&mut child.0, "initial size", &|s| s.contains("30 100\r\n"));
        assert!(
            !canonical(&slave),
            "the terminal is raw while the command runs"
        );
        set_size(&master, 40, 120);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.0.try_wait().expect("try_wait") {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "uvmctl did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "{:?}", seen.lock().expect("lock"));
        assert!(canonical(&slave), "the terminal's mode is restored");
        // Nothing of the VM may hold the pty (or the reader below would never see its end).
        assert!(processes_mentioning(root.path()).is_empty());
        assert!(std::fs::read_dir(root.path())
            .expect("root")
            .next()
            .is_none());
        drop(cmd);
        drop(slave);
        reader.join().expect("reader");
        let seen = seen.lock().expect("lock");
        let first = seen.find("30 100\r\n").expect("initial size");
        assert!(seen[first..].contains("40 120\r\n"), "{seen:?}");
    }

    #[test]
    fn run_refuses_a_malformed_env_entry_before_booting() {
        let out = uvmctl_run(&["-e", "NOEQUALS", "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("is not KEY=VALUE"));
    }
}
