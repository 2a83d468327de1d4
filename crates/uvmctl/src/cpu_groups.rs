//! `uvmctl cpu-group create|update|rm|ls`: CPU groups on this host (`uvm_cgroup::CpuGroup`),
//! which `update ID --cpu-group NAME` moves a VM into. They are cgroups, not VMs: no
//! supervisor is involved, and they need the rights the VMs' cgroups need (root).

use anyhow::Context as _;
use clap::Subcommand;
use uvm_cgroup::{CpuGroup, GroupSettings, Layout};

#[derive(Subcommand, Debug)]
pub enum CpuGroupCommand {
    /// Make a CPU group: its VMs together use at most --cap percent of one host CPU (150: one
    /// and a half), on --cpus only.
    #[command(
        after_help = "Examples:\n  uvmctl cpu-group create batch --cap 150\n  uvmctl cpu-group create pinned --cpus 0-1"
    )]
    Create(GroupArgs),
    /// Change a group's cap or CPUs (what is not given stays).
    #[command(after_help = "Example:\n  uvmctl cpu-group update batch --cap 50")]
    Update(GroupArgs),
    /// Remove a group; refused while a VM is in it.
    #[command(after_help = "Example:\n  uvmctl cpu-group rm batch")]
    Rm {
        /// The group.
        name: String,
    },
    /// List the groups with their cap, CPUs and VMs.
    #[command(after_help = "Example:\n  uvmctl cpu-group ls --json")]
    Ls {
        /// One JSON array on stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    /// The group's name.
    name: String,
    /// The most CPU its VMs together may use, in percent of one host CPU.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..))]
    cap: Option<u32>,
    /// The host CPUs its VMs may run on (a cpuset list: `0-1`, `0,2`).
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
}

impl GroupArgs {
    fn settings(&self) -> GroupSettings {
        GroupSettings {
            cap_percent: self.cap,
            cpus: self.cpus.clone(),
        }
    }
}

pub fn run(command: CpuGroupCommand) -> anyhow::Result<u8> {
    let layout = Layout::detect().context("finding this host's cgroups")?;
    match command {
        CpuGroupCommand::Create(args) => {
            CpuGroup::create(&layout, &args.name, &args.settings())?;
            println!("{}", args.name);
        }
        CpuGroupCommand::Update(args) => {
            if args.cap.is_none() && args.cpus.is_none() {
                anyhow::bail!("nothing to update: give --cap or --cpus");
            }
            CpuGroup::open(&layout, &args.name)?.apply(&args.settings())?;
            println!("{}", args.name);
        }
        CpuGroupCommand::Rm { name } => {
            CpuGroup::open(&layout, &name)?.remove()?;
            println!("{name}");
        }
        CpuGroupCommand::Ls { json } => {
            let groups: Vec<CpuGroup> = CpuGroup::list(&layout)
                .iter()
                .filter_map(|n| CpuGroup::open(&layout, n).ok())
                .collect();
            if json {
                let list: Vec<serde_json::Value> = groups
                    .iter()
                    .map(|g| {
                        let s = g.settings();
                        serde_json::json!({
                            "name": g.name(),
                            "cap_percent": s.cap_percent,
                            "cpus": s.cpus,
                            "vms": g.members(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(list));
            } else {
                println!("{:<20} {:>6} {:<10} VMS", "NAME", "CAP", "CPUS");
                for g in &groups {
                    let s = g.settings();
                    println!(
                        "{:<20} {:>6} {:<10} {}",
                        g.name(),
                        s.cap_percent
                            .map_or_else(|| "-".to_owned(), |c| format!("{c}%")),
                        s.cpus.unwrap_or_else(|| "-".to_owned()),
                        g.members().join(",")
                    );
                }
            }
        }
    }
    Ok(0)
}
