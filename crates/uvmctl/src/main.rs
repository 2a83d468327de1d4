//! `uvmctl`: boot a utility VM, run a command in it with stdio streamed, tear it down (`run`);
//! or keep VMs alive, each under its own supervisor, and use them from many commands (`create`,
//! `exec`, `ps`, `rm`, … in module `vms`).

mod vms;

use std::os::fd::AsFd as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::AbortOnDropHandle;
use uvm::seams::{
    DiskConfig, DiskMount, DiskSpec, ExecRequest, ShareConfig, ShareMount, ShareSpec,
};
use uvm_vm::{image_with, BootTimings, Vm, VmOptions};
use uvmctl::mount_spec::{absolute_host_path, parse_mount_spec, MountSpec};

#[derive(Parser, Debug)]
#[command(
    name = "uvmctl",
    version,
    about = "Utility VMs: create, start, use, tear down."
)]
struct Cli {
    /// Log level for uvmctl's own logs (also RUST_LOG).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// Where long-lived VMs keep their state (default: $UVMCTL_ROOT, else /run/uvmctl for root,
    /// $XDG_RUNTIME_DIR/uvmctl for others). For the long-lived VM commands only.
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Boot a VM, run CMD in it, tear the VM down; exits with CMD's exit code.
    Run(RunArgs),
    /// Guest image commands.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Benchmark real VMs: raw-QEMU floor vs start, exec, terminate, memory, density.
    Bench(uvm_bench::cli::BenchArgs),
    /// Print the exact vhost-device-vsock and QEMU command lines `run` would start, without
    /// starting anything (to run or profile a VM by hand).
    CommandLine(CommandLineArgs),
    /// Create a long-lived VM under its own supervisor; prints its id.
    Create(vms::CreateArgs),
    /// Start a created VM.
    #[command(after_help = "Example:\n  uvmctl start web")]
    Start(vms::IdArg),
    /// Run CMD in a running VM; exits with CMD's exit code.
    Exec(vms::ExecArgs),
    /// List VMs (running ones; -a for all).
    Ps(vms::PsArgs),
    /// Show everything known about a VM.
    Inspect(vms::InspectArgs),
    /// Show a running VM's resource use, as the host and the guest see it.
    Stats(vms::StatsArgs),
    /// Stop a VM (it stays listed until `rm`).
    Stop(vms::StopArgs),
    /// Wait until a VM has stopped; prints why it stopped.
    #[command(after_help = "Example:\n  uvmctl wait web")]
    Wait(vms::IdArg),
    /// Remove VMs (a running one only with -f).
    Rm(vms::RmArgs),
    /// Print a VM's serial console (or, with --guest, its agent's log).
    Logs(vms::LogsArgs),
    /// Print a VM's events (transitions, execs) with their sequence numbers.
    Events(vms::EventsArgs),
    /// Copy a file into a running VM (SRC ID:DST) or out of it (ID:SRC DST).
    Cp(vms::CpArgs),
    /// Attach, detach and list a running VM's disks.
    Disk {
        #[command(subcommand)]
        command: vms::DiskCommand,
    },
    /// Share host directories into a running VM, stop sharing them, list them.
    Share {
        #[command(subcommand)]
        command: vms::ShareCommand,
    },
    /// Add NICs to a running VM from a network namespace, remove them, list them.
    Nic {
        #[command(subcommand)]
        command: vms::NicCommand,
    },
    /// Assign host PCI devices (VFIO) to a running VM, take them out, list them.
    Pci {
        #[command(subcommand)]
        command: vms::PciCommand,
    },
    /// Change a running VM's memory, vCPUs, CPU cap or CPU group.
    Update(vms::UpdateArgs),
    /// Add to a running VM's security policy (given at create with --policy).
    Policy {
        #[command(subcommand)]
        command: vms::PolicyCommand,
    },
    /// Make, change, remove and list CPU groups: caps (and cpusets) shared by the VMs in them.
    CpuGroup {
        #[command(subcommand)]
        command: uvmctl::cpu_groups::CpuGroupCommand,
    },
    /// What a running VM's guest agent, supervisor and QEMU threads are doing.
    #[command(after_help = "Example:\n  uvmctl dump-stacks web")]
    DumpStacks(vms::IdArg),
    /// The supervisor of one VM (what `create` starts).
    #[command(hide = true)]
    Supervise(vms::SuperviseArgs),
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Build the guest image (kernel + initramfs with the agent) unless cached; prints its paths.
    Build {
        /// Rebuild even when a cached image with the same content hash exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MachineArg {
    Q35,
    Microvm,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum KernelArg {
    Ours,
    Debian,
}

/// What the VM is: shared by `run` and `command-line`.
#[derive(clap::Args, Debug)]
struct VmArgs {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// The most memory the guest may grow to with `update --memory`, in MiB (q35: a virtio-mem
    /// device for the rest; memory and maximum multiples of 2). Without it the memory can only
    /// shrink (the balloon).
    #[arg(long, value_name = "MIB")]
    max_memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The most vCPUs `update --cpus` may give the VM (q35: hot-added and removed).
    #[arg(long, value_name = "N")]
    max_cpus: Option<u32>,
    /// Accelerator: KVM only where the CPU advertises vmx/svm (auto), or forced.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
    /// Machine model: q35 (PCIe, hotplug) or microvm (fastest boot, no hotplug).
    #[arg(long, value_enum, default_value_t = MachineArg::Q35)]
    machine: MachineArg,
    /// Guest kernel: ours (built by scripts/build-kernel.sh) or Debian's; default: ours when
    /// built (or $UVM_KERNEL).
    #[arg(long, value_enum)]
    kernel: Option<KernelArg>,
    /// More guest kernel arguments, appended to the command line uvmctl gives the kernel.
    #[arg(long, value_name = "ARGS", default_value = "")]
    append: String,
    /// A disk image (raw ext4, xfs or vfat) attached at create and mounted at GUEST_PATH when
    /// the VM starts; `:ro` attaches it read-only. Repeatable. Works on q35 and microvm.
    #[arg(long = "disk", value_name = "HOST_PATH:GUEST_PATH[:ro]", value_parser = parse_mount_spec)]
    disks: Vec<MountSpec>,
    /// A host directory shared at create and mounted at GUEST_PATH when the VM starts; `:ro`
    /// shares it read-only (enforced on the host and in the guest). Repeatable.
    #[arg(long = "share", value_name = "HOST_DIR:GUEST_PATH[:ro]", value_parser = parse_mount_spec)]
    shares: Vec<MountSpec>,
    /// A Rego security policy (package uvmctl.policy) the guest agent enforces on every request
    /// from start on: examples/policies/, docs/policy.md. Compiled before the VM boots.
    #[arg(long, value_name = "FILE.rego", value_parser = absolute_host_path)]
    policy: Option<std::path::PathBuf>,
    /// Networking: none (the default), or user — user-mode networking inside QEMU (outbound
    /// connectivity, a resolver, `--publish`), no host networking needed.
    #[arg(long, value_enum, default_value_t = NetArg::None)]
    net: NetArg,
    /// One NIC per interface of this network namespace (made by someone else: a CNI plugin,
    /// `ip netns add` + a veth), with its MAC, addresses, routes and MTU. Needs root.
    #[arg(long, value_name = "PATH", value_parser = absolute_host_path, conflicts_with = "net")]
    netns: Option<std::path::PathBuf>,
    /// Publish a guest port on the host (`--net user` only): [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp],
    /// on 127.0.0.1 unless HOST_IP says otherwise. Repeatable.
    #[arg(long, value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT[/PROTO]", value_parser = parse_publish)]
    publish: Vec<uvm::seams::PortPublish>,
    /// A nameserver for the guest's /etc/resolv.conf (default with --net user: QEMU's resolver,
    /// 10.0.2.3). Repeatable.
    #[arg(long, value_name = "IP")]
    dns: Vec<std::net::IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum NetArg {
    None,
    User,
}

fn parse_publish(s: &str) -> Result<uvm::seams::PortPublish, String> {
    s.parse()
}

impl VmArgs {
    fn image(&self) -> anyhow::Result<uvm_image::Image> {
        let kernel = self.kernel.map(|k| match k {
            KernelArg::Ours => uvm_image::KernelFlavor::Ours,
            KernelArg::Debian => uvm_image::KernelFlavor::Debian,
        });
        image_with(kernel).context("preparing the guest image")
    }

    /// These options as arguments again (for the supervisor `create` starts).
    fn to_args(&self) -> Vec<String> {
        let name = |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| {
            v().map(|p| p.get_name().to_owned()).unwrap_or_default()
        };
        let mut args = vec![
            "--memory".into(),
            self.memory.to_string(),
            "--cpus".into(),
            self.cpus.to_string(),
            "--accel".into(),
            name(&|| self.accel.to_possible_value()),
            "--machine".into(),
            name(&|| self.machine.to_possible_value()),
            format!("--append={}", self.append),
        ];
        if let Some(max) = self.max_memory {
            args.push(format!("--max-memory={max}"));
        }
        if let Some(max) = self.max_cpus {
            args.push(format!("--max-cpus={max}"));
        }
        if let Some(kernel) = self.kernel {
            args.push("--kernel".into());
            args.push(name(&|| kernel.to_possible_value()));
        }
        // The host paths are absolute already (made so when parsed).
        args.extend(self.disks.iter().map(|d| format!("--disk={}", d.to_arg())));
        args.extend(
            self.shares
                .iter()
                .map(|s| format!("--share={}", s.to_arg())),
        );
        if let Some(policy) = &self.policy {
            args.push(format!("--policy={}", policy.display()));
        }
        if self.net == NetArg::User {
            args.push("--net=user".into());
        }
        if let Some(netns) = &self.netns {
            args.push(format!("--netns={}", netns.display()));
        }
        args.extend(self.publish.iter().map(|p| format!("--publish={p}")));
        args.extend(self.dns.iter().map(|d| format!("--dns={d}")));
        args
    }

    /// The network the VM starts with; `--publish` without `--net user` is refused.
    fn network(&self) -> anyhow::Result<uvm::seams::NetworkConfig> {
        use uvm::seams::NetworkMode;
        let mode = match (&self.netns, self.net) {
            (Some(path), _) => NetworkMode::Namespace { path: path.clone() },
            (None, NetArg::User) => NetworkMode::User {
                publish: self.publish.clone(),
            },
            (None, NetArg::None) => NetworkMode::None,
        };
        if !self.publish.is_empty() && !matches!(mode, NetworkMode::User { .. }) {
            anyhow::bail!(
                "--publish needs --net user (a namespace's ports are the namespace's to publish)"
            );
        }
        Ok(uvm::seams::NetworkConfig {
            mode,
            dns: uvm::seams::DnsConfig {
                nameservers: self.dns.clone(),
                ..uvm::seams::DnsConfig::default()
            },
        })
    }

    /// The policy file's text, compiled: an error naming the file and the compiler's message.
    fn security_policy(&self) -> anyhow::Result<Option<uvm::seams::SecurityPolicy>> {
        let Some(path) = &self.policy else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the policy {}", path.display()))?;
        uvm_policy::Policy::compile(&text)
            .with_context(|| format!("the policy {} was not taken", path.display()))?;
        Ok(Some(uvm::seams::SecurityPolicy(text)))
    }

    /// What the VM record says it was created with.
    fn config_record(&self) -> uvm_supervisor::ConfigRecord {
        let name = |v: Option<clap::builder::PossibleValue>| {
            v.map(|p| p.get_name().to_owned()).unwrap_or_default()
        };
        let backend = [
            ("machine", name(self.machine.to_possible_value())),
            ("accel", name(self.accel.to_possible_value())),
            (
                "kernel",
                self.kernel
                    .map(|k| name(k.to_possible_value()))
                    .unwrap_or_else(|| "default".into()),
            ),
            ("append", self.append.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let record = |m: &MountSpec| uvm_supervisor::MountSpecRecord {
            host_path: m.host_path.clone(),
            guest_path: m.guest_path.clone(),
            read_only: m.read_only,
        };
        uvm_supervisor::ConfigRecord {
            memory_mib: self.memory,
            max_memory_mib: self.max_memory,
            cpus: self.cpus,
            max_cpus: self.max_cpus,
            backend,
            disks: self.disks.iter().map(record).collect(),
            shares: self.shares.iter().map(record).collect(),
            policy: self.policy.clone(),
            network: uvm_supervisor::NetworkRecord {
                mode: match (&self.netns, self.net) {
                    (Some(_), _) => "netns",
                    (None, NetArg::User) => "user",
                    (None, NetArg::None) => "none",
                }
                .into(),
                netns: self.netns.clone(),
                publish: self.publish.iter().map(ToString::to_string).collect(),
                dns: self.dns.iter().map(ToString::to_string).collect(),
            },
        }
    }

    /// The VM's options, the policy read and compiled.
    fn options(&self) -> anyhow::Result<VmOptions> {
        Ok(VmOptions {
            memory_mib: self.memory,
            max_memory_mib: self.max_memory,
            cpus: self.cpus,
            max_cpus: self.max_cpus,
            accel: match self.accel {
                AccelArg::Auto => uvm_vm::Accel::Auto,
                AccelArg::Kvm => uvm_vm::Accel::Kvm,
                AccelArg::Tcg => uvm_vm::Accel::Tcg,
            },
            machine: match self.machine {
                MachineArg::Q35 => uvm_vm::Machine::Q35,
                MachineArg::Microvm => uvm_vm::Machine::Microvm,
            },
            extra_cmdline: self.append.clone(),
            disks: self.disks.iter().map(disk_spec).collect(),
            shares: self.shares.iter().map(share_spec).collect(),
            security_policy: self.security_policy()?,
            network: self.network()?,
            ..VmOptions::default()
        })
    }
}

/// A `--disk`: a raw image, its filesystem probed by the guest; `:ro` on both sides.
fn disk_spec(m: &MountSpec) -> DiskSpec {
    DiskSpec {
        disk: DiskConfig {
            read_only: m.read_only,
            ..DiskConfig::raw(&m.host_path)
        },
        mount: DiskMount {
            read_only: m.read_only,
            ..DiskMount::at(&m.guest_path)
        },
    }
}

/// A `--share`: `:ro` on both sides.
fn share_spec(m: &MountSpec) -> ShareSpec {
    ShareSpec {
        share: ShareConfig {
            host_path: m.host_path.clone(),
            read_only: m.read_only,
        },
        mount: ShareMount {
            guest_path: m.guest_path.clone(),
            read_only: m.read_only,
        },
    }
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Print each boot phase and the total to stderr.
    #[arg(long)]
    timings: bool,
    /// Run CMD on a pseudo-terminal in the guest (stderr merged into stdout).
    #[arg(short = 't', long)]
    tty: bool,
    /// Set an environment variable for CMD (repeatable); CMD otherwise gets only a default
    /// PATH.
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<String>,
    /// CMD's working directory in the guest (default /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Command and arguments to run in the guest.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct CommandLineArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// The directory the VM's sockets and logs would be in (it is neither created nor used).
    #[arg(long, value_name = "DIR")]
    runtime_dir: std::path::PathBuf,
    /// Print one JSON object {"qemu": [...], "vhost_vsock": [...]} instead of shell lines.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A supervisor's stderr is its log file: colours only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("uvmctl: cannot start the async runtime: {e}");
            return ExitCode::from(125);
        }
    };
    // Directories a killed uvmctl left behind (its VMs' processes died with it).
    if matches!(cli.command, Action::Run(_) | Action::Bench(_)) {
        uvm_vm::sweep_stale_runtime_dirs(&VmOptions::default());
    }
    let one_shot = matches!(
        cli.command,
        Action::Run(_)
            | Action::Image { .. }
            | Action::Bench(_)
            | Action::CommandLine(_)
            | Action::CpuGroup { .. }
    );
    if one_shot && cli.root.is_some() {
        eprintln!("uvmctl: --root applies to the long-lived VM commands (create, exec, ps, …), not to this one");
        return ExitCode::from(2);
    }
    let result = runtime.block_on(async {
        let root = || uvm_supervisor::resolve_root(cli.root.as_deref());
        match cli.command {
            Action::Run(args) => run(args).await,
            Action::Image {
                command: ImageCommand::Build { force },
            } => image_build(force),
            Action::Bench(args) => uvm_bench::cli::run(args).await.map_err(anyhow::Error::new),
            Action::CommandLine(args) => command_line(&args),
            Action::Create(args) => vms::create(args, &root()?).await,
            Action::Start(args) => vms::start(args, &root()?).await,
            Action::Exec(args) => vms::exec(args, &root()?).await,
            Action::Ps(args) => vms::ps(args, &root()?),
            Action::Inspect(args) => vms::inspect(args, &root()?).await,
            Action::Stats(args) => vms::stats(args, &root()?).await,
            Action::Stop(args) => vms::stop(args, &root()?).await,
            Action::Wait(args) => vms::wait(args, &root()?).await,
            Action::Rm(args) => vms::rm(args, &root()?).await,
            Action::Logs(args) => vms::logs(args, &root()?).await,
            Action::Events(args) => vms::events(args, &root()?).await,
            Action::Cp(args) => vms::cp(args, &root()?).await,
            Action::Update(args) => vms::update(args, &root()?).await,
            Action::Policy { command } => vms::policy(command, &root()?).await,
            Action::Disk { command } => vms::disk(command, &root()?).await,
            Action::Share { command } => vms::share(command, &root()?).await,
            Action::Nic { command } => vms::nic(command, &root()?).await,
            Action::Pci { command } => vms::pci(command, &root()?).await,
            Action::CpuGroup { command } => uvmctl::cpu_groups::run(command),
            Action::DumpStacks(args) => vms::dump_stacks(args, &root()?).await,
            Action::Supervise(args) => vms::supervise(args, &root()?).await,
        }
    });
    // Do not wait for a blocked stdin reader thread: everything that matters has been torn down.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("uvmctl: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn image_build(force: bool) -> anyhow::Result<u8> {
    let spec = uvm_image::ImageSpec::from_env().context("locating the image inputs")?;
    let image = if force {
        uvm_image::build_image(&spec)
    } else {
        uvm_image::ensure_image(&spec)
    }
    .context("building the guest image")?;
    println!("id        {}", image.id);
    println!("kernel    {}", image.kernel.display());
    println!("initramfs {}", image.initramfs.display());
    Ok(0)
}

/// Exit code for a teardown caused by a signal, as shells report it.
fn signal_exit(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(128)
}

/// `KEY=VALUE` with a non-empty KEY (the agent refuses anything else; say so before booting).
fn parse_env(entry: &str) -> Result<String, String> {
    match entry.split_once('=') {
        Some((key, _)) if !key.is_empty() && !entry.contains('\0') => Ok(entry.to_owned()),
        _ => Err(format!("{entry:?} is not KEY=VALUE")),
    }
}

fn command_line(args: &CommandLineArgs) -> anyhow::Result<u8> {
    let image = args.vm.image()?;
    let lines = uvm_vm::command_lines(&image, &args.vm.options()?, &args.runtime_dir)?;
    if args.json {
        println!("{}", serde_json::to_string(&lines)?);
    } else {
        for line in [&lines.vhost_vsock, &lines.qemu] {
            println!("{}", shlex::try_join(line.iter().map(String::as_str))?);
        }
    }
    Ok(0)
}

async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let image = args.vm.image()?;
    let vm = Vm::new(&image, args.vm.options()?);
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let started = Instant::now();
    let work = async {
        let timings = vm.boot().await?;
        if args.timings {
            print_timings(&timings, started.elapsed());
        }
        let mut request = ExecRequest::new(args.cmd.clone());
        request.terminal = args.tty;
        request.env.clone_from(&args.env);
        request.cwd.clone_from(&args.workdir);
        request.stdin = Some(Box::new(tokio::io::stdin()));
        request.stdout = Some(Box::new(tokio::io::stdout()));
        if !args.tty {
            request.stderr = Some(Box::new(tokio::io::stderr()));
        }
        // A terminal: ours goes raw (the guest's echoes, edits lines and turns Ctrl-C into
        // SIGINT for its process) and the guest's follows our window size. Only now, after
        // the boot: until here Ctrl-C must still stop uvmctl.
        let _raw = args.tty.then(enter_raw_mode).flatten();
        let resizable = vm
            .controller
            .guest_info()
            .is_some_and(|g| g.capabilities.terminal_resize());
        let _resizer = match (args.tty, resizable) {
            (true, true) => follow_window_size(&mut request),
            (true, false) => {
                tracing::warn!("the guest's agent cannot resize terminals: it stays 80x24");
                None
            }
            (false, _) => None,
        };
        vm.controller.exec_into_host(request).await
    };
    let outcome = tokio::select! {
        r = work => Outcome::Done(r),
        _ = sigint.recv() => Outcome::Signalled(2),
        _ = sigterm.recv() => Outcome::Signalled(15),
    };

    let t_down = Instant::now();
    let teardown = vm.controller.terminate_vm().await;
    if args.timings {
        eprintln!("uvmctl: teardown        {:>8.1} ms", ms(t_down.elapsed()));
    }
    match (outcome, teardown) {
        (Outcome::Signalled(sig), t) => {
            if let Err(e) = t {
                eprintln!("uvmctl: teardown after signal failed: {e}");
            }
            Ok(signal_exit(sig))
        }
        (Outcome::Done(Ok(code)), Ok(())) => Ok(u8::try_from(code.rem_euclid(256)).unwrap_or(1)),
        (Outcome::Done(Err(e)), t) => {
            let torn_down = match t {
                Ok(()) => true,
                Err(te) => {
                    eprintln!("uvmctl: teardown failed too: {te}");
                    false
                }
            };
            // The guest refusing to start CMD (no such program, a bad directory) is the guest
            // answering, not failing: its log would only be noise then.
            let refusal = exec_refusal(&e);
            let recent = vm.guest.recent_log();
            if matches!(refusal, None | Some(uvm::Rejection::Other)) && !recent.is_empty() {
                eprintln!("uvmctl: last guest log lines:");
                for line in recent.iter().rev().take(10).rev() {
                    eprintln!("  {line}");
                }
            }
            // As shells and `docker run` say it: 127 the program was not found, 126 it could
            // not be executed; 125 (uvmctl's own failure) for everything else, and always
            // when the VM could not be torn down.
            let code = match refusal {
                Some(uvm::Rejection::NotFound) if torn_down => 127,
                Some(uvm::Rejection::PermissionDenied) if torn_down => 126,
                _ => return Err(anyhow::Error::new(e).context("running the command in the VM")),
            };
            eprintln!("uvmctl: {}", uvm_util::error_chain(&e));
            Ok(code)
        }
        (Outcome::Done(Ok(_)), Err(e)) => Err(anyhow::Error::new(e).context("tearing the VM down")),
    }
}

/// How the guest refused to start the command, if that is what `e` is (a refusal of a later
/// call, e.g. a process the agent no longer knows, is not the command's fault).
fn exec_refusal(e: &uvm::ControllerError) -> Option<uvm::Rejection> {
    match e {
        uvm::ControllerError::Guest {
            source:
                uvm::GuestError::Rejected {
                    request: uvm::GuestRequest::ExecProcess,
                    kind,
                    ..
                },
            ..
        } => Some(*kind),
        _ => None,
    }
}

/// Stdin in raw mode, when it is a terminal; a failure only costs the local echo.
fn enter_raw_mode() -> Option<uvmctl::terminal::RawMode> {
    uvmctl::terminal::RawMode::enter(std::io::stdin().as_fd()).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot put the terminal into raw mode");
        None
    })
}

