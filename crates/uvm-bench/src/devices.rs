//! Disks and shares on one q35 VM booted through the controller, each against a floor measured
//! on the same VM in the same run:
//!
//! - **disk hot-add → mounted**: the backend's `blockdev-add` + `device_add scsi-hd` and the
//!   agent's `MountDisk` (which waits on uevents for the device, then mounts ext4), against the
//!   same two QMP commands → the guest kernel's `add` uevent of the block device; and, to show
//!   what the mount itself costs, hot-add → the agent has the device open (`MountDisk` of a
//!   blank disk, refused with "no filesystem");
//! - **share hot-add → mounted**: virtiofsd spawned and ready, `chardev-add`, `device_add
//!   vhost-user-fs-pci` and the agent's `MountShare`, against the bare `device_add` of the same
//!   device → the guest's virtiofs driver bound to it (its `bind` uevent); the bare path's
//!   virtiofsd and chardev are made beforehand, untimed. Shares stay until the VM ends (a
//!   hot-remove waits out the guest's 5-second PCIe attention-button grace), so the VM has a
//!   spare root port for every share the run adds;
//! - **reads**: `uvm-agent probe read` (4 KiB random reads, then the whole file sequentially)
//!   on one file of pseudo-random bytes — on the host, from its page cache, and in the guest on
//!   the disk and on the share, with the guest's cache dropped before each pass so that every
//!   read crosses the virtual device (on the host the image and the shared file stay in its
//!   page cache, so the ratio is the cost of the virtual I/O path alone), alternated.
//!
//! The floors' uevents come from `uvm-agent probe uevents` running in the guest for the whole
//! run: one line per event and no process per event. Ours and the floor alternate which goes
//! first, round by round. The VM is torn down and checked for leftovers on every path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, DuplexStream, Lines};
use uvm::seams::{
    DiskConfig, DiskMount, ExecRequest, GuestMounts, HostDevices, ScsiSlot, ShareConfig, ShareMount,
};
use uvm_image::Image;
use uvm_qemu::{Machine, QemuVm};
use uvm_vm::{Vm, VmOptions};

use super::stats::Summary;
use super::BenchError;

/// How much of the device path to measure.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Disk rounds (each: one hot-add → mounted, one floor).
    pub disk_rounds: usize,
    /// Share rounds (each takes two spare PCIe ports until the VM ends).
    pub share_rounds: usize,
    /// The size of the file read, MiB.
    pub read_file_mib: u64,
    /// 4 KiB random reads per pass.
    pub random_reads: u64,
    /// Timed passes of each kind (after one untimed warm-up each).
    pub read_runs: usize,
}

impl DeviceOptions {
    /// The counts of a normal run, or of `--quick`.
    pub fn new(quick: bool) -> DeviceOptions {
        DeviceOptions {
            disk_rounds: if quick { 8 } else { 15 },
            share_rounds: if quick { 5 } else { 8 },
            read_file_mib: 32,
            random_reads: if quick { 1024 } else { 4096 },
            read_runs: 3,
        }
    }
}

/// One `probe read` pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadSample {
    pub random_4k_iops: f64,
    pub seq_mb_s: f64,
}

impl ReadSample {
    /// `random_4k_iops=… seq_mb_s=… bytes=…`, the last line of `probe read`'s output.
    fn parse(output: &str) -> Option<ReadSample> {
        let line = output.lines().last()?;
        let field = |name: &str| {
            line.split_ascii_whitespace()
                .find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<f64>().ok())
        };
        Some(ReadSample {
            random_4k_iops: field("random_4k_iops")?,
            seq_mb_s: field("seq_mb_s")?,
        })
    }
}

