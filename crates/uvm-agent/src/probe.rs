//! `uvm-agent probe …`: the measuring tools `uvmctl bench` runs through an ordinary exec in the
//! guest — and, for the host's side of a comparison, the very same static binary on the host.
//! They are not part of the agent's API and change nothing in the guest.
//!
//! - `probe uevents`: one line per kernel uevent, `ACTION SUBSYSTEM DEVNAME DRIVER` (`-` for a
//!   field the event lacks), flushed at once, until killed; first a line `listening` once
//!   subscribed. No process per event (busybox `uevent` forks a shell for each), so a hot-add
//!   floor measured with it is not the observer's own cost.
//! - `probe read FILE [--random N] [--drop-cache]`: `N` (default 4096) reads of 4 KiB at
//!   random 4 KiB-aligned offsets (a fixed-seed xorshift, the same offsets every run), then the
//!   whole file in 1 MiB reads; prints `random_4k_iops=… seq_mb_s=… bytes=…`. With
//!   `--drop-cache` the file's cached pages are dropped (`posix_fadvise(DONTNEED)`) before each
//!   pass, so each read reaches the file system's device (in a guest: the virtual disk or the
//!   share's daemon); readahead is off for the random pass and on for the sequential one.
//! - `probe tcp-serve PORT`: serves [`uvm_util::tcp_probe`] (round trips, throughput) on
//!   `[::]:PORT` until killed: the network benchmark's guest end.
//! - `probe policy [N]`: compiles `examples/policies/sandbox.rego` (built in) and makes `N`
//!   (default 1000) decisions of an allowed exec of `true`, as `ExecProcess` makes them (input
//!   built, rule evaluated); prints `compile_ms=… decision_us=…`: what the policy costs where
//!   it runs.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use rustix::fs::{fadvise, Advice};

use crate::mounts::uevent::Uevents;

/// The block of the random pass.
const RANDOM_BLOCK: u64 = 4096;
/// The block of the sequential pass.
const SEQUENTIAL_BLOCK: usize = 1 << 20;

/// Runs `probe ARGS…`; its exit code.
pub fn main(args: &[String]) -> u8 {
    let result = match args.first().map(String::as_str) {
        Some("uevents") if args.len() == 1 => uevents(),
        Some("policy") if args.len() <= 2 => match args.get(1).map_or(Ok(1000), |n| n.parse()) {
            Ok(n) if n > 0 => policy(n),
            _ => return usage("policy takes a positive count"),
        },
        Some("tcp-serve") if args.len() == 2 => match args[1].parse::<u16>() {
            Ok(port) => std::net::TcpListener::bind(("::", port))
                .and_then(|l| uvm_util::tcp_probe::serve(&l)),
            Err(_) => return usage("tcp-serve takes a port"),
        },
        Some("read") => match ReadArgs::parse(&args[1..]) {
            Ok(read) => read.run().map(|r| println!("{r}")),
            Err(msg) => return usage(&msg),
        },
        _ => return usage("expected `uevents`, `read FILE`, `policy [N]` or `tcp-serve PORT`"),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("uvm-agent probe: {e}");
            1
        }
    }
}

fn usage(msg: &str) -> u8 {
    eprintln!(
        "uvm-agent probe: {msg}\nusage: uvm-agent probe uevents\n       \
         uvm-agent probe read FILE [--random N] [--drop-cache]\n       \
         uvm-agent probe policy [N]\n       \
         uvm-agent probe tcp-serve PORT"
    );
    2
}

/// Times compiling sandbox.rego and `n` decisions of an allowed exec under it.
fn policy(n: u32) -> io::Result<()> {
    use crate::policy::{exec_input, Guard};
    const SANDBOX: &str = include_str!("../../../examples/policies/sandbox.rego");
    let guard = Guard::default();
    let t = Instant::now();
    guard
        .set(SANDBOX)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let compiled = t.elapsed();
    let spec = crate::process::ExecSpec {
        args: vec!["true".into()],
        ..crate::process::ExecSpec::default()
    };
    let decide = || {
        guard
            .check(uvm_policy::Rule::Exec, || exec_input(&spec))
            .map_err(|e| io::Error::other(e.to_string()))
    };
    // The first decision translates the code (under TCG) and fills the caches.
    decide()?;
    let t = Instant::now();
    for _ in 0..n {
        decide()?;
    }
    let per = t.elapsed() / n;
    println!(
        "compile_ms={:.2} decision_us={:.1}",
        compiled.as_secs_f64() * 1e3,
        per.as_secs_f64() * 1e6
    );
    Ok(())
}

