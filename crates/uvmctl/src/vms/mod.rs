//! The long-lived VM commands: `create` starts a supervisor per VM (`uvm-supervisor`), the
//! others are clients of its API or readers of its record. `supervise` (hidden) is the supervisor
//! itself, so that one binary is all there is to install.

mod copy;
mod devices;
mod exec;
mod network;
mod show;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::io::Write as _;

use anyhow::{bail, Context as _};
use tonic::transport::Channel;
use tonic::{Code, Request};
use uvm_api::v1::vm_service_client::VmServiceClient;
use uvm_api::{v1, VM_ID_METADATA};
use uvm_supervisor::record::{LOG_FILE, SOCKET_FILE};
use uvm_supervisor::{names, read_record, Incomplete, VmRecord};

pub use copy::{cp, CpArgs};
pub use devices::{disk, share, DiskCommand, ShareCommand};
pub use exec::{exec, ExecArgs};
pub use network::{nic, pci, NicCommand, PciCommand};
pub use show::{events, inspect, ps, stats, EventsArgs, InspectArgs, PsArgs, StatsArgs};

use crate::VmArgs;

const CREATE_EXAMPLE: &str = "Examples:\n  uvmctl create --name web --memory 512 --start\n  uvmctl exec web -- uname -a\n  uvmctl create --name db --disk ./data.img:/data --share ./conf:/etc/app:ro --start";

/// `uvmctl create`.
#[derive(clap::Args, Debug)]
#[command(after_help = CREATE_EXAMPLE)]
pub struct CreateArgs {
    /// A name for the VM, unique on this host (other commands accept it instead of the id).
    #[arg(long)]
    name: Option<String>,
    /// Start the VM too (as `uvmctl start` would).
    #[arg(long)]
    start: bool,
    /// Print {"id", "name", "state", "api_socket"} as JSON instead of the id.
    #[arg(long)]
    json: bool,
    /// Remove the VM (as `rm -f` would) once process PID has ended: what tests use so that a
    /// test killed outright leaves no VM behind.
    #[arg(long, value_name = "PID", hide = true)]
    tether_to: Option<u32>,
    #[command(flatten)]
    vm: VmArgs,
}

/// `uvmctl supervise` (hidden): what `create` runs, detached.
#[derive(clap::Args, Debug)]
pub struct SuperviseArgs {
    #[arg(long)]
    id: String,
    #[arg(long, default_value = "")]
    name: String,
    /// The inherited pipe end to report readiness on.
    #[arg(long)]
    ready_fd: Option<i32>,
    /// The process whose end removes the VM.
    #[arg(long, value_name = "PID")]
    tether_to: Option<u32>,
    #[command(flatten)]
    vm: VmArgs,
}

/// One VM by name or id prefix.
#[derive(clap::Args, Debug)]
pub struct IdArg {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
}

/// `uvmctl stop`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl stop web --timeout 5")]
pub struct StopArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Seconds the guest gets to shut down cleanly (its agent flushes and powers off) before
    /// the VM is stopped by force; 0 stops it by force at once. Default: 10.
    #[arg(long, value_name = "S")]
    timeout: Option<u64>,
}

/// `uvmctl rm`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl rm -f web 3f2a")]
pub struct RmArgs {
    /// Stop a VM that is not stopped yet, instead of refusing.
    #[arg(short, long)]
    force: bool,
    /// The VMs: names, ids, or unique id prefixes.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// The VM `query` names under `root`: its id, directory and record.
pub(crate) struct Target {
    pub(crate) id: String,
    pub(crate) dir: PathBuf,
    pub(crate) record: VmRecord,
}

impl Target {
    pub(crate) fn find(root: &Path, query: &str) -> anyhow::Result<Target> {
        uvm_supervisor::check_root(root)?;
        let id = names::resolve(root, query)?;
        let dir = root.join(&id);
        let record = match read_record(&dir) {
            Ok(record) => record,
            Err(uvm_supervisor::RecordError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                bail!(
                    "VM {id} has no record: it is {}",
                    match uvm_supervisor::incomplete(&dir) {
                        Incomplete::Creating => "being created".to_string(),
                        Incomplete::Abandoned =>
                            format!("left by a `create` that died; `uvmctl rm {id}` cleans it"),
                    }
                )
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Target { id, dir, record })
    }

    /// Whether the supervisor recorded for this VM still runs.
    pub(crate) fn supervisor_alive(&self) -> bool {
        self.record
            .pids
            .get("supervisor")
            .is_some_and(|p| p.is_alive())
    }

    /// A client of the VM's API; an error naming the VM when its supervisor is gone.
    pub(crate) async fn client(&self) -> anyhow::Result<VmServiceClient<Channel>> {
        if !self.supervisor_alive() {
            bail!(
                "the supervisor of VM {} is not running (last recorded state: {}); `uvmctl rm {}` cleans it up",
                self.id,
                self.record.state,
                self.id
            );
        }
        Ok(uvm_api::connect_client(self.dir.join(SOCKET_FILE)).await?)
    }

    /// `message` as a request addressed to this VM (`uvm-vm-id`).
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = self.id.parse() {
            request.metadata_mut().insert(VM_ID_METADATA, value);
        }
        request
    }
}

/// A gRPC status as an error for the user: its message, which names what went wrong.
pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", status.message())
}