/// The samples of one run.
#[derive(Debug, Clone, Default)]
pub struct DeviceSamples {
    /// Disk hot-add → mounted.
    pub disk_mounted: Vec<Duration>,
    /// QMP `blockdev-add` + `device_add` → the block device's `add` uevent in the guest.
    pub disk_floor: Vec<Duration>,
    /// Disk hot-add → the agent has it open (a blank disk's `MountDisk`, refused).
    pub disk_seen: Vec<Duration>,
    /// Share hot-add (virtiofsd included) → mounted.
    pub share_mounted: Vec<Duration>,
    /// QMP `device_add vhost-user-fs-pci` → the virtiofs driver bound in the guest.
    pub share_floor: Vec<Duration>,
    /// The file read on the host.
    pub host_reads: Vec<ReadSample>,
    /// The same bytes read in the guest from the disk.
    pub disk_reads: Vec<ReadSample>,
    /// The same file read in the guest through the share.
    pub share_reads: Vec<ReadSample>,
}

/// Guest paths.
const DISK_AT: &str = "/mnt/bench-disk";
const SHARE_AT: &str = "/mnt/bench-share";
/// The file read, in the share's directory and in the image's root.
const DATA: &str = "data";
/// How long one awaited guest event may take.
const EVENT_WAIT: Duration = Duration::from_secs(60);

/// Measures the device path on one q35 VM; `agent` is the host path of the static agent binary
/// (the one in the image), which the host's read passes run. Refused on microvm (no hot-add).
pub async fn run(
    image: &Image,
    agent: &Path,
    options: &VmOptions,
    opts: &DeviceOptions,
    report: &(dyn Fn(String) + Sync),
) -> Result<DeviceSamples, BenchError> {
    if options.machine != Machine::Q35 {
        return Err(BenchError::Guest {
            message: "disk and share hot-add are measured on q35 only".to_owned(),
        });
    }
    let scratch = Scratch::new(opts.read_file_mib)?;
    let mut options = options.clone();
    // One port per share: ours and the floor's each round, and the read pass's.
    options.share_hotplug_ports = Some(u8::try_from(2 * opts.share_rounds + 1).unwrap_or(u8::MAX));
    let vm = Vm::new(image, options);
    let mut bare = BareShares::default();
    let measured = async {
        vm.boot().await.map_err(|source| BenchError::Controller {
            what: "start a VM",
            source,
        })?;
        let host = vm.qemu_vm().ok_or(BenchError::MissingMark {
            mark: "the QEMU VM",
        })?;
        let mut events = UeventLines::start(&vm).await?;
        let mut samples = DeviceSamples::default();
        disks(&vm, &host, &mut events, &scratch, opts, &mut samples).await?;
        report(format!(
            "disks: hot-add → mounted median {:.1} ms, floor {:.1} ms",
            median_ms(&samples.disk_mounted),
            median_ms(&samples.disk_floor)
        ));
        shares(
            &vm,
            &host,
            &mut events,
            &scratch,
            opts,
            &mut bare,
            &mut samples,
        )
        .await?;
        report(format!(
            "shares: hot-add → mounted median {:.1} ms, floor {:.1} ms",
            median_ms(&samples.share_mounted),
            median_ms(&samples.share_floor)
        ));
        events.stop().await;
        reads(&vm, &host, agent, &scratch, opts, &mut samples).await?;
        Ok::<_, BenchError>(samples)
    };
    let result = measured.await;
    let torn_down = super::measure::teardown(&vm).await;
    drop(bare);
    let samples = result?;
    torn_down?;
    Ok(samples)
}

async fn disks(
    vm: &Vm,
    host: &QemuVm,
    events: &mut UeventLines,
    scratch: &Scratch,
    opts: &DeviceOptions,
    samples: &mut DeviceSamples,
) -> Result<(), BenchError> {
    let disk = DiskAdd {
        vm,
        host,
        slot: ScsiSlot {
            controller: 0,
            lun: 0,
        },
        config: DiskConfig::raw(&scratch.image),
        blank: DiskConfig::raw(&scratch.blank),
    };
    // One untimed round of each: the first mount loads ext4's caches.
    disk.ours(events).await?;
    disk.floor(events).await?;
    disk.seen(events).await?;
    for round in 0..opts.disk_rounds {
        // Which kind goes first rotates.
        for kind in (0..3).map(|k| (k + round) % 3) {
            match kind {
                0 => samples.disk_mounted.push(disk.ours(events).await?),
                1 => samples.disk_floor.push(disk.floor(events).await?),
                _ => samples.disk_seen.push(disk.seen(events).await?),
            }
        }
    }
    Ok(())
}

