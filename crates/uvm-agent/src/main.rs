//! `uvm-agent`: PID 1 of a uvmctl utility VM, or (not as PID 1) the same API server as an
//! ordinary process: `uvm-agent [--listen ADDR] [--announce CID:PORT | --no-announce]`;
//! `uvm-agent probe …` runs a measuring tool instead ([`uvm_agent::probe`]).

use std::process::ExitCode;

use uvm_agent::announce::AnnounceTarget;
use uvm_agent::run::{self, ServiceOptions};

const USAGE: &str = "usage: uvm-agent [--listen ADDR] [--announce CID:PORT | --no-announce]
  As PID 1 (/init) it sets the VM up first, then serves the same way (the kernel passes
  no arguments to /init unless asked to: the defaults are what a utility VM needs).
  --listen ADDR       ttrpc address (default vsock://-1:1024; also unix:///path)
  --announce CID:PORT where to announce readiness (default 2:1025)
  --no-announce       do not announce
usage: uvm-agent probe uevents | probe read FILE [--random N] [--drop-cache] | probe policy [N]
  measuring tools for `uvmctl bench` (not as PID 1)";

fn main() -> ExitCode {
    let started = uvm_agent::clock::boottime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("probe") && !rustix::process::getpid().is_init() {
        return ExitCode::from(uvm_agent::probe::main(&args[1..]));
    }
    let parsed = parse_args(args.into_iter());
    if rustix::process::getpid().is_init() {
        // PID 1 must never exit: bad arguments fall back to the defaults.
        run::as_init(&parsed.ok().flatten().unwrap_or_default(), started)
    }
    let options = match parsed {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("uvm-agent {}\n{USAGE}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("uvm-agent: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run::as_service(&options, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("uvm-agent: {}", uvm_util::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// `Ok(None)` for `--help` / `--version`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<ServiceOptions>, String> {
    let mut options = ServiceOptions::default();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => options.listen = args.next().ok_or("--listen needs an address")?,
            "--no-announce" => options.announce = None,
            "--announce" => {
                let value = args.next().ok_or("--announce needs CID:PORT")?;
                let (cid, port) = value
                    .split_once(':')
                    .and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)))
                    .ok_or_else(|| format!("--announce {value:?} is not CID:PORT"))?;
                options.announce = Some(AnnounceTarget { cid, port });
            }
            "--help" | "-h" | "--version" | "-V" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(options))
}