pub async fn create(args: CreateArgs, root: &Path) -> anyhow::Result<u8> {
    // What the supervisor would refuse, refused before it starts.
    args.vm.security_policy()?;
    let exe = std::env::current_exe().context("locating the uvmctl binary")?;
    let mut argv = vec![
        exe.into_os_string(),
        "--log".into(),
        "info".into(),
        "supervise".into(),
    ];
    argv.extend(args.vm.to_args().into_iter().map(Into::into));
    if let Some(pid) = args.tether_to {
        argv.extend(["--tether-to".into(), pid.to_string().into()]);
    }
    let command = uvm_supervisor::SupervisorCommand {
        argv,
        root: root.to_path_buf(),
        name: args.name.clone(),
    };
    let started = tokio::task::spawn_blocking(move || uvm_supervisor::start_supervisor(&command))
        .await
        .context("waiting for the supervisor")??;
    if args.start {
        let target = Target::find(root, &started.id)?;
        let mut client = target.client().await?;
        client
            .start(target.request(v1::StartRequest {}))
            .await
            .map_err(|s| {
                status_error(s).context(format!(
                    "VM {} was created but did not start (`uvmctl rm -f {}` removes it)",
                    started.id, started.id
                ))
            })?;
    }
    if args.json {
        let record = read_record(&started.dir)?;
        println!(
            "{}",
            serde_json::json!({
                "id": started.id,
                "name": args.name.unwrap_or_default(),
                "state": record.state,
                "api_socket": started.dir.join(SOCKET_FILE),
            })
        );
    } else {
        println!("{}", started.id);
    }
    Ok(0)
}

pub async fn supervise(args: SuperviseArgs, root: &Path) -> anyhow::Result<u8> {
    let ready = match args.ready_fd {
        Some(fd) => uvm_supervisor::Ready::from_inherited(fd)?,
        None => uvm_supervisor::Ready::none(),
    };
    let prepared = args
        .vm
        .image()
        .and_then(|image| Ok((image, args.vm.options()?)));
    let (image, options) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => {
            ready.fail(&format!("{e:#}"))?;
            return Err(e);
        }
    };
    let spec = uvm_supervisor::SupervisorSpec {
        root: root.to_path_buf(),
        id: args.id,
        name: args.name,
        options,
        image,
        config: args.vm.config_record(),
        tether: args.tether_to,
    };
    uvm_supervisor::run(spec, ready).await?;
    Ok(0)
}

pub async fn start(args: IdArg, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    target
        .client()
        .await?
        .start(target.request(v1::StartRequest {}))
        .await
        .map_err(status_error)?;
    println!("{}", target.id);
    Ok(0)
}

pub async fn stop(args: StopArgs, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let grace_period = args
        .timeout
        .map(|s| uvm_api::convert::duration(Duration::from_secs(s)));
    target
        .client()
        .await?
        .terminate(target.request(v1::TerminateRequest { grace_period }))
        .await
        .map_err(status_error)?;
    println!("{}", target.id);
    Ok(0)
}

