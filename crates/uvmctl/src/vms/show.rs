//! The commands that show VMs: `ps` (from the records alone), `inspect` (the record, with the
//! supervisor's live view when it runs) and `stats` (from the supervisor).

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use uvm_api::v1;
use uvm_supervisor::incomplete::names_of;
use uvm_supervisor::{names, read_record, Incomplete, VmRecord};

use super::{status_error, Target};

/// `uvmctl ps`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl ps -a --json")]
pub struct PsArgs {
    /// Show every VM, not only running ones.
    #[arg(short, long)]
    all: bool,
    /// Print a JSON array of records.
    #[arg(long)]
    json: bool,
}

/// `uvmctl inspect`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl inspect web --json")]
pub struct InspectArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `uvmctl stats`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  uvmctl stats web --json")]
pub struct StatsArgs {
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A record as JSON, with whether its supervisor runs.
fn record_json(record: &VmRecord, alive: bool) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("supervisor_alive".into(), Value::Bool(alive));
        // The pids as an object of role -> pid, as `docker inspect` users expect; the start
        // times (what tells a reused pid apart) stay in the record.
        let pids: serde_json::Map<String, Value> = record
            .pids
            .iter()
            .map(|(role, p)| (role.clone(), json!(p.pid)))
            .collect();
        map.insert("pids".into(), Value::Object(pids));
    }
    value
}

/// What `ps` and `inspect` show as the state: the record's, and whether its supervisor is gone.
fn shown_state(record: &VmRecord, alive: bool) -> String {
    if alive {
        record.state.clone()
    } else {
        format!("{} (supervisor dead)", record.state)
    }
}

