//! Disks on real VMs, at the backend and link level: the QEMU backend attaches (`HostDevices`),
//! the vsock link mounts (`GuestMounts`), with no controller between them — so each step's
//! own errors are what the tests see. Every test is named `real_vm_*` (nextest's `real-vm`
//! group), boots at most two VMs at once, makes its ext4 images with `mkfs.ext4 -d`, checks
//! guest writes with `debugfs` on the host, and ends by asserting that nothing of its VMs is
//! left: no process, no runtime directory, no open image. A machine without what they need
//! (`make setup`, `make agent`, e2fsprogs) fails them, naming what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use uvm::seams::{
    cold_disk_slot, DiskConfig, DiskMount, DiskSpec, ExecRequest, GuestConnection, GuestExec,
    GuestMounts, HostDevices, ScsiSlot, VmConfig, VmLifetime,
};
use uvm::testing::Capture;
use uvm::{GuestError, GuestRequest, HostError, Rejection};
use uvm_guest::{GuestLinkConfig, VsockGuest};
use uvm_host::processes_mentioning;
use uvm_qemu::{QemuBackend, QemuVm};
use uvm_vm::{default_image, Machine, VmOptions};

/// Fails the test: a real-VM test whose prerequisites are missing says which, and how to get it.
fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` and `make agent` first)"
    )
}

fn require_prerequisites() {
    for name in ["qemu-system-x86_64", "vhost-device-vsock"] {
        if !uvm_qemu::find_binary(name).is_absolute() {
            missing(format_args!(
                "{name} is not installed; `make setup` installs it"
            ));
        }
    }
    for tool in ["mkfs.ext4", "debugfs"] {
        let found = Command::new(tool).arg("-V").output().is_ok();
        if !found {
            missing(format_args!("{tool} is not installed (package e2fsprogs)"));
        }
    }
    uvm_image::ImageSpec::from_env().unwrap_or_else(|e| missing(e));
}

/// Where a test's images and VM runtime directories go (short: socket paths).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("uvmd")
        .tempdir_in("/tmp")
        .expect("scratch directory")
}

/// An ext4 image of 16 MiB at `dir/name` holding `files` (name, content) at its root.
fn ext4_image(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).expect("image content dir");
    for (file, text) in files {
        std::fs::write(content.join(file), text).expect("image content");
    }
    let image = dir.join(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("image file");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&content)
        .arg(&image)
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

/// `/name` inside an ext4 image, read on the host.
fn debugfs_cat(image: &Path, name: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(image)
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Processes holding `path` open.
fn holders_of(path: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == path))
            })
        })
        .collect()
}

/// One booted VM: the QEMU backend's VM and the guest link to its agent.
struct Booted {
    vm: Arc<QemuVm>,
    guest: VsockGuest,
    root: PathBuf,
}

async fn boot(machine: Machine, root: &Path, config: VmConfig) -> Booted {
    try_boot(machine, root, config).await.expect("boot")
}

async fn try_boot(machine: Machine, root: &Path, config: VmConfig) -> Result<Booted, HostError> {
    require_prerequisites();
    let image = default_image().expect("build the guest image");
    let root = root.join(format!("vm-{}", uvm_vm::new_vm_id()));
    std::fs::create_dir(&root).expect("runtime root");
    let options = VmOptions {
        machine,
        runtime_root: Some(root.clone()),
        ..VmOptions::default()
    };
    let backend = QemuBackend::new(uvm_vm::qemu_config(&image, &options));
    let id = uvm_vm::new_vm_id();
    let vm = Arc::new(backend.create_vm(&id, &config)?);
    let mut link = GuestLinkConfig::new(id);
    // A disk that never appears is awaited for ¾ of this.
    link.call_timeout = Duration::from_secs(8);
    let guest = VsockGuest::new(link);
    guest
        .prepare_connection(&vm.guest_endpoint())
        .await
        .expect("prepare the guest link");
    if let Err(e) = vm.start().await {
        let _ = vm.release().await;
        return Err(e);
    }
    tokio::time::timeout(Duration::from_secs(90), guest.connect())
        .await
        .expect("the guest connects within 90 s")
        .expect("connect to the agent");
    assert!(
        guest.capabilities().names.iter().any(|c| c == "disks"),
        "the agent does not advertise disks: {:?}",
        guest.capabilities().names
    );
    Ok(Booted { vm, guest, root })
}

impl Booted {
    /// Runs `args` in the guest: (exit code, stdout, stderr).
    async fn exec(&self, args: &[&str]) -> (i32, String, String) {
        let (out, err) = (Capture::default(), Capture::default());
        let mut req = ExecRequest::new(args.iter().copied());
        req.stdout = Some(out.writer());
        req.stderr = Some(err.writer());
        let code = self.guest.exec(req).await.expect("exec").code;
        (code, out.text(), err.text())
    }

    /// Terminates and releases the VM and asserts nothing of it is left: no process, no runtime
    /// files, and none of `images` held open.
    async fn finish(self, images: &[&Path]) {
        let _ = self.guest.close_connection().await;
        self.vm.terminate().await.expect("terminate");
        self.vm.release().await.expect("release");
        let left = processes_mentioning(&self.root);
        assert!(left.is_empty(), "processes of the VM remain: {left:?}");
        let entries: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(entries.is_empty(), "runtime files remain: {entries:?}");
        for image in images {
            let holders = holders_of(image);
            assert!(
                holders.is_empty(),
                "{} is still open in {holders:?}",
                image.display()
            );
        }
    }
}

fn slot(controller: u8, lun: u8) -> ScsiSlot {
    ScsiSlot { controller, lun }
}

fn rejected(e: &GuestError) -> Option<(GuestRequest, Rejection)> {
    match e {
        GuestError::Rejected { request, kind, .. } => Some((*request, *kind)),
        _ => None,
    }
}

/// Unmount, eject and detach the disk at `slot` mounted at `path`, each step as the controller
/// orders them.
async fn remove(t: &Booted, slot: ScsiSlot, path: &str) {
    t.guest.unmount_disk(path).await.expect("unmount");
    let location = t.vm.disk_location(slot);
    t.guest.eject_disk(&location).await.expect("eject");
    t.vm.detach_disk(slot).await.expect("detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_bad_disks_are_refused_and_leave_the_vm_as_it_was() {
    let dir = scratch();
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let invalid =
        |r: Result<(), HostError>| matches!(r, Err(HostError::InvalidInput { what: "disk", .. }));
    // Host side: a missing path, a directory, a slot beyond the controllers.
    let nope = dir.path().join("nope.img");
    assert!(invalid(
        t.vm.attach_disk(slot(0, 0), &DiskConfig::raw(&nope)).await
    ));
    assert!(invalid(
        t.vm.attach_disk(slot(0, 0), &DiskConfig::raw(dir.path()))
            .await
    ));
    let good = ext4_image(dir.path(), "good.img", &[("f", "x")]);
    assert!(matches!(
        t.vm.attach_disk(slot(1, 0), &DiskConfig::raw(&good)).await,
        Err(HostError::InvalidInput {
            what: "SCSI slot",
            ..
        })
    ));
    // Guest side: a blank image is no filesystem; bad guest paths and types are refused.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank)
        .and_then(|f| f.set_len(4 << 20))
        .expect("blank image");
    t.vm.attach_disk(slot(0, 1), &DiskConfig::raw(&blank))
        .await
        .expect("attach the blank image");
    let at = t.vm.disk_location(slot(0, 1));
    let e = t
        .guest
        .mount_disk(&at, &DiskMount::at("/mnt/blank"))
        .await
        .expect_err("no filesystem");
    assert_eq!(
        rejected(&e),
        Some((GuestRequest::MountDisk, Rejection::NotFound)),
        "{e:?}"
    );
    for bad in ["/proc/x", "relative", "/mnt/../dev", "/init"] {
        let e = t
            .guest
            .mount_disk(&at, &DiskMount::at(bad))
            .await
            .expect_err(bad);
        assert_eq!(
            rejected(&e),
            Some((GuestRequest::MountDisk, Rejection::InvalidArgument)),
            "{bad}: {e:?}"
        );
    }
    let mut ntfs = DiskMount::at("/mnt/blank");
    ntfs.fs_type = Some("ntfs".into());
    let e = t.guest.mount_disk(&at, &ntfs).await.expect_err("ntfs");
    assert_eq!(rejected(&e).map(|r| r.1), Some(Rejection::InvalidArgument));
    // A disk that was never attached does not appear.
    let e = t
        .guest
        .mount_disk(&t.vm.disk_location(slot(0, 9)), &DiskMount::at("/mnt/none"))
        .await
        .expect_err("nothing at LUN 9");
    assert_eq!(
        rejected(&e).map(|r| r.1),
        Some(Rejection::NotFound),
        "{e:?}"
    );
    // Unmounting what is not mounted is not found; detaching an empty slot is fine.
    let e = t
        .guest
        .unmount_disk("/mnt/blank")
        .await
        .expect_err("not mounted");
    assert_eq!(
        rejected(&e).map(|r| r.1),
        Some(Rejection::NotFound),
        "{e:?}"
    );
    t.vm.detach_disk(slot(0, 9)).await.expect("an empty slot");
    // The VM still works: the blank disk goes away cleanly.
    t.guest.eject_disk(&at).await.expect("eject");
    t.vm.detach_disk(slot(0, 1)).await.expect("detach");
    let (code, out, _) = t.exec(&["echo", "alive"]).await;
    assert_eq!((code, out.as_str()), (0, "alive\n"));
    t.finish(&[&blank]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_hot_added_disk_is_read_written_and_its_write_reaches_the_image() {
    let dir = scratch();
    let image = ext4_image(
        dir.path(),
        "data.img",
        &[("hello.txt", "hello from the host\n")],
    );
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let s = slot(0, 0);
    let t0 = Instant::now();
    t.vm.attach_disk(s, &DiskConfig::raw(&image))
        .await
        .expect("attach");
    let attached = t0.elapsed();
    // Attaching the same disk again at its slot is a no-op.
    t.vm.attach_disk(s, &DiskConfig::raw(&image))
        .await
        .expect("attach again");
    t.guest
        .mount_disk(&t.vm.disk_location(s), &DiskMount::at("/mnt/data"))
        .await
        .expect("mount");
    let mounted = t0.elapsed();
    eprintln!(
        "hot-add: QMP attach {:.1} ms, attach → mounted {:.1} ms",
        attached.as_secs_f64() * 1e3,
        mounted.as_secs_f64() * 1e3
    );
    // A retried mount of the same disk at the same place succeeds.
    t.guest
        .mount_disk(&t.vm.disk_location(s), &DiskMount::at("/mnt/data"))
        .await
        .expect("mount again");
    let (code, out, err) = t.exec(&["cat", "/mnt/data/hello.txt"]).await;
    assert_eq!((code, out.as_str()), (0, "hello from the host\n"), "{err}");
    let (code, _, err) = t
        .exec(&[
            "sh",
            "-c",
            "echo written in the guest > /mnt/data/f && sync",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    remove(&t, s, "/mnt/data").await;
    // Gone from the guest, and the slot is empty.
    let (code, _, _) = t.exec(&["test", "-e", "/mnt/data/hello.txt"]).await;
    assert_eq!(code, 1);
    t.vm.detach_disk(s).await.expect("detach an empty slot");
    assert_eq!(debugfs_cat(&image, "f"), "written in the guest\n");
    t.finish(&[&image]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_qcow2_disk_with_its_partition_is_mounted_by_the_type_asked() {
    let dir = scratch();
    let raw = ext4_image(dir.path(), "q.raw", &[("q", "from qcow2\n")]);
    let image = dir.path().join("q.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(&image)
        .output()
        .unwrap_or_else(|e| {
            missing(format_args!(
                "qemu-img ({e}; package qemu-utils, from the backports QEMU comes from)"
            ))
        });
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let s = slot(0, 7);
    let mut disk = DiskConfig::raw(&image);
    disk.format = uvm::seams::DiskFormat::Qcow2;
    disk.cache = uvm::seams::DiskCache::None;
    disk.discard = true;
    t.vm.attach_disk(s, &disk).await.expect("attach qcow2");
    let at = t.vm.disk_location(s);
    // The image has no partition table: partition 1 is not found, typed.
    let mut mount = DiskMount::at("/mnt/q");
    mount.partition = 1;
    let e = t
        .guest
        .mount_disk(&at, &mount)
        .await
        .expect_err("no partition 1");
    assert_eq!(
        rejected(&e).map(|r| r.1),
        Some(Rejection::NotFound),
        "{e:?}"
    );
    let mut xfs = DiskMount::at("/mnt/q");
    xfs.fs_type = Some("xfs".into());
    let e = t.guest.mount_disk(&at, &xfs).await.expect_err("not xfs");
    assert_eq!(
        rejected(&e).map(|r| r.1),
        Some(Rejection::InvalidArgument),
        "{e:?}"
    );
    let mut ext4 = DiskMount::at("/mnt/q");
    ext4.fs_type = Some("ext4".into());
    ext4.options = vec!["noatime".into(), "errors=remount-ro".into()];
    t.guest.mount_disk(&at, &ext4).await.expect("mount as ext4");
    let (code, out, _) = t.exec(&["cat", "/mnt/q/q"]).await;
    assert_eq!((code, out.as_str()), (0, "from qcow2\n"));
    let (_, opts, _) = t.exec(&["sh", "-c", "grep ' /mnt/q ' /proc/mounts"]).await;
    assert!(
        opts.contains("noatime") && opts.contains("errors=remount-ro"),
        "{opts}"
    );
    remove(&t, s, "/mnt/q").await;
    t.finish(&[&image]).await;
}

/// An empty image at `dir/name` of `mib` MiB (sparse) made by `mkfs` with `args` before the
/// path; `package` names what provides it.
fn blank_filesystem(dir: &Path, name: &str, mib: u64, mkfs: &[&str], package: &str) -> PathBuf {
    let image = dir.join(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(mib << 20))
        .expect("image file");
    let out = Command::new(mkfs[0])
        .args(&mkfs[1..])
        .arg(&image)
        .output()
        .unwrap_or_else(|e| missing(format_args!("{} ({e}; package {package})", mkfs[0])));
    assert!(
        out.status.success(),
        "{}: {}",
        mkfs[0],
        String::from_utf8_lossy(&out.stderr)
    );
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_xfs_and_vfat_disks_are_probed_mounted_and_keep_what_was_written() {
    let dir = scratch();
    // mkfs.xfs refuses a filesystem under 300 MiB; the file is sparse.
    let xfs = blank_filesystem(
        dir.path(),
        "x.img",
        320,
        &["mkfs.xfs", "-q", "-f"],
        "xfsprogs",
    );
    let vfat = blank_filesystem(dir.path(), "v.img", 16, &["mkfs.vfat"], "dosfstools");
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    for (s, image, fs) in [(slot(0, 1), &xfs, "xfs"), (slot(0, 2), &vfat, "vfat")] {
        let at = format!("/mnt/{fs}");
        let mount = || async {
            t.vm.attach_disk(s, &DiskConfig::raw(image))
                .await
                .expect("attach");
            // No type given: the agent reads it from the superblock.
            t.guest
                .mount_disk(&t.vm.disk_location(s), &DiskMount::at(at.as_str()))
                .await
                .unwrap_or_else(|e| panic!("mount {fs}: {e:?}"));
        };
        mount().await;
        let (_, mounts, _) = t.exec(&["cat", "/proc/mounts"]).await;
        assert!(
            mounts.lines().any(|l| l.contains(&format!(" {at} {fs} "))),
            "{fs} not mounted at {at}: {mounts}"
        );
        let script = format!("echo kept on {fs} > {at}/note && sync");
        let (code, _, err) = t.exec(&["sh", "-c", &script]).await;
        assert_eq!(code, 0, "{err}");
        remove(&t, s, &at).await;
        // Detached and attached again: what was written is read back from the image.
        mount().await;
        let (code, out, err) = t.exec(&["cat", &format!("{at}/note")]).await;
        assert_eq!(
            (code, out.trim()),
            (0, format!("kept on {fs}").as_str()),
            "{err}"
        );
        remove(&t, s, &at).await;
    }
    t.finish(&[&xfs, &vfat]).await;
}

/// An image of 17 MiB with an MBR partition table whose one partition (from 1 MiB on) holds
/// an ext4 filesystem with `files`.
fn partitioned_image(dir: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
    const START_LBA: u32 = 2048;
    const SECTORS: u32 = 16 * 2048;
    let content = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&content).expect("image content dir");
    for (file, text) in files {
        std::fs::write(content.join(file), text).expect("image content");
    }
    let image = dir.join(name);
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(u64::from(START_LBA + SECTORS) * 512))
        .expect("image file");
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            &format!("offset={}", START_LBA * 512),
            "-d",
        ])
        .arg(&content)
        .arg(&image)
        .arg(format!("{}k", SECTORS / 2))
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The MBR: one Linux partition (type 0x83) at START_LBA, SECTORS long.
    let mut entry = [0u8; 16];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&START_LBA.to_le_bytes());
    entry[12..16].copy_from_slice(&SECTORS.to_le_bytes());
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open image");
    f.write_all_at(&entry, 446).expect("partition entry");
    f.write_all_at(&[0x55, 0xAA], 510).expect("MBR signature");
    image
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_partition_of_a_disk_is_mounted_and_the_whole_disk_is_no_filesystem() {
    let dir = scratch();
    let image = partitioned_image(dir.path(), "parted.img", &[("p", "in partition 1\n")]);
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let s = slot(0, 4);
    t.vm.attach_disk(s, &DiskConfig::raw(&image))
        .await
        .expect("attach");
    let at = t.vm.disk_location(s);
    let e = t
        .guest
        .mount_disk(&at, &DiskMount::at("/mnt/whole"))
        .await
        .expect_err("the whole disk holds a partition table");
    assert_eq!(
        rejected(&e).map(|r| r.1),
        Some(Rejection::NotFound),
        "{e:?}"
    );
    let mut mount = DiskMount::at("/mnt/part");
    mount.partition = 1;
    t.guest
        .mount_disk(&at, &mount)
        .await
        .expect("mount partition 1");
    let (code, out, _) = t.exec(&["cat", "/mnt/part/p"]).await;
    assert_eq!((code, out.as_str()), (0, "in partition 1\n"));
    remove(&t, s, "/mnt/part").await;
    t.finish(&[&image]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_read_only_disk_refuses_writes_in_the_guest() {
    let dir = scratch();
    let image = ext4_image(dir.path(), "ro.img", &[("r", "read me\n")]);
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let s = slot(0, 3);
    let mut disk = DiskConfig::raw(&image);
    disk.read_only = true;
    t.vm.attach_disk(s, &disk).await.expect("attach read-only");
    let at = t.vm.disk_location(s);
    // A writable mount of a write-protected disk is refused, typed.
    let e = t
        .guest
        .mount_disk(&at, &DiskMount::at("/mnt/ro"))
        .await
        .expect_err("a writable mount of a read-only disk");
    assert_eq!(
        rejected(&e),
        Some((GuestRequest::MountDisk, Rejection::PermissionDenied)),
        "{e:?}"
    );
    let mut mount = DiskMount::at("/mnt/ro");
    mount.read_only = true;
    t.guest
        .mount_disk(&at, &mount)
        .await
        .expect("mount read-only");
    let (code, out, _) = t.exec(&["cat", "/mnt/ro/r"]).await;
    assert_eq!((code, out.as_str()), (0, "read me\n"));
    let (code, _, err) = t.exec(&["sh", "-c", "echo x > /mnt/ro/w"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("Read-only file system"), "{err}");
    remove(&t, s, "/mnt/ro").await;
    assert_eq!(debugfs_cat(&image, "w"), "");
    t.finish(&[&image]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_eight_disks_are_attached_mounted_and_removed() {
    let dir = scratch();
    let images: Vec<PathBuf> = (0..8)
        .map(|i| {
            ext4_image(
                dir.path(),
                &format!("d{i}.img"),
                &[("n", &format!("disk {i}\n"))],
            )
        })
        .collect();
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let mut to_mounted = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let s = slot(0, u8::try_from(i).expect("small"));
        let t0 = Instant::now();
        t.vm.attach_disk(s, &DiskConfig::raw(image))
            .await
            .expect("attach");
        t.guest
            .mount_disk(&t.vm.disk_location(s), &DiskMount::at(format!("/mnt/d{i}")))
            .await
            .expect("mount");
        to_mounted.push(t0.elapsed());
    }
    let (code, out, err) = t
        .exec(&[
            "sh",
            "-c",
            "cat /mnt/d0/n /mnt/d1/n /mnt/d2/n /mnt/d3/n /mnt/d4/n /mnt/d5/n /mnt/d6/n /mnt/d7/n",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let expected: String = (0..8).map(|i| format!("disk {i}\n")).collect();
    assert_eq!(out, expected);
    for i in 0..8u8 {
        remove(&t, slot(0, i), &format!("/mnt/d{i}")).await;
    }
    let (code, out, _) = t
        .exec(&["sh", "-c", "ls /sys/block | grep -c '^sd' || true"])
        .await;
    assert_eq!((code, out.trim()), (0, "0"), "SCSI disks left in the guest");
    to_mounted.sort();
    eprintln!(
        "8 disks: hot-add → mounted p50 {:.1} ms (min {:.1}, max {:.1})",
        to_mounted[4].as_secs_f64() * 1e3,
        to_mounted[0].as_secs_f64() * 1e3,
        to_mounted[7].as_secs_f64() * 1e3
    );
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    t.finish(&refs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_busy_mount_is_busy_until_its_user_leaves() {
    let dir = scratch();
    let image = ext4_image(dir.path(), "busy.img", &[("f", "x")]);
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let s = slot(0, 0);
    t.vm.attach_disk(s, &DiskConfig::raw(&image))
        .await
        .expect("attach");
    let at = t.vm.disk_location(s);
    t.guest
        .mount_disk(&at, &DiskMount::at("/mnt/busy"))
        .await
        .expect("mount");
    // A process whose working directory is inside the mount.
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let (signal, signals) = tokio::sync::mpsc::channel(uvm::seams::EXEC_SIGNAL_QUEUE);
    let mut req = ExecRequest::new(["sleep", "600"]);
    req.cwd = Some("/mnt/busy".into());
    req.started = Some(started_tx);
    req.signals = Some(signals);
    let guest = t.guest.clone();
    let user = tokio::spawn(async move { guest.exec(req).await });
    started.await.expect("the user started");
    let e = t.guest.unmount_disk("/mnt/busy").await.expect_err("busy");
    assert_eq!(
        rejected(&e),
        Some((GuestRequest::UnmountDisk, Rejection::Busy)),
        "{e:?}"
    );
    // Ejecting a mounted disk is refused too, and it stays usable.
    let e = t.guest.eject_disk(&at).await.expect_err("mounted");
    assert_eq!(rejected(&e).map(|r| r.1), Some(Rejection::Busy), "{e:?}");
    let (code, out, _) = t.exec(&["cat", "/mnt/busy/f"]).await;
    assert_eq!((code, out.as_str()), (0, "x"));
    signal.send(9).await.expect("the user is running");
    let code = user.await.expect("join").expect("exec");
    assert_eq!((code.code, code.signal), (128 + 9, Some(9)));
    remove(&t, s, "/mnt/busy").await;
    t.finish(&[&image]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_a_disk_another_vm_writes_is_refused() {
    let dir = scratch();
    let image = ext4_image(dir.path(), "shared.img", &[("f", "x")]);
    let a = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    a.vm.attach_disk(slot(0, 0), &DiskConfig::raw(&image))
        .await
        .expect("the first writer");
    let b = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    let e =
        b.vm.attach_disk(slot(0, 0), &DiskConfig::raw(&image))
            .await
            .expect_err("a second writer");
    assert!(
        matches!(&e, HostError::InvalidInput { what: "disk", message } if message.contains("in use")),
        "{e:?}"
    );
    // B is as it was: its slot is free for another disk.
    let other = ext4_image(dir.path(), "other.img", &[("g", "y")]);
    b.vm.attach_disk(slot(0, 0), &DiskConfig::raw(&other))
        .await
        .expect("another disk");
    b.vm.detach_disk(slot(0, 0)).await.expect("detach");
    b.finish(&[&other]).await;
    // Given at create to another VM, the image is refused at start.
    let cold = VmConfig {
        disks: vec![DiskSpec {
            disk: DiskConfig::raw(&image),
            mount: DiskMount::at("/mnt/c"),
        }],
        ..VmConfig::default()
    };
    let refused = try_boot(Machine::Q35, dir.path(), cold).await;
    assert!(
        matches!(&refused, Err(HostError::InvalidInput { what: "disk", message }) if message.contains("in use")),
        "{:?}",
        refused.as_ref().err()
    );
    a.vm.detach_disk(slot(0, 0)).await.expect("detach");
    a.finish(&[&image]).await;
}

/// Two disks given at create: mounted at their cold slots' locations, read, written.
async fn cold_disks_are_mounted_read_and_written(machine: Machine) {
    let dir = scratch();
    let images = [
        ext4_image(dir.path(), "c0.img", &[("n", "cold 0\n")]),
        ext4_image(dir.path(), "c1.img", &[("n", "cold 1\n")]),
    ];
    let config = VmConfig {
        disks: images
            .iter()
            .enumerate()
            .map(|(i, image)| DiskSpec {
                disk: DiskConfig::raw(image),
                mount: DiskMount::at(format!("/mnt/c{i}")),
            })
            .collect(),
        ..VmConfig::default()
    };
    let t = boot(machine, dir.path(), config.clone()).await;
    for (i, spec) in config.disks.iter().enumerate() {
        let s = cold_disk_slot(i).expect("a slot");
        t.guest
            .mount_disk(&t.vm.disk_location(s), &spec.mount)
            .await
            .expect("mount a cold disk");
    }
    let (code, out, err) = t
        .exec(&[
            "sh",
            "-c",
            "cat /mnt/c0/n /mnt/c1/n && echo w > /mnt/c1/w && sync",
        ])
        .await;
    assert_eq!((code, out.as_str()), (0, "cold 0\ncold 1\n"), "{err}");
    for i in 0..2 {
        let s = cold_disk_slot(i).expect("a slot");
        let path = format!("/mnt/c{i}");
        match machine {
            Machine::Q35 => remove(&t, s, &path).await,
            Machine::Microvm => {
                t.guest.unmount_disk(&path).await.expect("unmount");
                t.guest
                    .eject_disk(&t.vm.disk_location(s))
                    .await
                    .expect("eject is a no-op on virtio-blk");
                assert!(matches!(
                    t.vm.detach_disk(s).await,
                    Err(HostError::Unsupported { .. })
                ));
            }
        }
    }
    if machine == Machine::Microvm {
        let spare = ext4_image(dir.path(), "spare.img", &[]);
        assert!(matches!(
            t.vm.attach_disk(
                ScsiSlot {
                    controller: 0,
                    lun: 5
                },
                &DiskConfig::raw(&spare)
            )
            .await,
            Err(HostError::Unsupported { .. })
        ));
    }
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    t.finish(&refs).await;
    assert_eq!(debugfs_cat(&images[1], "w"), "w\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_cold_disks_at_create_on_q35() {
    cold_disks_are_mounted_read_and_written(Machine::Q35).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_cold_disks_at_create_on_microvm() {
    cold_disks_are_mounted_read_and_written(Machine::Microvm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_vm_terminated_with_a_mounted_disk_leaves_nothing_behind() {
    let dir = scratch();
    let image = ext4_image(dir.path(), "left.img", &[("f", "x")]);
    let t = boot(Machine::Q35, dir.path(), VmConfig::default()).await;
    t.vm.attach_disk(slot(0, 2), &DiskConfig::raw(&image))
        .await
        .expect("attach");
    t.guest
        .mount_disk(&t.vm.disk_location(slot(0, 2)), &DiskMount::at("/mnt/left"))
        .await
        .expect("mount");
    assert!(!holders_of(&image).is_empty(), "QEMU holds the image");
    // No unmount, no detach: terminate takes it all down.
    t.finish(&[&image]).await;
    assert_eq!(debugfs_cat(&image, "f"), "x", "the image is readable");
}
