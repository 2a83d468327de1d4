//! The security policy on a real VM: `examples/policies/sandbox.rego` given at create, enforced
//! by the guest agent on each request class — allowed and denied — and fragments that add to it
//! at run time. Named `real_vm_*` (nextest's `real-vm` group); needs the default image
//! (`make setup`, `make agent`) and virtiofsd for the share cases. A failing test still cleans
//! up: the QEMU VM kills its processes and removes its runtime directory when dropped.

use std::path::PathBuf;
use std::time::Duration;

use uvm::seams::{
    DiskConfig, DiskMount, ExecRequest, PolicyFragment, SecurityPolicy, ShareConfig, ShareMount,
};
use uvm::testing::Capture;
use uvm::{ControllerError, GuestError, Rejection, State, Timeouts};
use uvm_host::processes_mentioning;
use uvm_util::error_chain;
use uvm_vm::{default_image, Machine, Vm, VmOptions};

const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");
/// Makes sandbox.rego (which takes no fragments) take those under `fragment.`.
const TAKE_FRAGMENTS: &str = "\nload_fragment if startswith(input.package, \"fragment.\")\n";

fn require_prerequisites() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"] {
        assert!(
            uvm_qemu::find_binary(name).is_absolute(),
            "real-VM test prerequisite missing: {name} (`make setup` installs it)"
        );
    }
    if let Err(e) = uvm_image::ImageSpec::from_env() {
        panic!("real-VM test prerequisite missing: {e} (`make agent` builds the agent)");
    }
}

struct TestVm {
    vm: Vm,
    root: tempfile::TempDir,
    /// Host directories to share.
    shares: tempfile::TempDir,
}

/// A runtime root, and the options of a q35 VM under `policy` with its runtime there.
fn options(policy: &str) -> (tempfile::TempDir, VmOptions) {
    require_prerequisites();
    let root = tempfile::Builder::new()
        .prefix("uvmp")
        .tempdir_in("/tmp")
        .expect("runtime root");
    let options = VmOptions {
        machine: Machine::Q35,
        runtime_root: Some(root.path().to_path_buf()),
        timeouts: Timeouts {
            guest_connect: Duration::from_secs(90),
            ..Timeouts::default()
        },
        security_policy: Some(SecurityPolicy(policy.to_owned())),
        // A refused share's port frees only after the guest's 5 s attention-button delay.
        share_hotplug_ports: Some(4),
        ..VmOptions::default()
    };
    (root, options)
}

async fn booted_with_policy(policy: &str) -> TestVm {
    let image = default_image().expect("build the guest image");
    let (root, options) = options(policy);
    let t = TestVm {
        vm: Vm::new(&image, options),
        root,
        shares: tempfile::tempdir().expect("share directories"),
    };
    t.vm.boot().await.expect("boot");
    t
}

impl TestVm {
    async fn exec(&self, args: &[&str]) -> Result<(i32, String), ControllerError> {
        let out = Capture::default();
        let mut req = ExecRequest::new(args.iter().copied());
        req.stdout = Some(Box::new(out.clone()));
        let code = self.vm.controller.exec_into_host(req).await?;
        Ok((code, out.text()))
    }

    async fn copy_in(&self, path: &str) -> Result<(), ControllerError> {
        let data = b"x\n";
        let mut source: &[u8] = data;
        self.vm
            .controller
            .copy_in(path, 0o644, data.len() as u64, &mut source)
            .await
    }

    async fn copy_out(&self, path: &str) -> Result<Vec<u8>, ControllerError> {
        let mut sink = Vec::new();
        self.vm
            .controller
            .copy_out(path, &mut |_| {}, &mut sink)
            .await?;
        Ok(sink)
    }

    /// Shares a new host directory (one per guest path: a directory shares one way only).
    async fn add_share(&self, read_only: bool, guest_path: &str) -> Result<(), ControllerError> {
        let host_path = self.shares.path().join(guest_path.trim_start_matches('/'));
        self.add_share_from(host_path, read_only, guest_path).await
    }