pub async fn wait(args: IdArg, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let waited = target
        .client()
        .await?
        .wait(target.request(v1::WaitRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let reason = waited
        .status
        .and_then(|s| s.reason)
        .map(|r| r.description)
        .unwrap_or_default();
    println!("{reason}");
    Ok(0)
}

pub async fn rm(args: RmArgs, root: &Path) -> anyhow::Result<u8> {
    let mut failed = 0usize;
    for query in &args.ids {
        match rm_one(root, query, args.force).await {
            Ok(id) => println!("{id}"),
            Err(e) => {
                eprintln!("uvmctl: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} VMs not removed", args.ids.len());
    }
    Ok(0)
}

/// How long `rm` waits for the processes of a VM whose supervisor died to end by themselves.
const DEAD_SUPERVISOR_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

async fn rm_one(root: &Path, query: &str, force: bool) -> anyhow::Result<String> {
    uvm_supervisor::check_root(root)?;
    let id = names::resolve(root, query)?;
    if !root
        .join(&id)
        .join(uvm_supervisor::record::RECORD_FILE)
        .exists()
    {
        // No record: a create under way (refused), or one that died before its supervisor
        // wrote it (its directory and name claim go).
        uvm_supervisor::remove_abandoned(root, &id)?;
        return Ok(id);
    }
    let target = Target::find(root, query)?;
    if !target.supervisor_alive() {
        // Its VM's processes die with it (tethered: the kernel sends them SIGKILL), but a QEMU
        // tearing down its guest memory takes a moment to end: give them that, bounded.
        let still_running = || -> Vec<String> {
            target
                .record
                .pids
                .iter()
                .filter(|(_, p)| p.is_alive())
                .map(|(role, p)| format!("{role} {}", p.pid))
                .collect()
        };
        let deadline = std::time::Instant::now() + DEAD_SUPERVISOR_GRACE;
        let mut left = still_running();
        while !left.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            left = still_running();
        }
        if !left.is_empty() {
            bail!(
                "VM {}: its supervisor is gone but {} still run",
                target.id,
                left.join(", ")
            );
        }
        // The name first: a claim left pointing at a removed VM would block the name for good.
        if !target.record.name.is_empty() {
            names::release_name(root, &target.record.name, &target.id)?;
        }
        // What its supervisor never released: the VM's runtime directory and its cgroup.
        uvm_supervisor::sweep_dead_vm(&target.dir);
        std::fs::remove_dir_all(&target.dir)
            .with_context(|| format!("removing {}", target.dir.display()))?;
        return Ok(target.id);
    }
    let supervisor = target.record.pids.get("supervisor").cloned();
    let removed = target
        .client()
        .await?
        .remove(target.request(v1::RemoveRequest { force }))
        .await;
    match removed {
        Ok(_) => {}
        Err(s) if s.code() == Code::FailedPrecondition && !force => {
            bail!("{} (use `uvmctl rm -f`)", s.message())
        }
        Err(s) => return Err(status_error(s)),
    }
    // The supervisor exits right after answering: wait for it, so that nothing of the VM is left
    // when we return.
    if let Some(supervisor) = supervisor {
        let deadline = Instant::now() + Duration::from_secs(10);
        while supervisor.is_alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if supervisor.is_alive() {
            tracing::warn!(
                pid = supervisor.pid,
                "the supervisor has not exited yet; see {LOG_FILE}"
            );
        }
    }
    Ok(target.id)
}

/// `uvmctl logs`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  uvmctl logs web\n  uvmctl logs -f web\n  uvmctl logs --guest web"
)]
pub struct LogsArgs {
    /// Go on printing new output until the VM stops.
    #[arg(short, long)]
    follow: bool,
    /// The guest agent's forwarded log instead of the serial console.
    #[arg(long, conflicts_with = "console")]
    guest: bool,
    /// The VM's serial console (the default).
    #[arg(long)]
    console: bool,
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
}

pub async fn logs(args: LogsArgs, root: &Path) -> anyhow::Result<u8> {
    use tokio::io::AsyncWriteExt as _;
    let target = Target::find(root, &args.id)?;
    let mut request = v1::LogsRequest {
        source: 0,
        follow: args.follow,
    };
    request.set_source(if args.guest {
        v1::LogSource::Guest
    } else {
        v1::LogSource::Console
    });
    let mut stream = target
        .client()
        .await?
        .logs(target.request(request))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        stdout.write_all(&chunk.data).await?;
        stdout.flush().await?;
    }
    Ok(0)
}