pub fn ps(args: PsArgs, root: &Path) -> anyhow::Result<u8> {
    // No root yet: no VMs.
    let ids = if root.exists() {
        uvm_supervisor::check_root(root)?;
        names::list_ids(root)?
    } else {
        Vec::new()
    };
    let mut rows = Vec::new();
    let mut incomplete = Vec::new();
    for id in ids {
        let dir = root.join(&id);
        match read_record(&dir) {
            Ok(record) => {
                let alive = record.pids.get("supervisor").is_some_and(|p| p.is_alive());
                if args.all || (alive && record.state == "Running") {
                    rows.push((record, alive));
                }
            }
            // No record (yet): a create under way, or one that died before its supervisor
            // wrote it. Only with -a: neither is a running VM.
            Err(uvm_supervisor::RecordError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                if args.all && dir.is_dir() {
                    let name = names_of(root, &id).join(",");
                    incomplete.push((id, name, uvm_supervisor::incomplete(&dir)));
                }
            }
            // Removed meanwhile, or unreadable: not listed.
            Err(_) => {}
        }
    }
    if args.json {
        let mut list: Vec<Value> = rows.iter().map(|(r, a)| record_json(r, *a)).collect();
        list.extend(incomplete.iter().map(|(id, name, state)| {
            json!({
                "id": id,
                "name": name,
                "state": match state {
                    Incomplete::Creating => "Creating",
                    Incomplete::Abandoned => "Abandoned",
                },
                "supervisor_alive": *state == Incomplete::Creating,
            })
        }));
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!("{:<16}  {:<20}  {:<28}  CREATED", "ID", "NAME", "STATE");
    for (record, alive) in rows {
        println!(
            "{:<16}  {:<20}  {:<28}  {}",
            record.id,
            record.name,
            shown_state(&record, alive),
            record.created_at
        );
    }
    for (id, name, state) in incomplete {
        println!("{id:<16}  {name:<20}  {:<28}  -", state.shown());
    }
    Ok(0)
}

pub async fn inspect(args: InspectArgs, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let alive = target.supervisor_alive();
    let mut value = record_json(&target.record, alive);
    if alive {
        let live = target
            .client()
            .await?
            .inspect(target.request(v1::InspectRequest {}))
            .await
            .map_err(status_error)?
            .into_inner();
        merge_live(&mut value, &live);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mut take = |key: &str| match &mut value {
            Value::Object(map) => map
                .remove(key)
                .and_then(|d| d.as_array().cloned())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let (devices, nics, pci) = (take("devices"), take("nics"), take("pci_devices"));
        print_fields(&value, "");
        super::devices::print_inspect_lines(&devices);
        for line in super::network::nic_lines(&nics) {
            println!("nics: {line}");
        }
        for d in &pci {
            let s = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
            println!("pci: {} {} {}", s("id"), s("address"), s("state"));
        }
    }
    Ok(0)
}

/// The supervisor's live view over the record's fields.
fn merge_live(value: &mut Value, live: &v1::InspectResponse) {
    let Value::Object(map) = value else { return };
    if let Some(status) = &live.status {
        let state = match status.state() {
            v1::State::Unspecified | v1::State::NotCreated => "NotCreated",
            v1::State::Created => "Created",
            v1::State::Running => "Running",
            v1::State::Terminated => "Terminated",
            v1::State::Invalid => "Invalid",
        };
        map.insert("state".into(), json!(state));
        map.insert(
            "reason".into(),
            json!(status.reason.as_ref().map(|r| r.description.clone())),
        );
        map.insert("link".into(), json!(status.link().as_str_name()));
    }
    if let Some(guest) = &live.guest {
        map.insert(
            "guest".into(),
            json!({
                "agent_version": guest.agent_version,
                "protocol_version": guest.protocol_version,
                "capabilities": guest.capabilities,
            }),
        );
    }
    if let Some(boot) = &live.boot {
        let ms = |d: &Option<prost_types::Duration>| {
            d.and_then(|d| Duration::try_from(d).ok())
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        map.insert(
            "boot_ms".into(),
            json!({
                "kernel_to_init": ms(&boot.kernel_to_init),
                "init_to_ready": ms(&boot.init_to_ready),
                "start_total": ms(&boot.start_total),
            }),
        );
    }
    if let Some(exit) = live.exit_status.as_ref().and_then(|e| e.exit.as_ref()) {
        map.insert(
            "exit".into(),
            json!({"code": exit.code, "signal": exit.signal, "reason": exit.reason}),
        );
    }
    if let Some(r) = &live.resources {
        map.insert(
            "resources".into(),
            json!({
                "memory_mib": r.memory_mib,
                "cpus": r.cpus,
                // As `update --cpu-limit` takes it; none: no cap.
                "cpu_limit_percent": r.cpu_limit_per_10000.map(|l| f64::from(l) / 100.0),
                "cpu_weight": r.cpu_weight,
                "cpu_group": (!r.cpu_group.is_empty()).then_some(&r.cpu_group),
            }),
        );
    }
    if !live.cgroup.is_empty() {
        map.insert("cgroup".into(), json!(live.cgroup));
    }
    map.insert(
        "policy".into(),
        match &live.policy {
            Some(p) => json!({"enforced": true, "sha256": p.sha256, "fragments": p.fragments}),
            None => json!({"enforced": false}),
        },
    );
    if let Some(devices) = &live.devices {
        map.insert(
            "devices".into(),
            Value::Array(super::devices::devices_json(devices)),
        );
    }
    if let Some(network) = &live.network {
        map.insert(
            "network".into(),
            json!(super::network::camel(
                network.state().as_str_name(),
                "NETWORK_STATE_"
            )),
        );
        map.insert(
            "nics".into(),
            Value::Array(super::network::nics_json(network)),
        );
    }
    map.insert(
        "pci_devices".into(),
        Value::Array(super::network::pci_json(&live.pci_devices)),
    );
    let pids: serde_json::Map<String, Value> = live
        .processes
        .iter()
        .map(|p| (p.name.clone(), json!(p.pid)))
        .collect();
    if !pids.is_empty() {
        map.insert("pids".into(), Value::Object(pids));
    }
}

/// `key: value` lines, nested keys joined with dots.
fn print_fields(value: &Value, prefix: &str) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                print_fields(v, &key);
            }
        }
        Value::String(s) => println!("{prefix}: {s}"),
        Value::Null => println!("{prefix}: -"),
        other => println!("{prefix}: {other}"),
    }
}