/// One disk hot-added at one slot, again and again.
struct DiskAdd<'a> {
    vm: &'a Vm,
    host: &'a QemuVm,
    slot: ScsiSlot,
    config: DiskConfig,
    /// A disk without a filesystem, which the agent finds and refuses to mount.
    blank: DiskConfig,
}

impl DiskAdd<'_> {
    /// Hot-add → mounted, timed; then unmounted, ejected and detached.
    async fn ours(&self, events: &mut UeventLines) -> Result<Duration, BenchError> {
        let location = self.host.disk_location(self.slot);
        let t = Instant::now();
        self.host
            .attach_disk(self.slot, &self.config)
            .await
            .map_err(host_failed)?;
        self.vm
            .guest
            .mount_disk(&location, &DiskMount::at(DISK_AT))
            .await
            .map_err(guest_failed)?;
        let took = t.elapsed();
        // This add's own line, so that the floor's next wait reads its own.
        events.wait_for(is_disk_add).await?;
        self.vm
            .guest
            .unmount_disk(DISK_AT)
            .await
            .map_err(guest_failed)?;
        self.remove().await?;
        Ok(took)
    }

    /// QMP attach → the block device's uevent, timed; then ejected and detached.
    async fn floor(&self, events: &mut UeventLines) -> Result<Duration, BenchError> {
        let t = Instant::now();
        self.host
            .attach_disk(self.slot, &self.config)
            .await
            .map_err(host_failed)?;
        events.wait_for(is_disk_add).await?;
        let took = t.elapsed();
        self.remove().await?;
        Ok(took)
    }

    /// Hot-add → the agent has the device open and has read its first blocks (`MountDisk` of a
    /// blank disk, refused with "no filesystem"), timed: the mount's own cost is the rest.
    async fn seen(&self, events: &mut UeventLines) -> Result<Duration, BenchError> {
        let location = self.host.disk_location(self.slot);
        let t = Instant::now();
        self.host
            .attach_disk(self.slot, &self.blank)
            .await
            .map_err(host_failed)?;
        let refused = self
            .vm
            .guest
            .mount_disk(&location, &DiskMount::at(DISK_AT))
            .await;
        let took = t.elapsed();
        events.wait_for(is_disk_add).await?;
        self.remove().await?;
        match refused {
            Err(_) => Ok(took),
            Ok(()) => Err(BenchError::Guest {
                message: "the agent mounted a blank disk".to_owned(),
            }),
        }
    }

    async fn remove(&self) -> Result<(), BenchError> {
        let location = self.host.disk_location(self.slot);
        self.vm
            .guest
            .eject_disk(&location)
            .await
            .map_err(guest_failed)?;
        self.host.detach_disk(self.slot).await.map_err(host_failed)
    }
}