pub async fn dump_stacks(args: IdArg, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let dump = target
        .client()
        .await?
        .dump_stacks(target.request(v1::DumpStacksRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    for (what, text) in [
        ("guest agent", dump.guest),
        ("supervisor threads", dump.supervisor),
        ("QEMU threads", dump.qemu),
    ] {
        // A closed pipe (`| head`) ends the output, not with a panic.
        if writeln!(out, "=== {what}\n{}", text.trim_end()).is_err() {
            break;
        }
    }
    Ok(0)
}

/// `uvmctl update`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl update web --memory 512 --cpu-limit 50")]
pub struct UpdateArgs {
    /// The guest's new memory size in MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// The vCPUs the VM should have (hot-added or removed; up to its --max-cpus).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// The most of its CPUs the VM may use, in percent (100 = no cap).
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..=100))]
    cpu_limit: Option<u32>,
    /// The VM's CPU weight against other VMs, 1–10000 (default 100; cgroup v2's cpu.weight).
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(1..=10000))]
    cpu_weight: Option<u32>,
    /// Move the VM into this host CPU group.
    #[arg(long, value_name = "G")]
    cpu_group: Option<String>,
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
}

pub async fn update(args: UpdateArgs, root: &Path) -> anyhow::Result<u8> {
    if args.memory.is_none()
        && args.cpus.is_none()
        && args.cpu_limit.is_none()
        && args.cpu_weight.is_none()
        && args.cpu_group.is_none()
    {
        bail!("nothing to update: give --memory, --cpus, --cpu-limit, --cpu-weight or --cpu-group");
    }
    let target = Target::find(root, &args.id)?;
    let mut client = target.client().await?;
    if let Some(mib) = args.memory {
        let applied = client
            .update_memory(target.request(v1::UpdateMemoryRequest {
                memory_bytes: mib.saturating_mul(1 << 20),
            }))
            .await
            .map_err(status_error)?
            .into_inner();
        println!("memory {} MiB", applied.memory_bytes >> 20);
    }
    if let Some(cpus) = args.cpus {
        client
            .update_cpus(target.request(v1::UpdateCpusRequest { cpus }))
            .await
            .map_err(status_error)?;
        println!("cpus {cpus}");
    }
    if args.cpu_limit.is_some() || args.cpu_weight.is_some() {
        client
            .update_cpu_limits(target.request(v1::UpdateCpuLimitsRequest {
                limit_per_10000: args.cpu_limit.map(|pct| pct * 100),
                weight: args.cpu_weight,
            }))
            .await
            .map_err(status_error)?;
        if let Some(pct) = args.cpu_limit {
            println!("cpu limit {pct}%");
        }
        if let Some(weight) = args.cpu_weight {
            println!("cpu weight {weight}");
        }
    }
    if let Some(group_id) = args.cpu_group {
        client
            .update_cpu_group(target.request(v1::UpdateCpuGroupRequest {
                group_id: group_id.clone(),
            }))
            .await
            .map_err(status_error)?;
        println!("cpu group {group_id}");
    }
    Ok(0)
}

/// `uvmctl policy`.
#[derive(clap::Subcommand, Debug)]
pub enum PolicyCommand {
    /// Add a Rego fragment (a module in a package of its own) to a running VM's security
    /// policy: its rules add to the policy's, never replace them.
    #[command(after_help = "Example:\n  uvmctl policy add-fragment web ./more-commands.rego")]
    AddFragment {
        /// The VM: its name, its id, or a unique prefix of its id.
        id: String,
        /// The fragment's file.
        file: PathBuf,
    },
}

pub async fn policy(command: PolicyCommand, root: &Path) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::AddFragment { id, file } => {
            let fragment = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the fragment {}", file.display()))?;
            let target = Target::find(root, &id)?;
            target
                .client()
                .await?
                .update_policy_fragment(
                    target.request(v1::UpdatePolicyFragmentRequest { fragment }),
                )
                .await
                .map_err(|s| {
                    status_error(s)
                        .context(format!("the fragment {} was not taken", file.display()))
                })?;
            println!("{}", target.id);
            Ok(0)
        }
    }
}
