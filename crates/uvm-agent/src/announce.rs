//! The guest→host announce connection: connect to the host's listener on vsock
//! (`VMADDR_CID_HOST:HOST_ANNOUNCE_PORT`), write the ready line, then forward the agent's log
//! lines (those queued before the connection first).
//!
//! The host's vsock proxy (vhost-device-vsock) does not reset a connection to a port nobody
//! listens on — the connect just times out — so each attempt gets a short
//! `SO_VM_SOCKETS_CONNECT_TIMEOUT` and attempts repeat: quickly for [`PATIENCE`], then every
//! [`SLOW_RETRY`]. All of it runs on its own thread, with blocking sockets: logging never waits
//! for the host.

use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

use crate::clock::BootTimes;
use crate::logging;
use crate::{info, warn};

/// Per-attempt connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// How long attempts repeat back to back.
pub const PATIENCE: Duration = Duration::from_secs(10);
/// Interval of the attempts after that.
pub const SLOW_RETRY: Duration = Duration::from_secs(1);
/// Pause after an attempt that failed at once (e.g. no vsock transport yet).
const FAST_RETRY: Duration = Duration::from_millis(50);

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`_OLD`, a `struct timeval` on 64-bit) from
/// `<linux/vm_sockets.h>`; the libc crate does not define it.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

/// Where the host listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceTarget {
    /// Context id; 2 (`VMADDR_CID_HOST`) for the host.
    pub cid: u32,
    /// Port.
    pub port: u32,
}

impl Default for AnnounceTarget {
    fn default() -> Self {
        AnnounceTarget {
            cid: libc::VMADDR_CID_HOST,
            port: uvm_agent_proto::HOST_ANNOUNCE_PORT,
        }
    }
}

fn set_connect_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `fd` is an open socket; `tv` is a valid `struct timeval` that lives across the
    // call, and its exact size is passed; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One blocking connect attempt.
pub fn connect_once(target: AnnounceTarget, timeout: Duration) -> io::Result<File> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    set_connect_timeout(&fd, timeout)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(target.cid, target.port))?;
    Ok(File::from(fd))
}

fn connect_with_retries(target: AnnounceTarget) -> File {
    let start = Instant::now();
    let mut warned = false;
    loop {
        let attempt = Instant::now();
        match connect_once(target, CONNECT_TIMEOUT) {
            Ok(file) => return file,
            Err(e) => {
                let patient = start.elapsed() < PATIENCE;
                if !patient && !warned {
                    warn!(
                        "host announce listener {}:{} unreachable for {:?} ({e}); retrying every {:?}",
                        target.cid, target.port, PATIENCE, SLOW_RETRY
                    );
                    warned = true;
                }
                let pause = if patient { FAST_RETRY } else { SLOW_RETRY };
                std::thread::sleep(pause.saturating_sub(attempt.elapsed()));
            }
        }
    }
}

/// Starts the announce thread. Call it once the ttrpc listener is bound: the ready line tells
/// the host it may connect.
pub fn spawn(target: AnnounceTarget, boot: Arc<BootTimes>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || run(target, &boot))
        .map(drop)
}

fn run(target: AnnounceTarget, boot: &BootTimes) {
    let mut conn = connect_with_retries(target);
    let ready = uvm_agent_proto::announce::ready_line_with(&[(
        "boot_ms",
        &(boot.agent_start.as_millis()).to_string(),
    )]);
    if let Err(e) = conn.write_all(ready.as_bytes()) {
        warn!("cannot send the ready line: {e}");
        return;
    }
    boot.mark_ready();
    info!(
        "announced readiness to the host ({} ms after /init started)",
        boot.init_to_ready_ns() / 1_000_000
    );
    let Some(queue) = logging::host_queue() else {
        // Nothing to forward: keep the connection open for the host's sake.
        loop {
            std::thread::park();
        }
    };
    loop {
        let mut text = queue.wait_take().join("\n");
        text.push('\n');
        if let Err(e) = conn.write_all(text.as_bytes()) {
            queue.disable();
            warn!("host log connection lost ({e}); logging to the console only");
            return;
        }
    }
}
