//! Resource control on real VMs: the VM's cgroup holds all its processes, a CPU limit
//! throttles a busy guest (the cgroup's own counters, no timing), and release kills what is
//! left inside and removes the cgroup. Needs root for the host's cgroups (CI runs as root).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use uvm::seams::{CpuLimits, ExecRequest};
use uvm::{ControllerError, State, Timeouts};
use uvm_vm::{default_image, Machine, Vm, VmOptions};

fn require_prerequisites() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        assert!(
            uvm_qemu::find_binary(name).is_absolute(),
            "real-VM test prerequisite missing: {name} (`make setup` installs it)"
        );
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "real-VM resource tests need root for the host's cgroups (CI runs as root)"
    );
}

/// A booted q35 VM with its own runtime root, `shape` applied to its options.
async fn booted(shape: impl FnOnce(&mut VmOptions)) -> (Vm, tempfile::TempDir) {
    require_prerequisites();
    let image = default_image().expect("build the guest image");
    let root = tempfile::Builder::new()
        .prefix("uvmr")
        .tempdir_in("/tmp")
        .expect("runtime root");
    let mut options = VmOptions {
        machine: Machine::Q35,
        runtime_root: Some(root.path().to_path_buf()),
        timeouts: Timeouts {
            guest_connect: Duration::from_secs(90),
            ..Timeouts::default()
        },
        ..VmOptions::default()
    };
    shape(&mut options);
    let vm = Vm::new(&image, options);
    vm.boot().await.expect("boot");
    assert_eq!(vm.controller.state(), State::Running);
    (vm, root)
}

fn cgroup_paths(vm: &Vm) -> Vec<PathBuf> {
    let host = vm.qemu_vm().expect("created");
    let paths = host.cgroup_paths();
    assert!(
        !paths.is_empty(),
        "the VM has no cgroup: {}",
        host.cgroup_description()
    );
    paths
}

/// The CPU quota of each directory that has one, as v1 (`cpu.cfs_quota_us`) or v2
/// (`cpu.max`) spells it.
fn quotas(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|d| {
            std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
                .or_else(|_| std::fs::read_to_string(d.join("cpu.max")))
                .ok()
        })
        .map(|s| s.trim().to_owned())
        .collect()
}