async fn shares(
    vm: &Vm,
    host: &QemuVm,
    events: &mut UeventLines,
    scratch: &Scratch,
    opts: &DeviceOptions,
    bare: &mut BareShares,
    samples: &mut DeviceSamples,
) -> Result<(), BenchError> {
    let share = ShareConfig {
        host_path: scratch.shared.clone(),
        read_only: true,
    };
    // The backend gives out the lowest ports it has not used (ours, then the read pass's); the
    // bare devices, which it does not know of, take the highest.
    let ports = 2 * opts.share_rounds + 1;
    for round in 0..opts.share_rounds {
        let ours_first = round % 2 == 0;
        for kind in [ours_first, !ours_first] {
            if kind {
                let tag = format!("bench{round}");
                let at = ShareMount {
                    guest_path: format!("/mnt/{tag}"),
                    read_only: true,
                };
                let t = Instant::now();
                host.add_share(&tag, &share).await.map_err(host_failed)?;
                vm.guest
                    .mount_share(&tag, host.share_transport(&tag), &at)
                    .await
                    .map_err(guest_failed)?;
                samples.share_mounted.push(t.elapsed());
                events.wait_for(is_virtiofs_bind).await?;
            } else {
                let device = bare.prepare(host, scratch, round).await?;
                let args = device_add_args(&device, &format!("uvm-port{}", ports - 1 - round));
                let t = Instant::now();
                host.qmp_execute("device_add", args)
                    .await
                    .map_err(host_failed)?;
                events.wait_for(is_virtiofs_bind).await?;
                samples.share_floor.push(t.elapsed());
            }
        }
    }
    Ok(())
}

async fn reads(
    vm: &Vm,
    host: &QemuVm,
    agent: &Path,
    scratch: &Scratch,
    opts: &DeviceOptions,
    samples: &mut DeviceSamples,
) -> Result<(), BenchError> {
    let slot = ScsiSlot {
        controller: 0,
        lun: 0,
    };
    host.attach_disk(slot, &DiskConfig::raw(&scratch.image))
        .await
        .map_err(host_failed)?;
    let mut mount = DiskMount::at(DISK_AT);
    mount.read_only = true;
    vm.guest
        .mount_disk(&host.disk_location(slot), &mount)
        .await
        .map_err(guest_failed)?;
    let tag = "bench-read";
    let share = ShareConfig {
        host_path: scratch.shared.clone(),
        read_only: true,
    };
    host.add_share(tag, &share).await.map_err(host_failed)?;
    let at = ShareMount {
        guest_path: SHARE_AT.to_owned(),
        read_only: true,
    };
    vm.guest
        .mount_share(tag, host.share_transport(tag), &at)
        .await
        .map_err(guest_failed)?;

    let random = opts.random_reads.to_string();
    let host_file = scratch.shared.join(DATA);
    let host_pass = || {
        let mut c = Command::new(agent);
        c.arg("probe").arg("read").arg(&host_file);
        c.args(["--random", &random]);
        run_host_probe(c)
    };
    let guest_pass = |dir: &str| {
        let file = format!("{dir}/{DATA}");
        let argv = [
            "/init",
            "probe",
            "read",
            &file,
            "--random",
            &random,
            "--drop-cache",
        ]
        .map(str::to_owned);
        async move { guest_probe(vm, argv.to_vec()).await }
    };
    host_pass()?;
    guest_pass(DISK_AT).await?;
    guest_pass(SHARE_AT).await?;
    for _ in 0..opts.read_runs {
        samples.host_reads.push(host_pass()?);
        samples.disk_reads.push(guest_pass(DISK_AT).await?);
        samples.share_reads.push(guest_pass(SHARE_AT).await?);
    }
    Ok(())
}

fn is_disk_add(line: &str) -> bool {
    let mut f = line.split(' ');
    (f.next(), f.next(), f.next().map(|d| d.starts_with("sd")))
        == (Some("add"), Some("block"), Some(true))
}

fn is_virtiofs_bind(line: &str) -> bool {
    let f: Vec<&str> = line.split(' ').collect();
    f.first() == Some(&"bind") && f.get(1) == Some(&"virtio") && f.get(3) == Some(&"virtiofs")
}

/// `uvm-agent probe uevents` running in the guest, its lines read here.
struct UeventLines {
    lines: Lines<BufReader<DuplexStream>>,
    kill: tokio::sync::mpsc::Sender<i32>,
    exec: tokio::task::JoinHandle<()>,
}

