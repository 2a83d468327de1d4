//! Real-VM checks of the image (ignored by default: they need `scripts/setup.sh` to have run,
//! and boot QEMU under TCG for a few seconds each). Run them with
//! `cargo test -p uvm-image --test boot_qemu -- --ignored --test-threads 1`.
//!
//! Instead of the agent, `/init` is a busybox shell script that does what the agent's early boot
//! does with the image (mount, load `/lib/modules/uvm/load-order`), prints what it sees and
//! powers off.
#![allow(clippy::unwrap_used, reason = "a test reports failure by panicking")]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uvm_image::{ensure_image, Image, ImageSpec};

const TEST_INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
cd /lib/modules/uvm
while read -r m; do insmod "$m" || echo "INSMOD-FAILED $m"; done < load-order
echo "LSMOD-BEGIN"; cat /proc/modules | cut -d' ' -f1; echo "LSMOD-END"
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] && echo "VIRTIO $(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")")"
done
echo "READY uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"#;

/// Builds the image from the real Debian kernel, with the test init as the "agent".
fn test_image(dir: &Path) -> Image {
    let defaults_cache = std::env::var_os("UVMCTL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap();
            PathBuf::from(home).join(".cache/uvmctl")
        });
    let init = dir.join("init.sh");
    std::fs::write(&init, TEST_INIT).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = ImageSpec {
        kernel_root: defaults_cache.join("kernel/debian"),
        agent: init,
        busybox: PathBuf::from("/bin/busybox"),
        cache_dir: dir.join("cache"),
    };
    let started = Instant::now();
    let image = ensure_image(&spec).unwrap();
    eprintln!("image {} built in {:?}", image.id, started.elapsed());
    image
}

struct Boot {
    lines: Vec<String>,
    ready_after: Option<Duration>,
    exited: bool,
}

/// Boots QEMU (TCG) on the image with `extra` arguments; collects the serial console until
/// QEMU exits or `timeout`.
fn boot(image: &Image, extra: &[&str], timeout: Duration) -> Boot {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "q35,accel=tcg",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
    ])
    .args(["-nographic", "-no-reboot", "-serial", "stdio"])
    .arg("-kernel")
    .arg(&image.kernel)
    .arg("-initrd")
    .arg(&image.initramfs)
    .args(["-append", "console=ttyS0 panic=-1"])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((started.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut boot = Boot {
        lines: Vec::new(),
        ready_after: None,
        exited: false,
    };
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok((at, line)) => {
                if line.starts_with("READY") && boot.ready_after.is_none() {
                    boot.ready_after = Some(at);
                }
                boot.lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if left.is_zero() {
                    break;
                }
            }
        }
    }
    // The console closes a moment before the process is reaped: give it a little time.
    let reap_deadline = Instant::now() + Duration::from_secs(5);
    while child.try_wait().unwrap().is_none() && Instant::now() < reap_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    boot.exited = child.try_wait().unwrap().is_some();
    stop(&mut child);
    for line in &boot.lines {
        eprintln!("guest| {line}");
    }
    eprintln!("READY after {:?}", boot.ready_after);
    boot
}

/// Kills (if still running) and reaps a child this test started.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn loaded_modules(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .skip_while(|l| !l.starts_with("LSMOD-BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("LSMOD-END"))
        .map(|l| l.trim())
        .collect()
}

#[test]
#[ignore = "boots QEMU (TCG) on the Debian kernel from scripts/setup.sh"]
fn debian_kernel_boots_and_loads_the_modules() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path());
    let boot = boot(&image, &[], Duration::from_secs(60));
    assert!(boot.ready_after.is_some(), "guest never printed READY");
    assert!(boot.exited, "QEMU did not exit after poweroff");
    assert!(
        !boot.lines.iter().any(|l| l.starts_with("INSMOD-FAILED")),
        "a module failed to load"
    );
    let modules = loaded_modules(&boot.lines);
    for m in [
        "virtio_pci",
        "vmw_vsock_virtio_transport",
        "vsock",
        "virtio_blk",
    ] {
        assert!(modules.contains(&m), "{m} not loaded: {modules:?}");
    }
}

#[test]
#[ignore = "boots QEMU (TCG) with vhost-device-vsock from scripts/setup.sh"]
fn vsock_device_appears_with_vhost_device_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path());
    let vhost_sock = dir.path().join("vhost.sock");
    let uds = dir.path().join("vsock.sock");
    let mut vhost = Command::new("vhost-device-vsock")
        .arg("--vm")
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost_sock.display(),
            uds.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vhost_sock.exists(), "vhost-device-vsock made no socket");
    let chardev = format!("socket,id=vs,path={}", vhost_sock.display());
    let boot = boot(
        &image,
        &[
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-vsock-pci,chardev=vs",
        ],
        Duration::from_secs(60),
    );
    stop(&mut vhost);
    assert!(boot.ready_after.is_some(), "guest never printed READY");
    // virtio device id 19 is vsock; it must be bound to its driver.
    assert!(
        boot.lines.iter().any(|l| l.starts_with("VIRTIO")
            && l.contains("device=0x0013")
            && l.contains("driver=vmw_vsock_virtio_transport")),
        "no vsock device bound in the guest"
    );
}
