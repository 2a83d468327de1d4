//! Real-VM checks of the image: each boots QEMU under TCG for a few seconds. They are named
//! `real_vm_*`, so nextest runs them in the `real-vm` group (`.config/nextest.toml`) and `make
//! check` leaves them out. They need `make setup` (QEMU, vhost-device-vsock, busybox, Debian's
//! kernel and ours); a machine without it fails them, naming what is missing. Run them alone
//! with `cargo nextest run -p uvm-image --test boot_qemu --no-capture`.
//!
//! Instead of the agent, `/init` is a busybox shell script that does what the agent's early boot
//! does with the image (mount, load `/lib/modules/uvm/load-order` if there is one), prints what
//! it sees (virtio devices and their drivers, guest uptime at `/init` and at the end) and powers
//! off. The tests print the host-side times to `/init` and to `READY` and QEMU's peak RSS.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use uvm_host::tcg_kernel_args;
use uvm_image::{ensure_image, Image, ImageSpec, KernelFlavor};

const TEST_INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
echo "INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if [ -f /lib/modules/uvm/load-order ]; then
  cd /lib/modules/uvm
  while read -r m; do insmod "$m" || echo "INSMOD-FAILED $m"; done < load-order
  cd /
fi
# A kernel without module support (ours) has no /proc/modules.
echo "LSMOD-BEGIN"; [ -f /proc/modules ] && cut -d' ' -f1 /proc/modules; echo "LSMOD-END"
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d/device" ] && echo "VIRTIO $(basename "$d") device=$(cat "$d/device") driver=$(basename "$(readlink "$d/driver")")"
done
for d in /sys/bus/virtio/drivers/*; do
  n=0; for l in "$d"/virtio*; do [ -e "$l" ] && n=$((n+1)); done
  echo "DRIVER $(basename "$d") devices=$n"
done
echo "CPUS $(grep -c ^processor /proc/cpuinfo)"
echo "CLOCKSOURCE $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
echo "READY uptime=$(cut -d' ' -f1 /proc/uptime)"
# Let the host read QEMU's memory use while the guest is up.
sleep 0.5
poweroff -f
"#;

/// Fails the test: a real-VM test whose prerequisites are missing says which, and how to get it.
fn missing(what: impl std::fmt::Display) -> ! {
    panic!(
        "real-VM test prerequisite missing: {what}\n\
         (`make test` provides every prerequisite: it runs `make setup` first)"
    )
}

/// Whether `name` is an executable on `PATH`, where the tests spawn it from.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

fn require_binaries(names: &[&str]) {
    for name in names {
        if !on_path(name) {
            missing(format_args!(
                "{name} is not on PATH; `make setup` installs it"
            ));
        }
    }
}

fn default_cache() -> PathBuf {
    std::env::var_os("UVMCTL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            PathBuf::from(home).join(".cache/uvmctl")
        })
}

/// Builds the image from the real kernel of `flavor`, with the test init as the "agent".
fn test_image(dir: &Path, flavor: KernelFlavor) -> Image {
    let cache = default_cache();
    let init = dir.join("init.sh");
    std::fs::write(&init, TEST_INIT).expect("write the test init");
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .expect("make the test init executable");
    let spec = ImageSpec {
        kernel: flavor,
        kernel_root: cache.join("kernel/debian"),
        our_vmlinux: uvm_image::our_vmlinux(&cache),
        agent: init,
        busybox: PathBuf::from("/bin/busybox"),
        cache_dir: dir.join("cache"),
    };
    // The kernel and busybox; its errors name the command that provides them.
    spec.check().unwrap_or_else(|e| missing(e));
    let started = Instant::now();
    let image = ensure_image(&spec).expect("build the image");
    eprintln!(
        "{flavor} image {} built in {:?}",
        image.id,
        started.elapsed()
    );
    image
}

/// What a boot printed and how long it took (host clock, from QEMU's spawn).
#[derive(Debug)]
struct Boot {
    lines: Vec<String>,
    init_after: Option<Duration>,
    ready_after: Option<Duration>,
    /// QEMU's peak resident set (VmHWM), KiB, read while the guest was up.
    peak_rss_kib: Option<u64>,
    exited: bool,
}

impl Boot {
    /// Devices bound per virtio driver (`/sys/bus/virtio/drivers/<name>/`).
    fn bound(&self, driver: &str) -> usize {
        let prefix = format!("DRIVER {driver} devices=");
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn assert_bound(&self, drivers: &[&str]) {
        for d in drivers {
            assert!(self.bound(d) > 0, "no device bound to {d}");
        }
    }

    fn assert_ready(&self) {
        assert!(self.ready_after.is_some(), "guest never printed READY");
        assert!(self.exited, "QEMU did not exit after poweroff");
    }
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The machine to boot: its `-M` value and any firmware arguments.
#[derive(Debug, Clone, Copy)]
enum Machine {
    Q35,
    /// microvm with qboot (SeaBIOS is much slower to boot; BENCHMARKS.md), no option ROMs, an ISA UART for the console
    /// and the RTC for the wall clock.
    Microvm,
}

const QBOOT: &str = "/usr/share/qemu/qboot.rom";

impl Machine {
    fn args(self) -> Vec<String> {
        require_binaries(&["qemu-system-x86_64"]);
        if matches!(self, Machine::Microvm) && !Path::new(QBOOT).is_file() {
            missing(format_args!(
                "{QBOOT} (QEMU's qboot firmware) does not exist; `make setup` installs it"
            ));
        }
        match self {
            Machine::Q35 => vec!["-M".into(), "q35,accel=tcg".into()],
            Machine::Microvm => vec![
                "-M".into(),
                "microvm,accel=tcg,x-option-roms=off,isa-serial=on,rtc=on".into(),
                "-bios".into(),
                QBOOT.into(),
            ],
        }
    }
}

/// Boots QEMU (TCG) on the image with `extra` arguments; collects the serial console until
/// QEMU exits or `timeout`.
fn boot(image: &Image, machine: Machine, cmdline: &str, extra: &[&str], timeout: Duration) -> Boot {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(machine.args())
        .args(["-m", "256", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {cmdline}").trim_end())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("{cmd:?}");
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn QEMU");
    let stdout = child.stdout.take().expect("QEMU's stdout is piped");
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
        init_after: None,
        ready_after: None,
        peak_rss_kib: None,
        exited: false,
    };
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok((at, line)) => {
                if line.starts_with("INIT") && boot.init_after.is_none() {
                    boot.init_after = Some(at);
                }
                if line.starts_with("READY") && boot.ready_after.is_none() {
                    boot.ready_after = Some(at);
                    boot.peak_rss_kib = status_kib(child.id(), "VmHWM:");
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
    while child.try_wait().expect("try_wait").is_none() && Instant::now() < reap_deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    boot.exited = child.try_wait().expect("try_wait").is_some();
    stop(&mut child);
    for line in &boot.lines {
        eprintln!("guest| {line}");
    }
    eprintln!(
        "TIMES {machine:?}: /init after {:?}, READY after {:?}, QEMU peak RSS {:?} MiB",
        boot.init_after,
        boot.ready_after,
        boot.peak_rss_kib.map(|k| k / 1024)
    );
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

/// vhost-device-vsock serving one guest (CID 3) on `dir/vhost.sock`.
struct VhostVsock {
    child: Child,
    chardev: String,
}

impl VhostVsock {
    fn start(dir: &Path) -> VhostVsock {
        require_binaries(&["vhost-device-vsock"]);
        let vhost_sock = dir.join("vhost.sock");
        let uds = dir.join("vsock.sock");
        let child = Command::new("vhost-device-vsock")
            .arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={},uds-path={}",
                vhost_sock.display(),
                uds.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vhost-device-vsock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vhost_sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(vhost_sock.exists(), "vhost-device-vsock made no socket");
        VhostVsock {
            child,
            chardev: format!("socket,id=vs,path={}", vhost_sock.display()),
        }
    }
}

impl Drop for VhostVsock {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A 16 MiB sparse raw disk image.
fn disk(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the disk image");
    format!("file={},format=raw,if=none,id={name}", path.display())
}

#[test]
fn real_vm_debian_kernel_boots_and_loads_the_modules() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path(), KernelFlavor::Debian);
    let boot = boot(&image, Machine::Q35, "", &[], Duration::from_secs(60));
    boot.assert_ready();
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
fn real_vm_vsock_device_appears_with_vhost_device_vsock() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path(), KernelFlavor::Debian);
    let vhost = VhostVsock::start(dir.path());
    let boot = boot(
        &image,
        Machine::Q35,
        "",
        &[
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "memory-backend=mem",
            "-chardev",
            &vhost.chardev,
            "-device",
            "vhost-user-vsock-pci,chardev=vs",
        ],
        Duration::from_secs(60),
    );
    drop(vhost);
    boot.assert_ready();
    // virtio device id 19 is vsock; it must be bound to its driver.
    assert!(
        boot.lines.iter().any(|l| l.starts_with("VIRTIO")
            && l.contains("device=0x0013")
            && l.contains("driver=vmw_vsock_virtio_transport")),
        "no vsock device bound in the guest"
    );
}

/// Every virtio device the controller attaches, and the driver that must take each.
const DEVICES: &[(&str, &str)] = &[
    ("vhost-user-vsock", "vmw_vsock_virtio_transport"),
    ("virtio-blk", "virtio_blk"),
    ("virtio-scsi", "virtio_scsi"),
    ("virtio-net", "virtio_net"),
    ("virtio-balloon", "virtio_balloon"),
    ("virtio-rng", "virtio_rng"),
    ("virtio-serial", "virtio_console"),
];

/// QEMU arguments attaching [`DEVICES`], with `transport` `pci` or `device` (virtio-mmio).
fn devices(dir: &Path, vhost: &VhostVsock, transport: &str) -> Vec<String> {
    let t = transport;
    let mut args: Vec<String> = [
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine",
        "memory-backend=mem",
        "-chardev",
        &vhost.chardev,
        "-device",
        &format!("vhost-user-vsock-{t},chardev=vs"),
        "-drive",
        &disk(dir, "blk0"),
        "-device",
        &format!("virtio-blk-{t},drive=blk0"),
        "-device",
        &format!("virtio-scsi-{t},id=scsi0"),
        "-drive",
        &disk(dir, "scsi0"),
        "-device",
        "scsi-hd,drive=scsi0,bus=scsi0.0",
        "-netdev",
        "user,id=net0",
        "-device",
        &format!("virtio-net-{t},netdev=net0"),
        "-device",
        &format!("virtio-balloon-{t}"),
        "-device",
        &format!("virtio-rng-{t}"),
        "-device",
        &format!("virtio-serial-{t}"),
    ]
    .map(str::to_owned)
    .into();
    if t == "pci" {
        // A hotplug-capable slot, as the controller uses for device_add.
        args.extend(["-device", "pcie-root-port,id=rp0,chassis=1"].map(str::to_owned));
    }
    args
}

fn assert_all_bound(boot: &Boot) {
    let drivers: Vec<&str> = DEVICES.iter().map(|(_, d)| *d).collect();
    boot.assert_bound(&drivers);
    assert!(
        boot.lines.iter().any(|l| l.starts_with("VIRTIO")
            && l.contains("device=0x0013")
            && l.contains("driver=vmw_vsock_virtio_transport")),
        "no vsock device bound in the guest"
    );
    // No modules to load, and none loaded.
    assert!(loaded_modules(&boot.lines).is_empty());
}

#[test]
fn real_vm_our_kernel_boots_on_q35_with_every_device_bound() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path(), KernelFlavor::Ours);
    // Bare, as the Debian test boots: the kernel's own time to /init.
    boot(&image, Machine::Q35, "", &[], Duration::from_secs(60)).assert_ready();
    let vhost = VhostVsock::start(dir.path());
    let args = devices(dir.path(), &vhost, "pci");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let boot = boot(&image, Machine::Q35, "", &args, Duration::from_secs(60));
    drop(vhost);
    boot.assert_ready();
    assert_all_bound(&boot);
}

#[test]
fn real_vm_our_kernel_boots_on_microvm_with_every_device_bound() {
    let dir = tempfile::tempdir().unwrap();
    let image = test_image(dir.path(), KernelFlavor::Ours);
    // `tsc_early_khz=`: without it the kernel's early TSC calibration can hang, as microvm
    // has no timer to calibrate against. `tsc=reliable`: without it two vCPUs under TCG fail
    // the TSC sync check and the clock falls back to jiffies.
    let cmdline = tcg_kernel_args().unwrap();
    let vhost = VhostVsock::start(dir.path());
    let mut args = devices(dir.path(), &vhost, "device");
    // Two CPUs: the configuration where a missing tsc_early_khz hangs most often.
    args.extend(["-smp", "2"].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let boot = boot(
        &image,
        Machine::Microvm,
        &cmdline,
        &args,
        Duration::from_secs(60),
    );
    drop(vhost);
    boot.assert_ready();
    assert_all_bound(&boot);
    assert!(
        boot.lines.iter().any(|l| l == "CPUS 2"),
        "second CPU missing"
    );
    assert!(
        boot.lines
            .iter()
            .any(|l| l == "CLOCKSOURCE tsc-early" || l == "CLOCKSOURCE tsc"),
        "the guest does not keep time with the TSC"
    );
}