fn members(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .expect("cgroup.procs")
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_every_process_of_the_vm_is_in_its_cgroup_and_release_kills_a_stray_one() {
    let (vm, _root) = booted(|_| {}).await;
    let host = vm.qemu_vm().expect("created");
    let paths = cgroup_paths(&vm);
    for dir in &paths {
        let inside = members(dir);
        for pid in [host.qemu_pid(), host.vsock_pid()].into_iter().flatten() {
            assert!(
                inside.contains(&pid),
                "{pid} not in {}: {inside:?}",
                dir.display()
            );
        }
    }
    // Something else got into the VM's cgroup: the release must not leave it running.
    let mut stray = std::process::Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("spawn a stray process");
    for dir in &paths {
        std::fs::write(dir.join("cgroup.procs"), stray.id().to_string()).expect("move it in");
    }
    // Host stats come from the cgroup.
    let stats = vm.controller.stats().await.expect("stats");
    assert!(
        stats.memory_current_bytes.is_some_and(|b| b > 1 << 20),
        "{stats:?}"
    );
    assert!(stats.cpu_throttling.is_some(), "{stats:?}");
    assert!(stats.cpu_time > Duration::ZERO, "{stats:?}");

    vm.controller.terminate_vm().await.expect("terminate");
    let status = stray.wait().expect("reap the stray");
    assert_eq!(status.signal(), Some(9), "{status:?}");
    for dir in &paths {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_cpu_limit_throttles_a_busy_guest_and_bad_limits_change_nothing() {
    let (vm, _root) = booted(|_| {}).await;
    let paths = cgroup_paths(&vm);
    let c = &vm.controller;
    let throttled = || async {
        c.stats()
            .await
            .expect("stats")
            .cpu_throttling
            .expect("throttling counters")
            .throttled_periods
    };
    c.update_cpu_limits(CpuLimits {
        limit: Some(2_000),
        weight: Some(50),
    })
    .await
    .expect("limit to 20 %");
    // The quota as the host's cgroup version spells it.
    let written = quotas(&paths);
    assert!(
        written.iter().any(|q| q == "20000" || q == "20000 100000"),
        "{written:?}"
    );
    for bad in [Some(0), Some(10_001)] {
        let e = c
            .update_cpu_limits(CpuLimits {
                limit: bad,
                weight: None,
            })
            .await
            .expect_err("refused");
        assert!(
            matches!(e, ControllerError::InvalidArgument { .. }),
            "{e:?}"
        );
    }
    assert_eq!(c.state(), State::Running);

    let before = throttled().await;
    // Two seconds of a spinning shell: at 20 % of one CPU it waits in most periods.
    let spin = ExecRequest::new([
        "timeout",
        "-s",
        "KILL",
        "2",
        "sh",
        "-c",
        "while :; do :; done",
    ]);
    c.exec_into_host(spin).await.expect("spin");
    let after = throttled().await;
    assert!(
        after > before,
        "no period was throttled: {before} → {after}"
    );

    // No cap again: the quota is lifted.
    c.update_cpu_limits(CpuLimits {
        limit: Some(10_000),
        weight: None,
    })
    .await
    .expect("lift the cap");
    let lifted = quotas(&paths);
    assert!(
        lifted.iter().any(|q| q == "-1" || q == "max 100000"),
        "{lifted:?}"
    );
    c.terminate_vm().await.expect("terminate");
    assert!(paths.iter().all(|d| !d.exists()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_memory_grows_with_virtio_mem_shrinks_back_and_mem_total_follows() {
    let (vm, _root) = booted(|o| {
        o.memory_mib = 256;
        o.max_memory_mib = Some(768);
    })
    .await;
    let c = &vm.controller;
    let mem_total = || async { c.guest_stats().await.expect("guest stats").mem_total_bytes };
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let before = mem_total().await;

    assert_eq!(c.update_memory(512 << 20).await.expect("grow"), 512 << 20);
    let grown = mem_total().await;
    let added = mib(grown.saturating_sub(before));
    assert!(
        (255.0..=257.0).contains(&added),
        "MemTotal {:.1} → {:.1} MiB",
        mib(before),
        mib(grown)
    );

    assert_eq!(c.update_memory(256 << 20).await.expect("shrink"), 256 << 20);
    let shrunk = mem_total().await;
    assert!(
        mib(shrunk) <= mib(before) + 1.0,
        "MemTotal {:.1} → {:.1} → {:.1} MiB",
        mib(before),
        mib(grown),
        mib(shrunk)
    );

    // Above the maximum: refused, nothing changed.
    let e = c
        .update_memory(1 << 30)
        .await
        .expect_err("above the maximum");
    assert!(format!("{e:?}").contains("InvalidInput"), "{e:?}");
    assert_eq!(c.state(), State::Running);
    assert!(mib(mem_total().await) <= mib(before) + 1.0);
    c.terminate_vm().await.expect("terminate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_vcpus_are_hot_added_and_removed_and_nproc_follows() {
    let (vm, _root) = booted(|o| {
        o.cpus = 1;
        o.max_cpus = Some(3);
    })
    .await;
    let c = &vm.controller;
    // The guest's count, once it settles on `n` (the agent onlines added vCPUs on its own).
    let nproc_becomes = |n: u32| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = uvm::testing::Capture::default();
            let mut req = ExecRequest::new(["nproc"]);
            req.stdout = Some(Box::new(out.clone()));
            c.exec_into_host(req).await.expect("nproc");
            let seen: u32 = out.text().trim().parse().expect("a number");
            if seen == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "nproc is {seen}, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    nproc_becomes(1).await;
    c.update_cpus(3).await.expect("hot-add two");
    nproc_becomes(3).await;
    c.update_cpus(2).await.expect("hot-remove one");
    nproc_becomes(2).await;
    // Above the maximum, or below the boot vCPUs: refused, nothing changed.
    for bad in [4, 0] {
        c.update_cpus(bad).await.expect_err("refused");
    }
    assert_eq!(c.state(), State::Running);
    nproc_becomes(2).await;
    c.terminate_vm().await.expect("terminate");
}

/// Removes a CPU group however the test ends (once its VMs are gone).
struct GroupGuard(uvm_cgroup::CpuGroup);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_cpu_group_shared_by_two_vms_caps_their_sum_and_is_kept_while_in_use() {
    require_prerequisites();
    let layout = uvm_cgroup::Layout::detect().expect("cgroups");
    let name = format!("test-{}", std::process::id());
    let group = uvm_cgroup::CpuGroup::create(
        &layout,
        &name,
        &uvm_cgroup::GroupSettings {
            cap_percent: Some(50),
            cpus: None,
        },
    )
    .expect("make the group");
    let guard = GroupGuard(group.clone());
    let (a, _ra) = booted(|_| {}).await;
    let (b, _rb) = booted(|_| {}).await;
    // An unknown group is a typed NotFound, and changes nothing.
    let e = a
        .controller
        .update_cpu_group("no-such-group")
        .await
        .expect_err("unknown group");
    assert!(
        matches!(
            &e,
            uvm::ControllerError::Host {
                source: uvm::HostError::NotFound {
                    what: "cpu group",
                    ..
                },
                ..
            }
        ),
        "{e:?}"
    );
    for vm in [&a, &b] {
        vm.controller
            .update_cpu_group(&name)
            .await
            .expect("join the group");
    }
    assert_eq!(group.members().len(), 2, "{:?}", group.members());
    // Each VM's processes are under the group now.
    for vm in [&a, &b] {
        let host = vm.qemu_vm().expect("created");
        let under: Vec<PathBuf> = host
            .cgroup_paths()
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(&name))
            .collect();
        assert!(!under.is_empty(), "{:?}", host.cgroup_paths());
        let qemu = host.qemu_pid().expect("qemu");
        assert!(
            under.iter().all(|d| members(d).contains(&qemu)),
            "{under:?}"
        );
    }
    assert!(matches!(
        group.remove(),
        Err(uvm_cgroup::CgroupError::InUse { .. })
    ));
    let before = group.throttling().expect("counters").throttled;
    let spin = || {
        ExecRequest::new([
            "timeout",
            "-s",
            "KILL",
            "2",
            "sh",
            "-c",
            "while :; do :; done",
        ])
    };
    let (x, y) = tokio::join!(
        a.controller.exec_into_host(spin()),
        b.controller.exec_into_host(spin())
    );
    x.expect("spin a");
    y.expect("spin b");
    let after = group.throttling().expect("counters").throttled;
    assert!(
        after > before,
        "the group was never throttled: {before} → {after}"
    );
    a.controller.terminate_vm().await.expect("terminate a");
    b.controller.terminate_vm().await.expect("terminate b");
    assert!(group.members().is_empty(), "{:?}", group.members());
    group.remove().expect("an empty group goes");
    drop(guard);
}