    async fn add_share_from(
        &self,
        host_path: PathBuf,
        read_only: bool,
        guest_path: &str,
    ) -> Result<(), ControllerError> {
        std::fs::create_dir_all(&host_path).expect("host directory");
        let share = ShareConfig {
            host_path,
            read_only,
        };
        let mount = ShareMount {
            guest_path: guest_path.into(),
            read_only,
        };
        self.vm.controller.add_share(share, mount).await.map(drop)
    }

    async fn finish(self) {
        self.vm.controller.terminate_vm().await.expect("terminate");
        let left = processes_mentioning(self.root.path());
        assert!(left.is_empty(), "processes of the VM remain: {left:?}");
        let entries: Vec<PathBuf> = std::fs::read_dir(self.root.path())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "runtime files remain: {entries:?}");
    }
}

/// `result` is the guest's PermissionDenied naming the policy rule; the VM is still Running.
fn assert_denied<T: std::fmt::Debug>(t: &TestVm, result: Result<T, ControllerError>, rule: &str) {
    let err = result.expect_err(rule);
    let chain = error_chain(&err);
    assert!(
        chain.contains(&format!("denied by policy rule uvmctl.policy.{rule}")),
        "{rule}: {chain}"
    );
    assert_eq!(t.vm.controller.state(), State::Running, "{rule}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_sandbox_policy_allows_what_it_names_and_denies_every_other_request_class() {
    let t = booted_with_policy(&format!("{SANDBOX}{TAKE_FRAGMENTS}")).await;
    let guest = t.vm.controller.guest_info().expect("connected");
    assert!(
        guest.capabilities.names.iter().any(|c| c == "policy"),
        "{:?}",
        guest.capabilities
    );

    // exec: echo, cat and true with any arguments; nothing else, sh included.
    assert_eq!(
        t.exec(&["echo", "hello", "sandbox"]).await.expect("echo"),
        (0, "hello sandbox\n".into())
    );
    assert_eq!(t.exec(&["true"]).await.expect("true").0, 0);
    let (code, version) = t.exec(&["cat", "/proc/version"]).await.expect("cat");
    assert_eq!(code, 0);
    assert!(version.starts_with("Linux version"), "{version}");
    let denied = t.exec(&["sh", "-c", "echo escaped"]).await;
    assert!(
        matches!(
            &denied,
            Err(ControllerError::Guest {
                source: GuestError::Rejected {
                    kind: Rejection::PermissionDenied,
                    ..
                },
                ..
            })
        ),
        "{denied:?}"
    );
    assert_denied(&t, denied, "exec");
    assert_denied(&t, t.exec(&["ls", "/"]).await, "exec");

    // Files in and out, stack dumps: refused.
    assert_denied(&t, t.copy_in("/tmp/in.txt").await, "write_file");
    assert_denied(&t, t.copy_out("/proc/version").await, "read_file");
    assert_denied(&t, t.vm.controller.dump_stacks().await, "dump_stacks");

    // Shares: read-only away from the system directories only; a refused one is unwound.
    t.add_share(true, "/mnt/ro").await.expect("read-only share");
    assert_eq!(
        t.exec(&["cat", "/proc/mounts"])
            .await
            .expect("cat")
            .1
            .lines()
            .filter(|l| l.contains(" /mnt/ro "))
            .count(),
        1
    );
    assert_denied(&t, t.add_share(false, "/mnt/rw").await, "mount_share");
    assert_denied(&t, t.add_share(true, "/bin").await, "mount_share");
    // A symlink the host puts on a share cannot carry a mount onto /bin: the policy decides on
    // where the path leads.
    std::os::unix::fs::symlink("/bin", t.shares.path().join("mnt/ro/l")).expect("symlink");
    let over_bin = t
        .add_share_from(t.shares.path().join("other"), true, "/mnt/ro/l")
        .await;
    assert_denied(&t, over_bin, "mount_share");
    assert!(t.exec(&["echo", "still"]).await.is_ok());
    let shares = t.vm.controller.devices().shares;
    assert_eq!(shares.len(), 1, "only the allowed share stays: {shares:?}");

    // Disks: refused, and the attached disk unwound.
    let image = t.shares.path().join("blank.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .expect("blank image");
    let added =
        t.vm.controller
            .add_disk(DiskConfig::raw(&image), DiskMount::at("/mnt/disk"))
            .await;
    assert_denied(&t, added, "mount_disk");
    assert!(t.vm.controller.devices().disks.is_empty());

    // Signals: SIGINT is refused, SIGKILL ends the process (137, not SIGINT's 130).
    let (signals, rx) = tokio::sync::mpsc::channel(4);
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let mut req = ExecRequest::new(["cat"]);
    let (_keep_open, stdin) = tokio::io::duplex(64);
    req.stdin = Some(Box::new(stdin));
    req.signals = Some(rx);
    req.started = Some(started_tx);
    let controller = t.vm.controller.clone();
    let cat = tokio::spawn(async move { controller.exec_into_host(req).await });
    started.await.expect("cat started");
    signals.send(2).await.expect("queue SIGINT");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!cat.is_finished(), "SIGINT was delivered");
    signals.send(9).await.expect("queue SIGKILL");
    let code = tokio::time::timeout(Duration::from_secs(30), cat)
        .await
        .expect("cat ends")
        .expect("join")
        .expect("exec");
    assert_eq!(code, 137);

    // Fragments add: a command, then copying in; one that does not compile or sits outside
    // `fragment.` is refused and changes nothing.
    let fragment = |text: &str| PolicyFragment(text.to_owned());
    t.vm.controller
        .update_policy_fragment(&fragment(
            "package fragment.tools\nexec if {\n input.program == \"ls\"\n input.dir == \"/bin\"\n}",
        ))
        .await
        .expect("fragment");
    assert_eq!(t.exec(&["ls", "/mnt"]).await.expect("ls").1, "ro\n");
    let bad =
        t.vm.controller
            .update_policy_fragment(&fragment("package fragment.bad\nexec if {"))
            .await
            .expect_err("does not compile");
    assert!(error_chain(&bad).contains("does not compile"), "{bad}");
    let outside =
        t.vm.controller
            .update_policy_fragment(&fragment("package other\nexec := true"))
            .await
            .expect_err("refused by load_fragment");
    assert!(error_chain(&outside).contains("load_fragment"), "{outside}");
    assert_denied(&t, t.exec(&["sh", "-c", "true"]).await, "exec");
    t.vm.controller
        .update_policy_fragment(&fragment(
            "package fragment.files\nwrite_file if startswith(input.path, \"/tmp/\")",
        ))
        .await
        .expect("files fragment");
    t.copy_in("/tmp/in.txt").await.expect("copy in allowed now");
    assert_denied(&t, t.copy_in("/root/in.txt").await, "write_file");
    // The classes sandbox.rego refuses outright, allowed by a fragment: each request then gets
    // past the policy (a blank disk is then refused for having no filesystem, not by a rule).
    t.vm.controller
        .update_policy_fragment(&fragment(
            "package fragment.more\nread_file := true\ndump_stacks := true\nmount_disk := true\n",
        ))
        .await
        .expect("more fragment");
    assert_eq!(t.copy_out("/tmp/in.txt").await.expect("copy out"), b"x\n");
    assert!(!t
        .vm
        .controller
        .dump_stacks()
        .await
        .expect("stacks")
        .is_empty());
    let added =
        t.vm.controller
            .add_disk(DiskConfig::raw(&image), DiskMount::at("/mnt/disk"))
            .await
            .expect_err("a blank disk has no filesystem");
    let chain = error_chain(&added);
    assert!(!chain.contains("denied by policy"), "{chain}");
    assert!(chain.contains("no filesystem"), "{chain}");
    assert_eq!(t.vm.controller.policy_fragments().len(), 3);

    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_policy_the_guest_refuses_fails_the_start_and_leaves_nothing() {
    // Compiles nowhere: the host's check is bypassed here (VmOptions takes it as given), so the
    // agent's own refusal is what fails the start.
    let image = default_image().expect("build the guest image");
    let (root, options) = options("package elsewhere\nexec := true");
    let vm = Vm::new(&image, options);
    let err = vm.boot().await.expect_err("the agent refuses the policy");
    assert!(
        error_chain(&err).contains("package uvmctl.policy"),
        "{}",
        error_chain(&err)
    );
    let _ = vm.controller.terminate_vm().await;
    let left = processes_mentioning(root.path());
    assert!(left.is_empty(), "processes of the VM remain: {left:?}");
}
