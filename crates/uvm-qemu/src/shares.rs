//! Shared directories on QEMU: the share half of [`uvm::seams::HostDevices`].
//!
//! - **virtio-fs** where `virtiofsd` is installed: one virtiofsd per share, a child of the VM's
//!   supervisor thread like vhost-device-vsock (so it cannot outlive the VM), listening on
//!   `share-<id>.sock` in the runtime directory; QEMU's `vhost-user-fs-pci` (q35) or
//!   `vhost-user-fs-device` (microvm) carries the tag. Read-only shares are read-only twice:
//!   virtiofsd's `--readonly` on the host, `ro` in the guest.
//! - **9p** otherwise, served by QEMU itself (`-fsdev local` + `virtio-9p-pci`/`-device`),
//!   read-only with `readonly=on`. QEMU cannot create an fsdev at run time, so 9p shares exist
//!   only cold, given at create.
//!
//! On q35 every share sits behind a PCIe root port of its own (`-device pcie-root-port`,
//! cold-plugged at create: the root bus itself is not hot-pluggable), so that cold shares can be
//! removed and hot ones added: the VM gets one port per cold share plus
//! [`crate::QemuConfig::share_hotplug_ports`] spare ones, and ACPI PCI hotplug is turned off
//! so that the guest's native PCIe hotplug driver (pciehp) runs them. A hot-add is
//! `chardev-add` + `device_add`; a removal `device_del`, the wait for `DEVICE_DELETED` (which
//! pciehp delays by its 5 s attention-button grace), `chardev-remove`, then the virtiofsd ends.
//! microvm has no hotplug: its shares are cold only.
//!
//! virtiofsd runs with `--sandbox namespace` as root (a mount namespace whose root is the
//! shared directory, plus pid and network namespaces) and `--sandbox none` otherwise (it
//! cannot make namespaces unprivileged; it then relies on its own path resolution and runs with
//! the caller's rights), and with `--cache auto`: the guest caches metadata and data for a short
//! time and revalidates on open, so what the host writes shows up in the guest on the next
//! open (`always` would keep stale data; `never` costs a round trip per lookup).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::Signal;
use serde_json::{Map, Value};
use uvm::seams::{cold_share_tag, ShareConfig, ShareTransport, VmConfig};
use uvm::HostError;

use crate::cmdline::RuntimePaths;
use crate::hotplug::{refused, ChardevAdd, ChardevRemove, DeviceAdd, Qmp, Unplugged};
use crate::supervisor::{HelperLaunch, Shared, READY_DEADLINE};
use crate::vm::QemuVm;
use crate::Machine;

/// The longest tag virtio-fs carries (`struct virtio_fs_config`); 9p's limit is higher.
pub const MAX_TAG_BYTES: usize = 36;
/// How long a virtiofsd may take to exit once QEMU let go of it, before it is killed.
const HELPER_EXIT_GRACE: Duration = Duration::from_secs(2);
/// How long a killed virtiofsd may take to be reaped.
const HELPER_KILL_WAIT: Duration = Duration::from_secs(5);

/// One share the VM has (or will have from its start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShareEntry {
    pub tag: String,
    pub config: ShareConfig,
    pub transport: ShareTransport,
    /// Names its QEMU objects and files (`share<id>`, `share-<id>.sock`, …).
    pub id: u32,
    /// The index of its PCIe root port (q35); `None` on microvm.
    pub port: Option<usize>,
    /// A removal started and has not finished (the device may be on its way out).
    pub removing: bool,
}

/// The shares a VM gets at create, and its hotplug ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharePlan {
    pub cold: Vec<ShareEntry>,
    /// PCIe root ports to cold-plug (q35): one per cold share, then the spare ones.
    pub ports: usize,
}

/// What decides how shares are served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShareHost<'a> {
    pub machine: Machine,
    /// `virtiofsd`, when installed: shares are virtio-fs, else 9p.
    pub virtiofsd: Option<&'a Path>,
    pub spare_ports: u8,
}

