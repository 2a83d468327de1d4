//! Shared directories on real VMs, at the backend + guest link level: the host half through
//! the QEMU VM under the controller ([`Vm::qemu_vm`], `HostDevices`), the guest half through
//! the guest link ([`Vm::guest`], `GuestMounts`), and what the guest sees through exec.
//!
//! Every test is named `real_vm_*` (nextest's `real-vm` group) and boots one VM at a time with
//! the default image (`make setup`, `make agent`); a missing prerequisite fails it, naming the
//! command that provides it. A test that fails still cleans up: the QEMU VM kills its processes
//! (virtiofsd included) and removes its runtime directory when dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use uvm::seams::{
    cold_share_tag, ExecRequest, GuestMounts, HostDevices, ShareConfig, ShareMount, ShareSpec,
    ShareTransport,
};
use uvm::testing::Capture;
use uvm::{GuestError, GuestRequest, HostError, Rejection, State, Timeouts};
use uvm_host::processes_mentioning;
use uvm_qemu::QemuVm;
use uvm_vm::{default_image, Machine, Vm, VmOptions};

fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` and `make agent` first)"
    )
}

fn require_prerequisites(virtiofs: bool) {
    let mut names = vec!["qemu-system-x86_64", "vhost-device-vsock"];
    if virtiofs {
        names.push("virtiofsd");
    }
    for name in names {
        if !uvm_qemu::find_binary(name).is_absolute() {
            missing(format_args!(
                "{name} is not installed; `make setup` installs it"
            ));
        }
    }
    uvm_image::ImageSpec::from_env().unwrap_or_else(|e| missing(e));
}

/// A VM under test with its own runtime root (so leaks are found by path) and host directories.
struct TestVm {
    vm: Vm,
    root: tempfile::TempDir,
}

/// A host directory to share, holding `hello.txt`.
fn host_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("uvm-share-{name}-"))
        .tempdir()
        .expect("host dir");
    std::fs::write(dir.path().join("hello.txt"), format!("hello from {name}\n")).expect("write");
    let path = dir.path().to_path_buf();
    (dir, path)
}

fn spec(path: &Path, read_only: bool, guest_path: &str) -> ShareSpec {
    ShareSpec {
        share: ShareConfig {
            host_path: path.to_path_buf(),
            read_only,
        },
        mount: ShareMount {
            guest_path: guest_path.to_owned(),
            read_only,
        },
    }
}

async fn booted(machine: Machine, f: impl FnOnce(&mut VmOptions)) -> TestVm {
    let image = default_image().expect("build the guest image");
    let root = tempfile::Builder::new()
        .prefix("uvms")
        .tempdir_in("/tmp")
        .expect("runtime root");
    let mut options = VmOptions {
        machine,
        runtime_root: Some(root.path().to_path_buf()),
        timeouts: Timeouts {
            guest_connect: Duration::from_secs(90),
            ..Timeouts::default()
        },
        ..VmOptions::default()
    };
    f(&mut options);
    require_prerequisites(!options.nine_p_shares);
    let t = TestVm {
        vm: Vm::new(&image, options),
        root,
    };
    t.vm.boot().await.expect("boot");
    assert_eq!(t.vm.controller.state(), State::Running);
    t
}

impl TestVm {
    fn host(&self) -> Arc<QemuVm> {
        self.vm.qemu_vm().expect("created")
    }

    async fn sh(&self, script: &str) -> (i32, String, String) {
        let (out, err) = (Capture::default(), Capture::default());
        let mut req = ExecRequest::new(["sh", "-c", script]);
        req.stdout = Some(Box::new(out.clone()));
        req.stderr = Some(Box::new(err.clone()));
        let code = self.vm.controller.exec_into_host(req).await.expect("exec");
        (code, out.text(), err.text())
    }

    /// `script` succeeds in the guest; its stdout.
    async fn ok(&self, script: &str) -> String {
        let (code, out, err) = self.sh(script).await;
        assert_eq!(code, 0, "{script}: {err}");
        out
    }

    async fn mount(&self, tag: &str, guest_path: &str, read_only: bool) {
        let transport = self.host().share_transport(tag);
        let at = ShareMount {
            guest_path: guest_path.to_owned(),
            read_only,
        };
        self.vm
            .guest
            .mount_share(tag, transport, &at)
            .await
            .unwrap_or_else(|e| panic!("mount {tag} at {guest_path}: {e:?}"));
    }

    /// No virtiofsd left, nor any of its files in the runtime directory.
    fn assert_no_share_helpers(&self) {
        let host = self.host();
        assert!(host.helper_pids().is_empty(), "{:?}", host.helper_pids());
        let left: Vec<String> = std::fs::read_dir(host.runtime_dir())
            .expect("runtime dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("share-") || n.starts_with("virtiofsd-"))
            .collect();
        assert!(left.is_empty(), "share files remain: {left:?}");
    }

    /// Terminate, and check nothing of the VM is left: no process (QEMU, vhost-device-vsock,
    /// virtiofsd all name the runtime root), no socket or file under the root.
    async fn finish(self) {
        self.vm.controller.terminate_vm().await.expect("terminate");
        assert_eq!(self.vm.controller.state(), State::Terminated);
        let root = self.root.path();
        let left = processes_mentioning(root);
        assert!(left.is_empty(), "processes of the VM remain: {left:?}");
        let entries: Vec<PathBuf> = std::fs::read_dir(root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "runtime files remain: {entries:?}");
    }
}

/// Host → guest and guest → host through the share mounted at `guest_path`.
async fn both_ways(t: &TestVm, host_path: &Path, guest_path: &str, name: &str) {
    let seen = t.ok(&format!("cat {guest_path}/hello.txt")).await;
    assert_eq!(seen, format!("hello from {name}\n"));
    t.ok(&format!(
        "echo written by the guest > {guest_path}/from-guest.txt"
    ))
    .await;
    let on_host = std::fs::read_to_string(host_path.join("from-guest.txt")).expect("on the host");
    assert_eq!(on_host, "written by the guest\n");
    // What the host writes after the mount shows up too.
    std::fs::write(host_path.join("later.txt"), "written later by the host\n").expect("write");
    let later = t.ok(&format!("cat {guest_path}/later.txt")).await;
    assert_eq!(later, "written later by the host\n");
}

/// The guest cannot write into a read-only share, and nothing reaches the host.
async fn refuses_writes(t: &TestVm, host_path: &Path, guest_path: &str) {
    let (code, _, err) = t.sh(&format!("echo no > {guest_path}/refused.txt")).await;
    assert_ne!(code, 0, "a write into a read-only share succeeded");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(!host_path.join("refused.txt").exists());
    assert!(t
        .ok(&format!("cat {guest_path}/hello.txt"))
        .await
        .starts_with("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_virtio_fs_share_hot_added_on_q35_is_read_and_written_both_ways() {
    let (_keep, dir) = host_dir("hot");
    let t = booted(Machine::Q35, |_| {}).await;
    let host = t.host();
    let share = ShareConfig {
        host_path: dir.clone(),
        read_only: false,
    };
    host.add_share("hot-a", &share).await.expect("add share");
    assert_eq!(host.share_transport("hot-a"), ShareTransport::VirtioFs);
    assert_eq!(host.helper_pids().len(), 1, "one virtiofsd per share");
    // Adding the same share again is a no-op; the same tag for another directory is refused.
    host.add_share("hot-a", &share)
        .await
        .expect("the same add again");
    let other = ShareConfig {
        host_path: std::env::temp_dir(),
        read_only: false,
    };
    assert!(matches!(
        host.add_share("hot-a", &other).await,
        Err(HostError::InvalidInput {
            what: "share tag",
            ..
        })
    ));
    t.mount("hot-a", "/mnt/hot", false).await;
    // Mounting it there again is a no-op (a retried request).
    t.mount("hot-a", "/mnt/hot", false).await;
    both_ways(&t, &dir, "/mnt/hot", "hot").await;

    // Busy while a process sits in it: typed, retryable, never lazy.
    t.ok("cd /mnt/hot && sleep 1000 </dev/null >/dev/null 2>&1 &")
        .await;
    let busy =
        t.vm.guest
            .unmount_share("/mnt/hot")
            .await
            .expect_err("busy");
    assert!(
        matches!(
            busy,
            GuestError::Rejected {
                request: GuestRequest::UnmountShare,
                kind: Rejection::Busy,
                ..
            }
        ),
        "{busy:?}"
    );
    // Once it is gone (reaped by the agent), the unmount goes through.
    t.ok("p=$(pidof sleep); kill $p; while [ -e /proc/$p ]; do :; done")
        .await;
    t.vm.guest.unmount_share("/mnt/hot").await.expect("unmount");
    let gone =
        t.vm.guest
            .unmount_share("/mnt/hot")
            .await
            .expect_err("not mounted");
    assert!(
        matches!(
            gone,
            GuestError::Rejected {
                kind: Rejection::NotFound,
                ..
            }
        ),
        "{gone:?}"
    );

    host.remove_share("hot-a").await.expect("remove share");
    t.assert_no_share_helpers();
    host.remove_share("hot-a")
        .await
        .expect("removing it again is harmless");
    // The freed port takes the next share.
    host.add_share("hot-b", &share).await.expect("add again");
    t.mount("hot-b", "/mnt/again", false).await;
    assert!(t
        .ok("cat /mnt/again/later.txt")
        .await
        .starts_with("written later"));
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_read_only_share_refuses_guest_writes_on_host_and_guest() {
    let (_keep, dir) = host_dir("ro");
    let t = booted(Machine::Q35, |_| {}).await;
    let host = t.host();
    let share = ShareConfig {
        host_path: dir.clone(),
        read_only: true,
    };
    host.add_share("ro", &share).await.expect("add share");
    // Mounted `ro` in the guest…
    t.mount("ro", "/mnt/ro", true).await;
    refuses_writes(&t, &dir, "/mnt/ro").await;
    // …and refused by virtiofsd even where the guest mounts it writable.
    t.mount("ro", "/mnt/rw-attempt", false).await;
    refuses_writes(&t, &dir, "/mnt/rw-attempt").await;
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_bad_shares_are_refused_typed_and_leave_nothing() {
    let (_keep, dir) = host_dir("bad");
    let t = booted(Machine::Q35, |_| {}).await;
    let host = t.host();
    let file = dir.join("hello.txt");
    for (path, message) in [
        (dir.join("missing"), "does not exist"),
        (file, "is not a directory"),
    ] {
        let share = ShareConfig {
            host_path: path.clone(),
            read_only: false,
        };
        match host.add_share("bad", &share).await {
            Err(HostError::InvalidInput {
                what: "share host path",
                message: m,
            }) => assert!(m.ends_with(message), "{m}"),
            other => panic!("{} was not refused: {other:?}", path.display()),
        }
    }
    t.assert_no_share_helpers();
    // A tag no device carries: the guest waits for it, then says so.
    let at = ShareMount {
        guest_path: "/mnt/none".to_owned(),
        read_only: false,
    };
    let err =
        t.vm.guest
            .mount_share("no-such-tag", ShareTransport::VirtioFs, &at)
            .await
            .expect_err("unknown tag");
    assert!(
        matches!(
            err,
            GuestError::Rejected {
                kind: Rejection::NotFound,
                ..
            }
        ),
        "{err:?}"
    );
    let err =
        t.vm.guest
            .mount_share(
                "no-such-tag",
                ShareTransport::VirtioFs,
                &ShareMount {
                    guest_path: "/proc/x".to_owned(),
                    read_only: false,
                },
            )
            .await
            .expect_err("a refused guest path");
    assert!(
        matches!(
            err,
            GuestError::Rejected {
                kind: Rejection::InvalidArgument,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(t.ok("echo still running").await, "still running\n");
    t.finish().await;
}

/// Cold shares at create on `machine`: a writable and a read-only one, mounted once the guest is
/// up; terminating with them mounted leaves nothing.
async fn cold_shares_at_create(machine: Machine) {
    let (_keep_rw, rw) = host_dir("cold-rw");
    let (_keep_ro, ro) = host_dir("cold-ro");
    let t = booted(machine, |o| {
        o.shares = vec![spec(&rw, false, "/mnt/rw"), spec(&ro, true, "/mnt/ro")];
    })
    .await;
    let host = t.host();
    assert_eq!(host.helper_pids().len(), 2, "one virtiofsd per share");
    let (rw_tag, ro_tag) = (cold_share_tag(0), cold_share_tag(1));
    assert_eq!(host.share_transport(&rw_tag), ShareTransport::VirtioFs);
    t.mount(&rw_tag, "/mnt/rw", false).await;
    t.mount(&ro_tag, "/mnt/ro", true).await;
    both_ways(&t, &rw, "/mnt/rw", "cold-rw").await;
    refuses_writes(&t, &ro, "/mnt/ro").await;
    if machine == Machine::Microvm {
        let hot = ShareConfig {
            host_path: rw.clone(),
            read_only: false,
        };
        assert!(matches!(
            host.add_share("hot", &hot).await,
            Err(HostError::Unsupported { .. })
        ));
    }
    // A cold share can be removed too (on microvm its virtiofsd ends; the device stays empty).
    t.vm.guest.unmount_share("/mnt/ro").await.expect("unmount");
    host.remove_share(&ro_tag)
        .await
        .expect("remove a cold share");
    assert_eq!(host.helper_pids().len(), 1);
    assert_eq!(t.ok("echo still running").await, "still running\n");
    // Terminated with the writable one still mounted.
    t.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_cold_virtio_fs_shares_at_create_on_q35() {
    cold_shares_at_create(Machine::Q35).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_cold_virtio_fs_shares_at_create_on_microvm() {
    cold_shares_at_create(Machine::Microvm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_nine_p_serves_cold_shares_where_virtio_fs_is_not_used_on_q35() {
    nine_p_cold_shares(Machine::Q35).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_nine_p_serves_cold_shares_where_virtio_fs_is_not_used_on_microvm() {
    nine_p_cold_shares(Machine::Microvm).await;
}

async fn nine_p_cold_shares(machine: Machine) {
    let (_keep_rw, rw) = host_dir("9p-rw");
    let (_keep_ro, ro) = host_dir("9p-ro");
    let t = booted(machine, |o| {
        o.nine_p_shares = true;
        o.shares = vec![spec(&rw, false, "/mnt/rw"), spec(&ro, true, "/mnt/ro")];
    })
    .await;
    let host = t.host();
    let (rw_tag, ro_tag) = (cold_share_tag(0), cold_share_tag(1));
    assert_eq!(host.share_transport(&rw_tag), ShareTransport::NineP);
    assert!(host.helper_pids().is_empty(), "QEMU serves 9p itself");
    t.mount(&rw_tag, "/mnt/rw", false).await;
    t.mount(&ro_tag, "/mnt/ro", true).await;
    both_ways(&t, &rw, "/mnt/rw", "9p-rw").await;
    refuses_writes(&t, &ro, "/mnt/ro").await;
    // One 9p channel serves one mount: a second guest path binds the first.
    t.mount(&rw_tag, "/mnt/rw-too", false).await;
    assert!(t
        .ok("cat /mnt/rw-too/from-guest.txt")
        .await
        .starts_with("written"));
    // QEMU cannot hot-add an fsdev.
    let hot = ShareConfig {
        host_path: rw.clone(),
        read_only: false,
    };
    assert!(matches!(
        host.add_share("hot-9p", &hot).await,
        Err(HostError::Unsupported { .. })
    ));
    t.vm.guest
        .unmount_share("/mnt/rw-too")
        .await
        .expect("unmount the bind");
    t.vm.guest.unmount_share("/mnt/ro").await.expect("unmount");
    match machine {
        Machine::Q35 => host
            .remove_share(&ro_tag)
            .await
            .expect("remove a cold 9p share"),
        // QEMU serves it, and microvm cannot unplug.
        Machine::Microvm => assert!(matches!(
            host.remove_share(&ro_tag).await,
            Err(HostError::Unsupported { .. })
        )),
    }
    t.finish().await;
}