impl UeventLines {
    /// Starts the listener and waits until it is subscribed.
    async fn start(vm: &Vm) -> Result<UeventLines, BenchError> {
        let (mine, theirs) = tokio::io::duplex(1 << 16);
        let (kill, signals) = tokio::sync::mpsc::channel(uvm::seams::EXEC_SIGNAL_QUEUE);
        let mut req = ExecRequest::new(["/init", "probe", "uevents"]);
        req.stdout = Some(Box::new(theirs));
        req.signals = Some(signals);
        let controller = vm.controller.clone();
        let exec = tokio::spawn(async move {
            let _ = controller.exec_into_host(req).await;
        });
        let mut listener = UeventLines {
            lines: BufReader::new(mine).lines(),
            kill,
            exec,
        };
        listener.wait_for(|l| l == "listening").await?;
        Ok(listener)
    }

    /// Reads lines up to the first `matches` accepts.
    async fn wait_for(&mut self, matches: fn(&str) -> bool) -> Result<(), BenchError> {
        let read = async {
            loop {
                match self.lines.next_line().await {
                    Ok(Some(line)) if matches(&line) => return Ok(()),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        return Err(BenchError::Guest {
                            message: "the guest's uevent listener ended".to_owned(),
                        })
                    }
                }
            }
        };
        tokio::time::timeout(EVENT_WAIT, read)
            .await
            .map_err(|_| BenchError::Timeout {
                what: "a device's uevent in the guest",
                after: EVENT_WAIT,
            })?
    }

    /// Kills the listener and waits for its exec to end.
    async fn stop(self) {
        let _ = self.kill.send(9).await;
        drop(self.lines);
        let _ = self.exec.await;
    }
}

/// The floor's virtiofsd processes, killed and reaped when this drops.
#[derive(Default)]
struct BareShares(Vec<std::process::Child>);

impl BareShares {
    /// Spawns a virtiofsd for the floor's round `round` and adds its chardev; the device id.
    async fn prepare(
        &mut self,
        host: &QemuVm,
        scratch: &Scratch,
        round: usize,
    ) -> Result<String, BenchError> {
        let id = format!("bare{round}");
        let socket = scratch.dir.path().join(format!("{id}.sock"));
        let virtiofsd = uvm_qemu::find_binary("virtiofsd");
        let child = Command::new(&virtiofsd)
            .arg("--shared-dir")
            .arg(&scratch.shared)
            .arg("--socket-path")
            .arg(&socket)
            .arg("--readonly")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| BenchError::Spawn {
                program: virtiofsd,
                source,
            })?;
        self.0.push(child);
        let deadline = Instant::now() + EVENT_WAIT;
        while !uvm_host::unix_socket_listening(&socket).unwrap_or(false) {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: "the floor's virtiofsd to listen",
                    after: EVENT_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let chardev = serde_json::json!({
            "id": id,
            "backend": { "type": "socket", "data": {
                "addr": { "type": "unix", "data": { "path": socket } }, "server": false } },
        });
        host.qmp_execute("chardev-add", object(chardev))
            .await
            .map_err(host_failed)?;
        Ok(id)
    }
}