pub async fn stats(args: StatsArgs, root: &Path) -> anyhow::Result<u8> {
    let target = Target::find(root, &args.id)?;
    let stats = target
        .client()
        .await?
        .stats(target.request(v1::StatsRequest {}))
        .await
        .map_err(status_error)?
        .into_inner();
    let secs = |d: &Option<prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(d).ok())
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let host = stats.host.context("the supervisor sent no host stats")?;
    let guest = stats.guest.context("the supervisor sent no guest stats")?;
    let throttling = host.cpu_throttling.as_ref().map(|t| {
        json!({
            "periods": t.periods,
            "throttled_periods": t.throttled_periods,
            "throttled_seconds": secs(&t.throttled_time),
        })
    });
    let value = json!({
        "id": target.id,
        "host": {
            "cpu_seconds": secs(&host.cpu_time),
            "rss_bytes": host.rss_bytes,
            "memory_current_bytes": host.memory_current_bytes,
            "memory_peak_bytes": host.memory_peak_bytes,
            "cpu_throttling": throttling,
        },
        "guest": {
            "mem_total_bytes": guest.mem_total_bytes,
            "mem_available_bytes": guest.mem_available_bytes,
            "cpu_user_seconds": secs(&guest.cpu_user),
            "cpu_system_seconds": secs(&guest.cpu_system),
            "cpu_idle_seconds": secs(&guest.cpu_idle),
            "uptime_seconds": secs(&guest.uptime),
            "processes": guest.processes,
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let mut line = format!(
            "host   cpu {:.2} s   rss {:.1} MiB",
            secs(&host.cpu_time),
            mib(host.rss_bytes)
        );
        if let Some(current) = host.memory_current_bytes {
            line.push_str(&format!("   cgroup memory {:.1} MiB", mib(current)));
        }
        if let Some(peak) = host.memory_peak_bytes {
            line.push_str(&format!(" (peak {:.1} MiB)", mib(peak)));
        }
        if let Some(t) = &host.cpu_throttling {
            line.push_str(&format!(
                "   throttled {} of {} periods ({:.2} s)",
                t.throttled_periods,
                t.periods,
                secs(&t.throttled_time)
            ));
        }
        println!("{line}");
        println!(
            "guest  memory {:.1} of {:.1} MiB available   cpu user {:.2} s system {:.2} s   uptime {:.1} s   {} processes",
            mib(guest.mem_available_bytes),
            mib(guest.mem_total_bytes),
            secs(&guest.cpu_user),
            secs(&guest.cpu_system),
            secs(&guest.uptime),
            guest.processes
        );
    }
    Ok(0)
}

/// `uvmctl events`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  uvmctl events web\n  uvmctl events -f --since 12 --json web   # resume after event 12"
)]
pub struct EventsArgs {
    /// Only events after this sequence number (resume where you left off).
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    since: u64,
    /// Go on printing new events until the VM is removed.
    #[arg(short, long)]
    follow: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    /// The VM: its name, its id, or a unique prefix of its id.
    id: String,
}

fn state_name(state: v1::State) -> &'static str {
    state.as_str_name().trim_start_matches("STATE_")
}

/// One event as JSON.
fn event_json(event: &v1::EventsResponse) -> Value {
    use uvm_api::v1::events_response::Event;
    let time = event
        .time
        .and_then(|t| std::time::SystemTime::try_from(t).ok())
        .map(uvm_supervisor::record::rfc3339);
    let body = match &event.event {
        Some(Event::Transition(t)) => json!({
            "type": "transition",
            "from": state_name(t.from_state()),
            "to": state_name(t.to_state()),
            "operation": t.operation().as_str_name().trim_start_matches("OPERATION_"),
            "reason": t.reason.as_ref().map(|r| r.description.clone()),
        }),
        Some(Event::BootPhase(b)) => json!({
            "type": "boot_phase",
            "step": b.step().as_str_name().trim_start_matches("START_STEP_"),
            "elapsed_ms": b.elapsed.and_then(|d| Duration::try_from(d).ok()).map(|d| d.as_secs_f64() * 1000.0),
        }),
        Some(Event::ExecStarted(e)) => json!({
            "type": "exec_started", "exec_id": e.exec_id, "pid": e.pid, "args": e.args,
        }),
        Some(Event::ExecExited(e)) => json!({
            "type": "exec_exited",
            "exec_id": e.exec_id,
            "exit_code": e.exit.map(|x| x.exit_code),
            "signal": e.exit.map(|x| x.signal).filter(|s| *s != 0),
        }),
        Some(Event::DeviceChanged(d)) => json!({
            "type": "device_changed",
            "operation": d.operation().as_str_name().trim_start_matches("OPERATION_"),
            "guest_path": d.guest_path,
            "host_path": d.host_path,
        }),
        None => json!({"type": "unknown"}),
    };
    let mut value = json!({"sequence": event.sequence, "time": time});
    if let (Value::Object(map), Value::Object(body)) = (&mut value, body) {
        map.extend(body);
    }
    value
}

pub async fn events(args: EventsArgs, root: &Path) -> anyhow::Result<u8> {
    use std::io::Write as _;
    let target = Target::find(root, &args.id)?;
    let mut stream = target
        .client()
        .await?
        .events(target.request(v1::EventsRequest {
            since: args.since,
            follow: args.follow,
        }))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let value = event_json(&event);
        let line = if args.json {
            value.to_string()
        } else {
            let mut fields: Vec<String> = Vec::new();
            if let Value::Object(map) = &value {
                for (k, v) in map {
                    if !matches!(k.as_str(), "sequence" | "time") && !v.is_null() {
                        fields.push(format!(
                            "{k}={}",
                            v.as_str().map_or(v.to_string(), str::to_owned)
                        ));
                    }
                }
            }
            format!(
                "{:>6}  {}  {}",
                event.sequence,
                value["time"].as_str().unwrap_or("-"),
                fields.join(" ")
            )
        };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    Ok(0)
}
