//! A benchmark probe (to become a `uvmctl bench` row): disk hot-add → mounted, against the bare
//! floor measured in the same VM, in the same run — QMP `blockdev-add` + `device_add` → the
//! guest kernel announces the block device (its `add` uevent, seen by busybox `uevent` in the
//! guest, which forks a shell per event: that observer's own cost is in the floor) — and the
//! agent's view without the mount: hot-add → `MountDisk` of a blank image answers "no
//! filesystem" (device awaited, opened, superblock read). All on q35 under whatever accelerator
//! the machine gives.
//!
//! `cargo run -p uvm-vm --example disk_hotplug_probe [ROUNDS]` (after `make setup` and
//! `make agent`; e2fsprogs for the image). Prints each p50 and their ratio.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use uvm::seams::{
    DiskConfig, DiskMount, ExecRequest, GuestConnection, GuestExec, GuestMounts, HostDevices,
    ScsiSlot, VmConfig, VmLifetime,
};
use uvm_guest::{GuestLinkConfig, VsockGuest};
use uvm_qemu::{QemuBackend, QemuVm};
use uvm_vm::{default_image, Machine, VmOptions};

/// Runs in the guest: says `primed` on the first `mem` event (the host triggers one, so it
/// knows the listener is bound), then the name of each block device added.
const LISTENER: &str = r#"uevent sh -c 'case "$SUBSYSTEM/$ACTION" in
  mem/change) echo primed ;;
  block/add) echo "$DEVNAME" ;;
esac'"#;

type Lines = tokio::io::Lines<BufReader<tokio::io::DuplexStream>>;

/// Reads the listener's lines up to the next block device added.
async fn next_add(lines: &mut Lines) -> Result<(), Box<dyn std::error::Error>> {
    loop {
        match lines.next_line().await? {
            Some(line) if line.starts_with("sd") => return Ok(()),
            Some(_) => {}
            None => return Err("the guest's uevent listener ended".into()),
        }
    }
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(9);
    let scratch = tempfile::Builder::new().prefix("uvmp").tempdir_in("/tmp")?;
    let image = scratch.path().join("probe.img");
    std::fs::File::create(&image)?.set_len(16 << 20)?;
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .status()?;
    if !status.success() {
        return Err("mkfs.ext4 failed".into());
    }
    let blank = scratch.path().join("blank.img");
    std::fs::File::create(&blank)?.set_len(16 << 20)?;
    let (vm, guest) = boot(scratch.path()).await?;
    let result = probe(&vm, &guest, &image, &blank, rounds).await;
    let _ = guest.close_connection().await;
    vm.terminate().await?;
    vm.release().await?;
    let (floor, seen, ours) = result?;
    println!(
        "disk hot-add, {rounds} rounds (p50): QMP device_add → block device in the guest {:.1} ms; \
         hot-add → the agent sees it (no mount) {:.1} ms; hot-add → mounted {:.1} ms; \
         mounted / floor {:.2}",
        ms(floor),
        ms(seen),
        ms(ours),
        ours.as_secs_f64() / floor.as_secs_f64()
    );
    Ok(())
}

async fn boot(root: &Path) -> Result<(Arc<QemuVm>, VsockGuest), Box<dyn std::error::Error>> {
    let image = default_image()?;
    let options = VmOptions {
        machine: Machine::Q35,
        runtime_root: Some(root.to_path_buf()),
        ..VmOptions::default()
    };
    let backend = QemuBackend::new(uvm_vm::qemu_config(&image, &options));
    let id = uvm_vm::new_vm_id();
    let vm = Arc::new(backend.create_vm(&id, &VmConfig::default())?);
    let guest = VsockGuest::new(GuestLinkConfig::new(id));
    guest.prepare_connection(&vm.guest_endpoint()).await?;
    vm.start().await?;
    tokio::time::timeout(Duration::from_secs(90), guest.connect()).await??;
    Ok((vm, guest))
}

async fn probe(
    vm: &QemuVm,
    guest: &VsockGuest,
    image: &Path,
    blank: &Path,
    rounds: usize,
) -> Result<(Duration, Duration, Duration), Box<dyn std::error::Error>> {
    let slot = ScsiSlot {
        controller: 0,
        lun: 0,
    };
    let disk = DiskConfig::raw(image);
    // The floor's listener, for the whole run.
    let (mine, theirs) = tokio::io::duplex(4096);
    let (kill, signals) = tokio::sync::mpsc::channel(uvm::seams::EXEC_SIGNAL_QUEUE);
    let mut req = ExecRequest::new(["sh", "-c", LISTENER]);
    req.stdout = Some(Box::new(theirs));
    req.signals = Some(signals);
    let g = guest.clone();
    let listener = tokio::spawn(async move { g.exec(req).await });
    let mut lines = BufReader::new(mine).lines();
    // Trigger events until the listener answers one (it may not be bound for the first).
    loop {
        guest
            .exec(ExecRequest::new([
                "sh",
                "-c",
                "echo change > /sys/class/mem/null/uevent",
            ]))
            .await?;
        match tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
            Ok(Ok(Some(line))) if line == "primed" => break,
            Ok(Ok(Some(_))) | Err(_) => {}
            Ok(Ok(None)) | Ok(Err(_)) => return Err("the guest's uevent listener ended".into()),
        }
    }
    let location = vm.disk_location(slot);
    let (mut floor, mut seen, mut ours) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t0 = Instant::now();
        vm.attach_disk(slot, &disk).await?;
        next_add(&mut lines).await?;
        floor.push(t0.elapsed());
        guest.eject_disk(&location).await?;
        vm.detach_disk(slot).await?;

        let t0 = Instant::now();
        vm.attach_disk(slot, &DiskConfig::raw(blank)).await?;
        let refused = guest
            .mount_disk(&location, &DiskMount::at("/mnt/probe"))
            .await;
        seen.push(t0.elapsed());
        if refused.is_ok() {
            return Err("a blank image was mounted".into());
        }
        next_add(&mut lines).await?;
        guest.eject_disk(&location).await?;
        vm.detach_disk(slot).await?;

        let t0 = Instant::now();
        vm.attach_disk(slot, &disk).await?;
        guest
            .mount_disk(&location, &DiskMount::at("/mnt/probe"))
            .await?;
        ours.push(t0.elapsed());
        // Drain the listener's line for this add, so the next floor round reads its own.
        next_add(&mut lines).await?;
        guest.unmount_disk("/mnt/probe").await?;
        guest.eject_disk(&location).await?;
        vm.detach_disk(slot).await?;
    }
    let _ = kill.send(9).await;
    let _ = listener.await;
    Ok((p50(floor), p50(seen), p50(ours)))
}