/// Our window size: stdout's terminal, else stdin's.
fn local_size() -> Option<uvm::seams::TerminalSize> {
    uvmctl::terminal::size_of(std::io::stdout().as_fd())
        .or_else(|| uvmctl::terminal::size_of(std::io::stdin().as_fd()))
}

/// Gives `request` our window size and sends it again on every SIGWINCH until the returned task
/// is dropped; nothing when our size is unknown (the guest's terminal stays 80×24).
fn follow_window_size(request: &mut ExecRequest) -> Option<AbortOnDropHandle<()>> {
    // The handler first, then the size: a resize in between is not lost.
    let mut winch = match signal(SignalKind::window_change()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot follow the window size");
            return None;
        }
    };
    let (sizes, rx) = tokio::sync::watch::channel(local_size()?);
    request.terminal_size = Some(rx);
    Some(AbortOnDropHandle::new(tokio::spawn(async move {
        while winch.recv().await.is_some() {
            if let Some(size) = local_size() {
                if sizes.send(size).is_err() {
                    return;
                }
            }
        }
    })))
}

enum Outcome {
    Done(Result<i32, uvm::ControllerError>),
    Signalled(i32),
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_timings(t: &BootTimings, total: Duration) {
    eprintln!("uvmctl: create          {:>8.1} ms", ms(t.create));
    eprintln!("uvmctl: prepare         {:>8.1} ms", ms(t.prepare));
    eprintln!(
        "uvmctl: spawn→announce  {:>8.1} ms  (guest: kernel→init {:.1} ms, init→ready {:.1} ms)",
        ms(t.to_announce),
        ms(t.guest_kernel_to_init),
        ms(t.guest_init_to_ready)
    );
    eprintln!(
        "uvmctl: handshake       {:>8.1} ms  (connect {:.1} ms, Handshake RPC {:.1} ms)",
        ms(t.handshake),
        ms(t.handshake_connect),
        ms(t.handshake.saturating_sub(t.handshake_connect))
    );
    eprintln!("uvmctl: start_vm total  {:>8.1} ms", ms(t.start));
    eprintln!("uvmctl: ready after     {:>8.1} ms", ms(total));
}