/// Prints every uevent until stdout goes away.
fn uevents() -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let events = Uevents::open()?;
        let mut out = io::stdout().lock();
        writeln!(out, "listening")?;
        out.flush()?;
        let forever = Instant::now() + Duration::from_secs(100 * 365 * 86_400);
        while let Some(e) = events.next(forever).await? {
            let or_dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
            writeln!(
                out,
                "{} {} {} {}",
                or_dash(&e.action),
                or_dash(&e.subsystem),
                or_dash(&e.devname),
                or_dash(&e.driver)
            )?;
            out.flush()?;
        }
        Ok(())
    })
}

/// `probe read`'s arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadArgs {
    file: String,
    random: u64,
    drop_cache: bool,
}

impl ReadArgs {
    fn parse(args: &[String]) -> Result<ReadArgs, String> {
        let mut it = args.iter();
        let file = it.next().ok_or("read needs a FILE")?.clone();
        let mut read = ReadArgs {
            file,
            random: 4096,
            drop_cache: false,
        };
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--random" => {
                    read.random = it
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|n| *n > 0)
                        .ok_or("--random needs a count above 0")?;
                }
                "--drop-cache" => read.drop_cache = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        Ok(read)
    }

    fn run(&self) -> io::Result<ReadResult> {
        let file = File::open(&self.file)?;
        let size = file.metadata()?.len();
        let blocks = size / RANDOM_BLOCK;
        if blocks == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is smaller than 4 KiB", self.file),
            ));
        }
        let advise = |advice| fadvise(&file, 0, None, advice).map_err(io::Error::from);
        if self.drop_cache {
            advise(Advice::DontNeed)?;
        }
        advise(Advice::Random)?;
        let mut buf = vec![0u8; SEQUENTIAL_BLOCK];
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let start = Instant::now();
        for _ in 0..self.random {
            let offset = (rng.next() % blocks) * RANDOM_BLOCK;
            file.read_exact_at(&mut buf[..RANDOM_BLOCK as usize], offset)?;
        }
        let random = start.elapsed();

        if self.drop_cache {
            advise(Advice::DontNeed)?;
        }
        advise(Advice::Sequential)?;
        let start = Instant::now();
        let mut offset = 0;
        while offset < size {
            match file.read_at(&mut buf, offset)? {
                0 => break,
                n => offset += n as u64,
            }
        }
        let sequential = start.elapsed();
        Ok(ReadResult {
            random_iops: self.random as f64 / random.as_secs_f64().max(1e-9),
            seq_mb_s: offset as f64 / 1e6 / sequential.as_secs_f64().max(1e-9),
            bytes: offset,
        })
    }
}

/// What `probe read` prints.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ReadResult {
    random_iops: f64,
    seq_mb_s: f64,
    bytes: u64,
}

impl std::fmt::Display for ReadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "random_4k_iops={:.0} seq_mb_s={:.1} bytes={}",
            self.random_iops, self.seq_mb_s, self.bytes
        )
    }
}

/// Marsaglia's xorshift64: the same offsets every run, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn read_arguments_parse_and_bad_ones_are_refused() {
        assert_eq!(
            ReadArgs::parse(&args(&["/f", "--random", "10", "--drop-cache"])),
            Ok(ReadArgs {
                file: "/f".into(),
                random: 10,
                drop_cache: true
            })
        );
        assert!(ReadArgs::parse(&args(&[])).is_err());
        assert!(ReadArgs::parse(&args(&["/f", "--random", "0"])).is_err());
        assert!(ReadArgs::parse(&args(&["/f", "--bogus"])).is_err());
        assert_eq!(main(&args(&["nothing"])), 2);
    }

    #[test]
    fn a_read_pass_reads_the_whole_file_and_counts_its_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * (1 << 20) + 4096]).expect("write");
        let read = ReadArgs {
            file: path.to_string_lossy().into_owned(),
            random: 64,
            drop_cache: true,
        };
        let r = read.run().expect("read");
        assert_eq!(r.bytes, 3 * (1 << 20) + 4096);
        assert!(r.random_iops > 0.0 && r.seq_mb_s > 0.0, "{r}");
        assert!(r.to_string().starts_with("random_4k_iops="));
    }

    #[test]
    fn a_file_smaller_than_a_block_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tiny");
        std::fs::write(&path, b"x").expect("write");
        let read = ReadArgs {
            file: path.to_string_lossy().into_owned(),
            random: 1,
            drop_cache: false,
        };
        assert_eq!(
            read.run().expect_err("refused").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