impl ShareHost<'_> {
    /// The transport of every share this host serves.
    pub(crate) fn transport(&self) -> ShareTransport {
        match self.virtiofsd {
            Some(_) => ShareTransport::VirtioFs,
            None => ShareTransport::NineP,
        }
    }

    /// The cold shares of `config`, each with its tag, transport, id and port.
    pub(crate) fn plan(&self, config: &VmConfig) -> SharePlan {
        let q35 = self.machine == Machine::Q35;
        let cold: Vec<ShareEntry> = config
            .shares
            .iter()
            .enumerate()
            .map(|(i, spec)| ShareEntry {
                tag: cold_share_tag(i),
                config: spec.share.clone(),
                transport: self.transport(),
                id: u32::try_from(i).unwrap_or(u32::MAX),
                port: q35.then_some(i),
                removing: false,
            })
            .collect();
        let ports = if q35 {
            cold.len() + usize::from(self.spare_ports)
        } else {
            0
        };
        SharePlan { cold, ports }
    }
}

fn port_id(port: usize) -> String {
    format!("uvm-port{port}")
}
fn device_id(id: u32) -> String {
    format!("share{id}")
}
fn chardev_id(id: u32) -> String {
    format!("sharechr{id}")
}
fn socket_path(paths: &RuntimePaths, id: u32) -> PathBuf {
    paths.dir.join(format!("share-{id}.sock"))
}
fn log_path(paths: &RuntimePaths, id: u32) -> PathBuf {
    paths.dir.join(format!("virtiofsd-{id}.log"))
}

/// A value inside a QEMU option string, where a comma separates options (`,,` is a comma).
fn qemu_opt(value: &str) -> String {
    value.replace(',', ",,")
}

/// QEMU's switch from ACPI PCI hotplug to the guest's native PCIe hotplug (pciehp): with
/// QEMU's default ACPI hotplug the root ports would offer the guest no hotplug slot at all.
pub(crate) fn acpi_hotplug_off() -> [String; 2] {
    [
        "-global".to_owned(),
        "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".to_owned(),
    ]
}

/// QEMU's arguments for the root ports and the cold shares of `plan`.
pub(crate) fn qemu_args(plan: &SharePlan, machine: Machine, paths: &RuntimePaths) -> Vec<String> {
    let mut args = Vec::new();
    if plan.ports > 0 {
        args.extend(acpi_hotplug_off());
    }
    for port in 0..plan.ports {
        args.extend([
            "-device".to_owned(),
            format!("pcie-root-port,id={},chassis={}", port_id(port), port + 1),
        ]);
    }
    let suffix = match machine {
        Machine::Q35 => "pci",
        Machine::Microvm => "device",
    };
    for share in &plan.cold {
        let bus = share
            .port
            .map_or_else(String::new, |p| format!(",bus={}", port_id(p)));
        let device = device_id(share.id);
        let tag = qemu_opt(&share.tag);
        match share.transport {
            ShareTransport::VirtioFs => {
                let chardev = chardev_id(share.id);
                let socket = socket_path(paths, share.id);
                args.extend([
                    "-chardev".to_owned(),
                    format!("socket,id={chardev},path={}", socket.display()),
                    "-device".to_owned(),
                    format!("vhost-user-fs-{suffix},id={device},chardev={chardev},tag={tag}{bus}"),
                ]);
            }
            ShareTransport::NineP => {
                let fsdev = format!("sharefs{}", share.id);
                let readonly = if share.config.read_only {
                    ",readonly=on"
                } else {
                    ""
                };
                args.extend([
                    "-fsdev".to_owned(),
                    format!(
                        "local,id={fsdev},path={},security_model={}{readonly}",
                        qemu_opt(&share.config.host_path.to_string_lossy()),
                        nine_p_security_model(),
                    ),
                    "-device".to_owned(),
                    format!("virtio-9p-{suffix},id={device},fsdev={fsdev},mount_tag={tag}{bus}"),
                ]);
            }
        }
    }
    args
}

/// As root QEMU can give files the owners the guest asks for (`none`: passthrough, failures to
/// set ownership ignored); unprivileged it keeps the guest's view in extended attributes.
fn nine_p_security_model() -> &'static str {
    if rustix::process::geteuid().is_root() {
        "none"
    } else {
        "mapped-xattr"
    }
}

/// The virtiofsd serving `share` as helper `id`.
pub(crate) fn helper_launch(
    virtiofsd: &Path,
    id: u32,
    share: &ShareConfig,
    paths: &RuntimePaths,
) -> HelperLaunch {
    let socket = socket_path(paths, id);
    let sandbox = if rustix::process::geteuid().is_root() {
        "namespace"
    } else {
        "none"
    };
    let mut args = vec![
        "--shared-dir".to_owned(),
        share.host_path.display().to_string(),
        "--socket-path".to_owned(),
        socket.display().to_string(),
        "--sandbox".to_owned(),
        sandbox.to_owned(),
        "--cache".to_owned(),
        "auto".to_owned(),
    ];
    if share.read_only {
        args.push("--readonly".to_owned());
    }
    HelperLaunch {
        id,
        program: virtiofsd.to_path_buf(),
        args,
        log: log_path(paths, id),
        socket,
    }
}