impl Drop for BareShares {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn device_add_args(id: &str, bus: &str) -> serde_json::Map<String, serde_json::Value> {
    object(serde_json::json!({
        "driver": "vhost-user-fs-pci", "id": id, "chardev": id, "tag": id, "bus": bus,
    }))
}

fn object(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The files of a run: `shared/data` (pseudo-random bytes), `disk.img` (an ext4 image with the
/// same `data` in its root) and `blank.img`. Removed when this drops.
struct Scratch {
    dir: tempfile::TempDir,
    shared: PathBuf,
    image: PathBuf,
    /// 16 MiB of zeros: no filesystem.
    blank: PathBuf,
}

impl Scratch {
    fn new(mib: u64) -> Result<Scratch, BenchError> {
        let io = |operation| move |source| BenchError::Io { operation, source };
        let dir = tempfile::Builder::new()
            .prefix("uvmb-dev")
            .tempdir_in(std::env::temp_dir())
            .map_err(io("make the device benchmark's directory"))?;
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).map_err(io("make the shared directory"))?;
        std::fs::write(shared.join(DATA), noise(mib << 20)).map_err(io("write the read file"))?;
        let image = dir.path().join("disk.img");
        let mkfs = PathBuf::from("mkfs.ext4");
        let out = Command::new(&mkfs)
            .args(["-q", "-F", "-d"])
            .arg(&shared)
            .arg(&image)
            .arg(format!("{}M", mib + 16))
            .stdin(Stdio::null())
            .output()
            .map_err(|source| BenchError::Spawn {
                program: mkfs,
                source,
            })?;
        if !out.status.success() {
            return Err(BenchError::Cli {
                command: "mkfs.ext4 -d".to_owned(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let blank = dir.path().join("blank.img");
        std::fs::File::create(&blank)
            .and_then(|f| f.set_len(16 << 20))
            .map_err(io("make the blank disk"))?;
        Ok(Scratch {
            dir,
            shared,
            image,
            blank,
        })
    }
}

/// `len` bytes of xorshift output: nothing a page-deduplicating or compressing layer could
/// shortcut.
fn noise(len: u64) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    while (out.len() as u64) < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(usize::try_from(len).unwrap_or(0));
    out
}

/// Runs a host-side `probe read` to completion (a blocking call: the pass is the measurement).
fn run_host_probe(mut command: Command) -> Result<ReadSample, BenchError> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BenchError::Io {
            operation: "run the host's read pass",
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match ReadSample::parse(&text) {
        Some(sample) if out.status.success() => Ok(sample),
        _ => Err(BenchError::Cli {
            command: "uvm-agent probe read".to_owned(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
    }
}

/// Runs `probe read` in the guest; its result.
async fn guest_probe(vm: &Vm, argv: Vec<String>) -> Result<ReadSample, BenchError> {
    let (mut mine, theirs) = tokio::io::duplex(1 << 16);
    let mut req = ExecRequest::new(argv);
    req.stdout = Some(Box::new(theirs));
    let code =
        vm.controller
            .exec_into_host(req)
            .await
            .map_err(|source| BenchError::Controller {
                what: "run a read pass in the guest",
                source,
            })?;
    let mut text = String::new();
    let _ = mine.read_to_string(&mut text).await;
    match ReadSample::parse(&text) {
        Some(sample) if code == 0 => Ok(sample),
        _ => Err(BenchError::Guest {
            message: format!("`uvm-agent probe read` exited {code}: {text}"),
        }),
    }
}

fn host_failed(e: uvm::HostError) -> BenchError {
    BenchError::Guest {
        message: format!("host device call: {}", uvm_util::error_chain(&e)),
    }
}

fn guest_failed(e: uvm::GuestError) -> BenchError {
    BenchError::Guest {
        message: format!("guest device call: {}", uvm_util::error_chain(&e)),
    }
}

fn median_ms(samples: &[Duration]) -> f64 {
    Summary::of_durations(samples).map_or(f64::NAN, |s| s.median)
}

/// `disk_hot_add_over_floor` and `share_hot_add_over_floor` targets: ours at most 1.2× the bare
/// QMP path (medians).
pub const TARGET_HOT_ADD_OVER_FLOOR: f64 = 1.2;

/// The median pass of each place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadReport {
    pub host: ReadSample,
    pub disk: ReadSample,
    pub share: ReadSample,
}

/// The device path's figures, from one run.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    pub disk_mounted: Summary,
    pub disk_floor: Summary,
    pub disk_seen: Summary,
    pub share_mounted: Summary,
    pub share_floor: Summary,
    pub reads: ReadReport,
    pub read_file_mib: u64,
}

impl DeviceSamples {
    /// Medians and ratios; an error for a measurement without samples.
    pub fn summarize(&self, read_file_mib: u64) -> Result<DeviceReport, BenchError> {
        let summary = |v: &[Duration], what: &'static str| {
            Summary::of_durations(v).ok_or(BenchError::NoSamples(what))
        };
        let median = |v: &[ReadSample], what: &'static str| {
            let iops = Summary::of(&v.iter().map(|r| r.random_4k_iops).collect::<Vec<_>>());
            let seq = Summary::of(&v.iter().map(|r| r.seq_mb_s).collect::<Vec<_>>());
            match (iops, seq) {
                (Some(i), Some(s)) => Ok(ReadSample {
                    random_4k_iops: i.median,
                    seq_mb_s: s.median,
                }),
                _ => Err(BenchError::NoSamples(what)),
            }
        };
        Ok(DeviceReport {
            disk_mounted: summary(&self.disk_mounted, "disk hot-add → mounted")?,
            disk_floor: summary(&self.disk_floor, "disk device_add → visible")?,
            disk_seen: summary(&self.disk_seen, "disk hot-add → seen by the agent")?,
            share_mounted: summary(&self.share_mounted, "share hot-add → mounted")?,
            share_floor: summary(&self.share_floor, "share device_add → bound")?,
            reads: ReadReport {
                host: median(&self.host_reads, "host reads")?,
                disk: median(&self.disk_reads, "disk reads")?,
                share: median(&self.share_reads, "share reads")?,
            },
            read_file_mib,
        })
    }
}

impl DeviceReport {
    pub fn disk_over_floor(&self) -> f64 {
        self.disk_mounted.median / self.disk_floor.median
    }

    pub fn share_over_floor(&self) -> f64 {
        self.share_mounted.median / self.share_floor.median
    }

    /// (name, target, value, met) for each target of the device path.
    pub fn targets(&self) -> [(&'static str, f64, f64, bool); 2] {
        let (disk, share) = (self.disk_over_floor(), self.share_over_floor());
        [
            (
                "disk_hot_add_over_floor",
                TARGET_HOT_ADD_OVER_FLOOR,
                disk,
                disk <= TARGET_HOT_ADD_OVER_FLOOR,
            ),
            (
                "share_hot_add_over_floor",
                TARGET_HOT_ADD_OVER_FLOOR,
                share,
                share <= TARGET_HOT_ADD_OVER_FLOOR,
            ),
        ]
    }

    /// The JSON object under the report's `devices` key.
    pub fn to_json(&self) -> serde_json::Value {
        let round = |v: f64, places: i32| {
            let m = 10f64.powi(places);
            (v * m).round() / m
        };
        let reads = |r: ReadSample, base: ReadSample| {
            serde_json::json!({
                "random_4k_iops": round(r.random_4k_iops, 0),
                "seq_mb_s": round(r.seq_mb_s, 1),
                "random_4k_over_host": round(r.random_4k_iops / base.random_4k_iops, 4),
                "seq_over_host": round(r.seq_mb_s / base.seq_mb_s, 4),
            })
        };
        let host = self.reads.host;
        serde_json::json!({
            "disk_hot_add_mounted_ms": self.disk_mounted,
            "disk_device_add_visible_ms": self.disk_floor,
            "disk_hot_add_over_floor": round(self.disk_over_floor(), 3),
            "disk_hot_add_seen_ms": self.disk_seen,
            "disk_seen_over_floor": round(self.disk_seen.median / self.disk_floor.median, 3),
            "share_hot_add_mounted_ms": self.share_mounted,
            "share_device_add_bound_ms": self.share_floor,
            "share_hot_add_over_floor": round(self.share_over_floor(), 3),
            "read_file_mib": self.read_file_mib,
            "host_reads": {
                "random_4k_iops": round(host.random_4k_iops, 0),
                "seq_mb_s": round(host.seq_mb_s, 1),
            },
            "disk_reads": reads(self.reads.disk, host),
            "share_reads": reads(self.reads.share, host),
        })
    }

    /// The table's section for the device path.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\ndisks and shares (ms)                    {:>5} {:>10} {:>10} {:>10}",
            "n", "median", "p90", "max"
        );
        for (name, s) in [
            ("disk hot-add → mounted", &self.disk_mounted),
            ("  QMP device_add → block device", &self.disk_floor),
            ("  hot-add → the agent has it (no mount)", &self.disk_seen),
            ("share hot-add → mounted", &self.share_mounted),
            ("  QMP device_add → virtiofs bound", &self.share_floor),
        ] {
            let _ = writeln!(
                t,
                "{name:<40} {:>5} {:>10.1} {:>10.1} {:>10.1}",
                s.n, s.median, s.p90, s.max
            );
        }
        let _ = writeln!(
            t,
            "  hot-add / floor: disk {:.3} (without the mount {:.3}), share {:.3}",
            self.disk_over_floor(),
            self.disk_seen.median / self.disk_floor.median,
            self.share_over_floor()
        );
        let h = self.reads.host;
        let _ = writeln!(
            t,
            "  reads of {} MiB, 4 KiB random IOPS / sequential MB/s: host {:.0} / {:.0}",
            self.read_file_mib, h.random_4k_iops, h.seq_mb_s
        );
        for (name, r) in [("disk", self.reads.disk), ("share", self.reads.share)] {
            let _ = writeln!(
                t,
                "    {name:<5} {:.0} ({:.4}× host) / {:.1} ({:.4}× host)",
                r.random_4k_iops,
                r.random_4k_iops / h.random_4k_iops,
                r.seq_mb_s,
                r.seq_mb_s / h.seq_mb_s
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_pass_line_parses_and_garbage_does_not() {
        assert_eq!(
            ReadSample::parse("random_4k_iops=12345 seq_mb_s=678.9 bytes=33554432\n"),
            Some(ReadSample {
                random_4k_iops: 12345.0,
                seq_mb_s: 678.9
            })
        );
        assert_eq!(ReadSample::parse("random_4k_iops=1\n"), None);
        assert_eq!(ReadSample::parse(""), None);
    }

    #[test]
    fn the_floor_waits_only_for_its_own_event() {
        assert!(is_disk_add("add block sdb -"));
        assert!(!is_disk_add("remove block sdb -"));
        assert!(!is_disk_add("add scsi - -"));
        assert!(is_virtiofs_bind("bind virtio - virtiofs"));
        assert!(!is_virtiofs_bind("bind virtio - virtio_blk"));
        assert!(!is_virtiofs_bind("add virtio - -"));
    }

    #[test]
    fn noise_has_the_length_asked_for_and_does_not_repeat_by_page() {
        let n = noise(3 * 4096 + 5);
        assert_eq!(n.len(), 3 * 4096 + 5);
        assert_ne!(n[..4096], n[4096..8192]);
    }

    #[test]
    fn a_report_gives_ratios_against_the_floor_and_the_host() {
        let s = |m: f64| Summary {
            n: 3,
            min: m,
            median: m,
            p90: m,
            max: m,
            mean: m,
        };
        let r = |i: f64, q: f64| ReadSample {
            random_4k_iops: i,
            seq_mb_s: q,
        };
        let report = DeviceReport {
            disk_mounted: s(60.0),
            disk_floor: s(50.0),
            disk_seen: s(55.0),
            share_mounted: s(300.0),
            share_floor: s(200.0),
            reads: ReadReport {
                host: r(100_000.0, 1000.0),
                disk: r(10_000.0, 500.0),
                share: r(5_000.0, 250.0),
            },
            read_file_mib: 32,
        };
        let v = report.to_json();
        assert_eq!(v["disk_hot_add_over_floor"], serde_json::json!(1.2));
        assert_eq!(v["disk_seen_over_floor"], serde_json::json!(1.1));
        assert_eq!(v["share_hot_add_over_floor"], serde_json::json!(1.5));
        assert_eq!(
            v["disk_reads"]["random_4k_over_host"],
            serde_json::json!(0.1)
        );
        assert_eq!(v["share_reads"]["seq_over_host"], serde_json::json!(0.25));
        let [disk, share] = report.targets();
        assert!(disk.3 && !share.3);
        assert!(report.table().contains("disk hot-add → mounted"));
    }
}