fn invalid(what: &'static str, message: String) -> HostError {
    HostError::InvalidInput { what, message }
}

/// A tag QEMU and the guest can both carry.
pub(crate) fn check_tag(tag: &str) -> Result<(), HostError> {
    if tag.is_empty() || tag.len() > MAX_TAG_BYTES {
        return Err(invalid(
            "share tag",
            format!("{tag:?} must have 1 to {MAX_TAG_BYTES} bytes"),
        ));
    }
    if tag.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(invalid(
            "share tag",
            format!("{tag:?} contains a control character or a space"),
        ));
    }
    Ok(())
}

/// The host directory of a share: absolute, an existing directory, readable (and searchable),
/// and writable unless shared read-only.
pub(crate) fn check_host_dir(share: &ShareConfig) -> Result<(), HostError> {
    use rustix::fs::{access, Access};
    let path = &share.host_path;
    let shown = path.display();
    if !path.is_absolute() {
        return Err(invalid(
            "share host path",
            format!("{shown} is not absolute"),
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        invalid(
            "share host path",
            match e.kind() {
                std::io::ErrorKind::NotFound => format!("{shown} does not exist"),
                _ => format!("{shown} cannot be examined: {e}"),
            },
        )
    })?;
    if !meta.is_dir() {
        return Err(invalid(
            "share host path",
            format!("{shown} is not a directory"),
        ));
    }
    if access(path, Access::READ_OK | Access::EXEC_OK).is_err() {
        return Err(invalid(
            "share host path",
            format!("{shown} is not readable"),
        ));
    }
    if !share.read_only && access(path, Access::WRITE_OK).is_err() {
        return Err(invalid(
            "share host path",
            format!("{shown} is not writable (share it read-only)"),
        ));
    }
    Ok(())
}

/// The shares of one VM: what it has, and one operation at a time.
#[derive(Debug)]
pub(crate) struct Shares {
    machine: Machine,
    virtiofsd: Option<PathBuf>,
    ports: usize,
    book: Mutex<Book>,
    /// Adds and removals one at a time (they allocate ports and ids).
    ops: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Book {
    entries: BTreeMap<String, ShareEntry>,
    next_id: u32,
}

impl Shares {
    pub(crate) fn new(host: &ShareHost<'_>, plan: &SharePlan) -> Shares {
        let entries = plan
            .cold
            .iter()
            .map(|e| (e.tag.clone(), e.clone()))
            .collect();
        Shares {
            machine: host.machine,
            virtiofsd: host.virtiofsd.map(Path::to_path_buf),
            ports: plan.ports,
            book: Mutex::new(Book {
                entries,
                next_id: u32::try_from(plan.cold.len()).unwrap_or(u32::MAX),
            }),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // Single inserts and removes: consistent across a panic.
        uvm_util::lock(&self.book)
    }

    /// The transport of `tag`, or of a share hot-added now.
    pub(crate) fn transport(&self, tag: &str) -> ShareTransport {
        match self.book().entries.get(tag) {
            Some(e) => e.transport,
            None if self.virtiofsd.is_some() => ShareTransport::VirtioFs,
            None => ShareTransport::NineP,
        }
    }

    /// The shares the VM has now, by tag.
    pub(crate) fn entries(&self) -> Vec<ShareEntry> {
        self.book().entries.values().cloned().collect()
    }

    /// Hot-add `share` under `tag` to `vm` (q35, virtio-fs).
    pub(crate) async fn add(
        &self,
        vm: &QemuVm,
        tag: &str,
        share: &ShareConfig,
    ) -> Result<(), HostError> {
        const OP: &str = "add share";
        check_tag(tag)?;
        check_host_dir(share)?;
        let _one_at_a_time = self.ops.lock().await;
        if let Some(existing) = self.book().entries.get(tag) {
            if existing.removing {
                return Err(HostError::Failed {
                    operation: "add share",
                    source: format!("{tag:?} is being removed: finish its removal first").into(),
                });
            }
            if existing.config == *share {
                return Ok(());
            }
            return Err(invalid(
                "share tag",
                format!(
                    "{tag:?} already shares {}",
                    existing.config.host_path.display()
                ),
            ));
        }
        if self.machine == Machine::Microvm {
            return Err(HostError::Unsupported {
                backend: "qemu",
                operation: "hot-adding shares on microvm (no hotplug; give them at create)",
            });
        }
        let Some(virtiofsd) = self.virtiofsd.as_deref() else {
            return Err(HostError::Unsupported {
                backend: "qemu",
                operation: "hot-adding a 9p share (QEMU cannot add an fsdev at run time; \
                            install virtiofsd, or give the share at create)",
            });
        };
        let (id, port) = {
            let mut book = self.book();
            let used: Vec<usize> = book.entries.values().filter_map(|e| e.port).collect();
            let port = (0..self.ports).find(|p| !used.contains(p)).ok_or_else(|| {
                HostError::Failed {
                    operation: OP,
                    source: format!(
                        "no free PCIe hotplug port: all {} are in use (QemuConfig::share_hotplug_ports)",
                        self.ports
                    )
                    .into(),
                }
            })?;
            let id = book.next_id;
            book.next_id += 1;
            (id, port)
        };
        let entry = ShareEntry {
            tag: tag.to_owned(),
            config: share.clone(),
            transport: ShareTransport::VirtioFs,
            id,
            port: Some(port),
            removing: false,
        };
        let launch = helper_launch(virtiofsd, id, share, vm.paths());
        if let Err(e) = plug(vm, &entry, launch).await {
            // Whatever was made goes: the device (if QEMU took it), the chardev, the helper.
            if let Err(undo) = unplug_and_end(vm, &entry).await {
                tracing::warn!(tag, error = %uvm_util::error_chain(&undo), "undoing a failed share add failed");
            }
            return Err(e);
        }
        self.book().entries.insert(tag.to_owned(), entry);
        tracing::info!(tag, dir = %share.host_path.display(), "share added");
        Ok(())
    }

    /// Remove the share `tag` from `vm` (hot or cold) and end its virtiofsd. Harmless on an
    /// unknown tag; a failure leaves the share known, so a retry resumes.
    pub(crate) async fn remove(&self, vm: &QemuVm, tag: &str) -> Result<(), HostError> {
        let _one_at_a_time = self.ops.lock().await;
        let Some(entry) = self.book().entries.get(tag).cloned() else {
            return Ok(());
        };
        if entry.port.is_none() && entry.transport == ShareTransport::NineP {
            // microvm: QEMU serves the fsdev and cannot unplug the device.
            return Err(HostError::Unsupported {
                backend: "qemu",
                operation: "removing a 9p share from a running microvm VM",
            });
        }
        if let Some(e) = self.book().entries.get_mut(tag) {
            e.removing = true;
        }
        unplug_and_end(vm, &entry).await?;
        self.book().entries.remove(tag);
        tracing::info!(tag, "share removed");
        Ok(())
    }
}

/// Spawn the virtiofsd, connect QEMU to it and plug the device.
async fn plug(vm: &QemuVm, entry: &ShareEntry, launch: HelperLaunch) -> Result<(), HostError> {
    const OP: &str = "add share";
    let shared: &Arc<Shared> = vm.shared();
    let answer = shared.spawn_helper(launch).map_err(|e| e.into_host(OP))?;
    match tokio::time::timeout(READY_DEADLINE + HELPER_KILL_WAIT, answer).await {
        Ok(Ok(Ok(pid))) => tracing::debug!(tag = %entry.tag, pid, "virtiofsd ready"),
        Ok(Ok(Err(e))) => return Err(e.into_host(OP)),
        Ok(Err(_)) => return Err(crate::QemuError::SupervisorLost.into_host(OP)),
        Err(_) => {
            return Err(HostError::Timeout {
                operation: OP,
                after: READY_DEADLINE + HELPER_KILL_WAIT,
            })
        }
    }
    let socket = socket_path(vm.paths(), entry.id);
    let chardev = ChardevAdd::unix_client(chardev_id(entry.id), &socket);
    if let Qmp::Refused { class, desc } = vm.qmp_run(OP, &chardev).await? {
        return Err(refused(OP, "chardev-add", &class, &desc));
    }
    let mut props = Map::new();
    props.insert("chardev".into(), Value::from(chardev_id(entry.id)));
    props.insert("tag".into(), Value::from(entry.tag.clone()));
    if let Some(port) = entry.port {
        props.insert("bus".into(), Value::from(port_id(port)));
    }
    let device = DeviceAdd {
        driver: "vhost-user-fs-pci",
        id: device_id(entry.id),
        props,
    };
    if let Qmp::Refused { class, desc } = vm.qmp_run(OP, &device).await? {
        return Err(refused(OP, "device_add", &class, &desc));
    }
    Ok(())
}

/// Take the share's device out of the VM (when it can be: q35), its chardev, then end its
/// virtiofsd and remove its files. Every step is harmless when already done.
async fn unplug_and_end(vm: &QemuVm, entry: &ShareEntry) -> Result<(), HostError> {
    const OP: &str = "remove share";
    let mut qemu_gone = false;
    if entry.port.is_some() {
        let unplugged = vm
            .unplug(OP, &device_id(entry.id), crate::hotplug::UNPLUG_DEADLINE)
            .await?;
        qemu_gone = unplugged == Unplugged::QemuGone;
    }
    if entry.transport == ShareTransport::NineP {
        // QEMU serves it: nothing of ours runs. (The fsdev stays: QMP cannot delete it.)
        return Ok(());
    }
    // Without a port (microvm) the device stays and keeps its chardev: only the virtiofsd goes,
    // and the device serves nothing from then on.
    if !qemu_gone && entry.port.is_some() {
        let remove = ChardevRemove {
            id: chardev_id(entry.id),
        };
        match vm.qmp_run(OP, &remove).await {
            Ok(Qmp::Done(_)) | Err(HostError::Gone) => {}
            // Never added (a failed add), or removed by an earlier attempt.
            Ok(Qmp::Refused { desc, .. }) if desc.contains("not found") => {}
            Ok(Qmp::Refused { class, desc }) => {
                return Err(refused(OP, "chardev-remove", &class, &desc))
            }
            Err(e) => return Err(e),
        }
    }
    end_helper(vm, entry.id).await
}

/// End helper `id` (it exits by itself once QEMU let go of its socket; SIGTERM, then SIGKILL,
/// otherwise) and remove its socket, pid file and log.
async fn end_helper(vm: &QemuVm, id: u32) -> Result<(), HostError> {
    let shared = vm.shared();
    shared.retire_helper(id, Signal::TERM);
    if !shared.helper_reaped(id, HELPER_EXIT_GRACE).await {
        shared.retire_helper(id, Signal::KILL);
        if !shared.helper_reaped(id, HELPER_KILL_WAIT).await {
            return Err(HostError::Timeout {
                operation: "end virtiofsd",
                after: HELPER_EXIT_GRACE + HELPER_KILL_WAIT,
            });
        }
    }
    shared.forget_helper(id);
    let socket = socket_path(vm.paths(), id);
    let mut pid_file = socket.clone().into_os_string();
    pid_file.push(".pid");
    for file in [socket, PathBuf::from(pid_file), log_path(vm.paths(), id)] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(HostError::Io {
                    operation: "remove a virtiofsd file",
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uvm::seams::{ShareMount, ShareSpec};

    fn spec(path: &str, read_only: bool) -> ShareSpec {
        ShareSpec {
            share: ShareConfig {
                host_path: path.into(),
                read_only,
            },
            mount: ShareMount {
                guest_path: "/mnt".into(),
                read_only,
            },
        }
    }

    fn config(shares: Vec<ShareSpec>) -> VmConfig {
        VmConfig {
            shares,
            ..VmConfig::default()
        }
    }

    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    const VIRTIOFSD: &str = "/usr/bin/virtiofsd";

    #[test]
    fn q35_puts_each_cold_virtio_fs_share_behind_its_own_root_port() {
        let host = ShareHost {
            machine: Machine::Q35,
            virtiofsd: Some(Path::new(VIRTIOFSD)),
            spare_ports: 2,
        };
        let plan = host.plan(&config(vec![spec("/srv/a", false), spec("/srv/b", true)]));
        assert_eq!(plan.ports, 4);
        assert_eq!(plan.cold[1].tag, "uvm-cold-1");
        assert_eq!(plan.cold[1].port, Some(1));
        let paths = RuntimePaths::new(Path::new("/r/uvm-x"));
        let args = qemu_args(&plan, Machine::Q35, &paths);
        assert_eq!(
            values(&args, "-global"),
            ["ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
        );
        assert_eq!(
            values(&args, "-device"),
            [
                "pcie-root-port,id=uvm-port0,chassis=1",
                "pcie-root-port,id=uvm-port1,chassis=2",
                "pcie-root-port,id=uvm-port2,chassis=3",
                "pcie-root-port,id=uvm-port3,chassis=4",
                "vhost-user-fs-pci,id=share0,chardev=sharechr0,tag=uvm-cold-0,bus=uvm-port0",
                "vhost-user-fs-pci,id=share1,chardev=sharechr1,tag=uvm-cold-1,bus=uvm-port1",
            ]
        );
        assert_eq!(
            values(&args, "-chardev"),
            [
                "socket,id=sharechr0,path=/r/uvm-x/share-0.sock",
                "socket,id=sharechr1,path=/r/uvm-x/share-1.sock",
            ]
        );
    }

    #[test]
    fn without_virtiofsd_cold_shares_are_9p_read_only_where_asked() {
        let host = ShareHost {
            machine: Machine::Microvm,
            virtiofsd: None,
            spare_ports: 4,
        };
        let plan = host.plan(&config(vec![spec("/srv/a,b", true)]));
        assert_eq!(plan.ports, 0, "microvm has no PCIe");
        assert_eq!(plan.cold[0].transport, ShareTransport::NineP);
        let args = qemu_args(&plan, Machine::Microvm, &RuntimePaths::new(Path::new("/r")));
        assert!(values(&args, "-global").is_empty());
        let model = nine_p_security_model();
        assert_eq!(
            values(&args, "-fsdev"),
            [format!(
                "local,id=sharefs0,path=/srv/a,,b,security_model={model},readonly=on"
            )]
        );
        assert_eq!(
            values(&args, "-device"),
            ["virtio-9p-device,id=share0,fsdev=sharefs0,mount_tag=uvm-cold-0"]
        );
    }

    #[test]
    fn a_vm_without_shares_gets_only_the_spare_ports() {
        let host = ShareHost {
            machine: Machine::Q35,
            virtiofsd: Some(Path::new(VIRTIOFSD)),
            spare_ports: 0,
        };
        let plan = host.plan(&config(Vec::new()));
        assert_eq!(plan.ports, 0);
        assert!(qemu_args(&plan, Machine::Q35, &RuntimePaths::new(Path::new("/r"))).is_empty());
    }

    #[test]
    fn virtiofsd_serves_one_directory_read_only_when_asked() {
        let paths = RuntimePaths::new(Path::new("/r"));
        let share = ShareConfig {
            host_path: "/srv/data".into(),
            read_only: true,
        };
        let launch = helper_launch(Path::new(VIRTIOFSD), 7, &share, &paths);
        assert_eq!(launch.socket, Path::new("/r/share-7.sock"));
        assert_eq!(launch.log, Path::new("/r/virtiofsd-7.log"));
        let args = launch.args.join(" ");
        assert!(args.starts_with("--shared-dir /srv/data --socket-path /r/share-7.sock --sandbox "));
        assert!(args.ends_with("--cache auto --readonly"), "{args}");
        let writable = helper_launch(
            Path::new(VIRTIOFSD),
            7,
            &ShareConfig {
                read_only: false,
                ..share
            },
            &paths,
        );
        assert!(!writable.args.iter().any(|a| a == "--readonly"));
    }

    #[test]
    fn bad_tags_and_host_paths_are_invalid_input() {
        for tag in ["", "a b", &"t".repeat(MAX_TAG_BYTES + 1)] {
            assert!(
                matches!(
                    check_tag(tag),
                    Err(HostError::InvalidInput {
                        what: "share tag",
                        ..
                    })
                ),
                "{tag:?}"
            );
        }
        assert!(check_tag("uvm-cold-0").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let share = |p: &Path| ShareConfig {
            host_path: p.to_path_buf(),
            read_only: false,
        };
        let message = |p: &Path| match check_host_dir(&share(p)) {
            Err(HostError::InvalidInput {
                what: "share host path",
                message,
            }) => message,
            other => panic!("{} passed: {other:?}", p.display()),
        };
        assert!(message(&dir.path().join("missing")).ends_with("does not exist"));
        assert!(message(&file).ends_with("is not a directory"));
        assert!(message(Path::new("relative")).ends_with("is not absolute"));
        assert!(check_host_dir(&share(dir.path())).is_ok());
    }
}
