//! The guest link end to end without a VM: the real agent service in-process on a unix socket,
//! reached through a fake hybrid-vsock proxy (what vhost-device-vsock does), and a fake guest
//! announcing itself — plus a hostile guest sending garbage.
//!
//! Events are ordered by what the tests observe (output arriving, a future parked on its first
//! poll), never by sleeping.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use uvm::seams::{
    ExecRequest, FileMeta, GuestConnection, GuestDiagnostics, GuestEndpoint, GuestExec, GuestFiles,
    GuestMounts, LinkHealth, ProcessExit, ShareMount, ShareTransport, TerminalSize,
};
use uvm::testing::Capture;
use uvm::{GuestError, GuestRequest, Rejection};
use uvm_agent::clock::{self, BootTimes};
use uvm_agent::power::ShutdownAction;
use uvm_agent::process::{Limits, Processes, ReapMode};
use uvm_agent::service::{serve, AgentService, ServiceConfig};
use uvm_agent_proto::announce::ready_line;
use uvm_agent_proto::hybrid_vsock::host_port_path;
use uvm_agent_proto::ttrpc::r#async::transport::Listener;
use uvm_agent_proto::ttrpc::r#async::Server;
use uvm_agent_proto::HOST_ANNOUNCE_PORT;
use uvm_guest::{GuestLinkConfig, VsockGuest};

/// What the fake proxy does after a `CONNECT`.
#[derive(Clone, Copy)]
enum Peer {
    /// Pipe to the real agent.
    Agent,
    /// Answer OK, then send these bytes and keep the connection open.
    Garbage(&'static [u8]),
    /// Answer OK, then never say anything.
    Silent,
}

struct Harness {
    dir: tempfile::TempDir,
    uds: PathBuf,
    link: VsockGuest,
    _server: Option<Server>,
}

async fn start_agent(dir: &Path) -> (Server, PathBuf) {
    let socket = dir.join("agent.sock");
    let listener = Listener::bind(format!("unix://{}", socket.display())).expect("bind");
    let procs = Processes::new(ReapMode::TrackedOnly, Limits::default());
    procs.spawn_reaper().expect("reaper");
    let service = AgentService::new(
        procs,
        Arc::new(BootTimes::new(clock::boottime())),
        ServiceConfig {
            system_duties: false,
            shutdown: ShutdownAction::Notify(Arc::new(tokio::sync::Notify::new())),
        },
    );
    (serve(listener, service).await.expect("serve"), socket)
}

/// The hybrid-vsock proxy: `<dir>/vsock.sock` accepting `CONNECT <port>\n`.
fn spawn_proxy(uds: &Path, agent: Option<PathBuf>, peer: Peer) {
    let listener = UnixListener::bind(uds).expect("bind proxy");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while conn.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let _ = conn.write_all(b"OK 5000\n").await;
                match (peer, agent) {
                    (Peer::Agent, Some(agent)) => {
                        let mut upstream = UnixStream::connect(agent).await.expect("agent");
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                    }
                    // Then hold the connection open until the test ends.
                    (Peer::Garbage(bytes), _) => {
                        let _ = conn.write_all(bytes).await;
                        std::future::pending::<()>().await;
                    }
                    _ => std::future::pending::<()>().await,
                }
            });
        }
    });
}

async fn harness(peer: Peer, call_timeout: Duration) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let (server, agent) = match peer {
        Peer::Agent => {
            let (s, p) = start_agent(dir.path()).await;
            (Some(s), Some(p))
        }
        _ => (None, None),
    };
    spawn_proxy(&uds, agent, peer);
    let mut cfg = GuestLinkConfig::new("vm-link-test");
    cfg.call_timeout = call_timeout;
    cfg.log_drain_grace = Duration::from_millis(200);
    let link = VsockGuest::new(cfg);
    link.prepare_connection(&GuestEndpoint::HybridVsock { uds: uds.clone() })
        .await
        .expect("prepare");
    Harness {
        dir,
        uds,
        link,
        _server: server,
    }
}

/// The guest side of the announce stream: connect to `<uds>_1025`, send `lines`, stay open
/// until the test ends.
async fn announce(uds: &Path, payload: Vec<u8>) -> tokio::task::JoinHandle<()> {
    let path = host_port_path(uds, HOST_ANNOUNCE_PORT);
    let mut s = UnixStream::connect(path).await.expect("announce connect");
    tokio::spawn(async move {
        let _ = s.write_all(&payload).await;
        std::future::pending::<()>().await;
    })
}

/// An exec's output that a test can wait on: everything written so far, published on a watch
/// channel, so that "the command printed X" is an event rather than a buffer polled on a clock.
#[derive(Clone)]
struct WatchedOutput(Arc<watch::Sender<Vec<u8>>>);

impl WatchedOutput {
    fn new() -> WatchedOutput {
        WatchedOutput(Arc::new(watch::channel(Vec::new()).0))
    }

    fn writer(&self) -> Box<dyn AsyncWrite + Send + Unpin> {
        Box::new(self.clone())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.borrow()).into_owned()
    }

    /// Resolves once the output contains `needle` (at once if it already does).
    async fn shows(&self, needle: &str) {
        let mut rx = self.0.subscribe();
        // The sender lives in `self`: the channel cannot close while this waits.
        let _ = rx
            .wait_for(|bytes| String::from_utf8_lossy(bytes).contains(needle))
            .await;
    }
}

impl AsyncWrite for WatchedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.send_modify(|bytes| bytes.extend_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn ready(log: &[&str]) -> Vec<u8> {
    let mut v = format!("{}\n", ready_line()).into_bytes();
    for l in log {
        v.extend_from_slice(l.as_bytes());
        v.push(b'\n');
    }
    v
}

const CALL: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_after_the_announcement_then_exec_streams_output_and_exit_code() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&["agent log line one"])).await;
    let info = h.link.connect().await.expect("connect");
    assert_eq!(info.protocol_version, uvm_agent_proto::PROTOCOL_VERSION);
    assert!(info.capabilities.has("exec"));
    assert_eq!(h.link.health(), LinkHealth::Connected);
    assert!(
        !host_port_path(&h.uds, HOST_ANNOUNCE_PORT).exists(),
        "the announce listener is gone once the guest connected"
    );

    let (out, err) = (Capture::default(), Capture::default());
    let mut req = ExecRequest::new(["sh", "-c", "echo out; echo err >&2; exit 3"]);
    req.stdout = Some(Box::new(out.clone()));
    req.stderr = Some(Box::new(err.clone()));
    let code = h.link.exec(req).await.expect("exec");
    assert_eq!(code, ProcessExit::exited(3));
    assert_eq!(out.text(), "out\n");
    assert_eq!(err.text(), "err\n");

    let out = Capture::default();
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = Some(Box::new(std::io::Cursor::new(b"round trip\n".to_vec())));
    req.stdout = Some(Box::new(out.clone()));
    assert_eq!(h.link.exec(req).await.expect("cat"), ProcessExit::exited(0));
    assert_eq!(out.text(), "round trip\n");

    assert!(!h.link.dump_stacks().await.expect("dump").is_empty());
    assert!(h.link.stats().await.expect("stats").mem_total_bytes > 0);

    h.link.close_connection().await.expect("close");
    tokio::time::timeout(Duration::from_secs(5), h.link.log_drained())
        .await
        .expect("the log drains within the grace period after close");
    assert!(h
        .link
        .recent_log()
        .iter()
        .any(|l| l == "agent log line one"));
    assert_eq!(h.link.health(), LinkHealth::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_by_a_signal_reports_the_signal_and_an_exit_137_does_not() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    let killed = h
        .link
        .exec(ExecRequest::new(["sh", "-c", "kill -9 $$"]))
        .await
        .expect("exec");
    assert_eq!(killed, ProcessExit::signalled(9));
    let exited = h
        .link
        .exec(ExecRequest::new(["sh", "-c", "exit 137"]))
        .await
        .expect("exec");
    assert_eq!(exited, ProcessExit::exited(137));
}

/// Whether the agent still tracks a process whose arguments include `arg`, from its stack
/// dump's process table.
async fn tracked(link: &VsockGuest, arg: &str) -> bool {
    link.dump_stacks()
        .await
        .expect("dump stacks")
        .lines()
        .any(|l| l.contains(arg))
}

/// Whether a `sleep <arg>` runs on this host (the in-process agent's children are ours).
fn sleep_runs(arg: &str) -> bool {
    let wanted = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                cmdline == wanted.as_bytes()
            })
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_dropped_while_its_start_is_in_flight_gets_its_process_killed_and_reaped() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    // Polled once (the start request is on its way), then dropped before its answer.
    let exec = h.link.exec(ExecRequest::new(["sleep", "7777"]));
    assert!(tokio::time::timeout(Duration::ZERO, exec).await.is_err());
    // The start completes in the background, then the process is killed and reaped. Bounded,
    // so that a leaked process fails the test instead of hanging it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tracked(&h.link, "7777").await || sleep_runs("7777") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned process still runs or is still tracked by the agent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_log_follower_is_told_of_each_line_and_learns_how_many_fell_out_of_the_window() {
    let h = harness(Peer::Agent, CALL).await;
    // 5 more lines than the link keeps (200 by default).
    let lines: Vec<String> = (0..205).map(|i| format!("guest line {i}")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let mut counter = h.link.subscribe_log();
    let _guest = announce(&h.uds, ready(&refs)).await;
    h.link.connect().await.expect("connect");
    // An event per line, not a poll: woken by each, until the last one is in.
    let last_in = async {
        while h.link.log_after(0).lines.last().map(String::as_str) != Some("guest line 204") {
            counter.changed().await.expect("the link lives");
        }
    };
    tokio::time::timeout(Duration::from_secs(20), last_in)
        .await
        .expect("every line is forwarded");
    let total = *counter.borrow();
    let slice = h.link.log_after(0);
    assert_eq!((slice.skipped, slice.next), (total - 200, total));
    assert_eq!(slice.lines.len(), 200);
    assert_eq!(
        slice.lines.last().map(String::as_str),
        Some("guest line 204")
    );
    let later = h.link.log_after(total - 1);
    assert_eq!(
        (later.lines, later.skipped, later.next),
        (vec!["guest line 204".to_string()], 0, total)
    );
    assert!(h.link.log_after(total).lines.is_empty());
    assert!(!h.link.log_is_drained());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_releases_a_pending_exec() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    let link = h.link.clone();
    let out = WatchedOutput::new();
    let mut req = ExecRequest::new(["sh", "-c", "echo running; exec sleep 100"]);
    req.stdout = Some(out.writer());
    let pending = tokio::spawn(async move { link.exec(req).await });
    // The command runs in the agent, and the exec waits for it to end.
    tokio::time::timeout(Duration::from_secs(20), out.shows("running\n"))
        .await
        .expect("the command starts");
    h.link.close_connection().await.expect("close");
    let err = pending.await.expect("join").expect_err("released");
    assert!(matches!(err, GuestError::ConnectionLost), "{err:?}");
    let err = h.link.dump_stacks().await.expect_err("closed");
    assert!(matches!(err, GuestError::NotConnected), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_frame_from_the_guest_is_refused_without_harm() {
    let h = harness(Peer::Garbage(b"\xde\xad\xbe\xef garbage that is not a ttrpc frame \x00\x01\x02\x03\x04\x05\x06\x07\x08\x09"), Duration::from_secs(2)).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    let err = h.link.connect().await.expect_err("garbage refused");
    // ttrpc drops frames it cannot parse; the call then ends at our deadline, never hangs.
    assert!(
        matches!(
            err,
            GuestError::Timeout {
                operation: "handshake",
                ..
            }
        ),
        "{err:?}"
    );
    assert_ne!(h.link.health(), LinkHealth::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_from_the_guest_is_refused_without_allocating_it() {
    // A ttrpc header announcing a 4 GiB message, stream 1 (the handshake), type response.
    const HEADER: &[u8] = &[0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 1, 2, 0];
    let h = harness(Peer::Garbage(HEADER), Duration::from_secs(2)).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    let err = h.link.connect().await.expect_err("oversized refused");
    // ttrpc refuses a length above MESSAGE_LENGTH_MAX before allocating; the call ends at our
    // deadline.
    assert!(
        matches!(
            err,
            GuestError::Timeout {
                operation: "handshake",
                ..
            }
        ),
        "{err:?}"
    );
    assert_ne!(h.link.health(), LinkHealth::Connected);
}

#[tokio::test]
async fn a_guest_that_never_answers_the_handshake_fails_at_the_call_deadline() {
    let h = harness(Peer::Silent, Duration::from_millis(300)).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    let err = h.link.connect().await.expect_err("deadline");
    assert!(matches!(err, GuestError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn a_garbage_announcement_is_a_protocol_error() {
    let h = harness(Peer::Silent, CALL).await;
    let _guest = announce(&h.uds, b"HELLO I AM A VM\n".to_vec()).await;
    let err = h.link.connect().await.expect_err("not a ready line");
    assert!(matches!(err, GuestError::Protocol { .. }), "{err:?}");
}

#[tokio::test]
async fn an_endless_announcement_line_is_cut_off() {
    let h = harness(Peer::Silent, CALL).await;
    let _guest = announce(&h.uds, vec![b'A'; 1 << 20]).await;
    let err = h.link.connect().await.expect_err("too long");
    assert!(matches!(err, GuestError::Protocol { .. }), "{err:?}");
}

#[tokio::test]
async fn a_guest_that_connects_and_hangs_up_is_a_protocol_error() {
    let h = harness(Peer::Silent, CALL).await;
    let path = host_port_path(&h.uds, HOST_ANNOUNCE_PORT);
    drop(UnixStream::connect(path).await.expect("connect"));
    let err = h.link.connect().await.expect_err("no ready line");
    assert!(matches!(err, GuestError::Protocol { .. }), "{err:?}");
    drop(h.dir);
}

#[tokio::test]
async fn close_before_connect_releases_a_waiting_connect_and_log_wait() {
    let h = harness(Peer::Silent, CALL).await;
    let mut waiting = h.link.connect();
    // Its first poll takes the announce listener and parks on it: the connect is waiting.
    let first = std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx))).await;
    assert!(first.is_pending(), "{first:?}");
    h.link.close_connection().await.expect("close");
    let err = waiting.await.expect_err("released");
    assert!(matches!(err, GuestError::ConnectionLost), "{err:?}");
    tokio::time::timeout(Duration::from_secs(1), h.link.log_drained())
        .await
        .expect("nothing to drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_whose_background_child_keeps_the_pipes_open_still_returns() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    let out = Capture::default();
    let mut req = ExecRequest::new(["sh", "-c", "sleep 60 & echo $!; exit 4"]);
    req.stdout = Some(out.writer());
    // Without the agent's linger this would last as long as the background sleep.
    let code = tokio::time::timeout(Duration::from_secs(30), h.link.exec(req))
        .await
        .expect("the exec returns while its background child still runs")
        .expect("exec");
    assert_eq!(code, ProcessExit::exited(4));
    let pid: i32 = out.text().trim().parse().expect("the background pid");
    let pid = rustix::process::Pid::from_raw(pid).expect("non-zero");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_refusals_arrive_typed() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    let not_a_dir = h.uds.to_string_lossy().into_owned();
    let cases = [
        (
            ExecRequest::new(["/nonexistent/program"]),
            Rejection::NotFound,
        ),
        (ExecRequest::new(["/"]), Rejection::PermissionDenied),
        // Refused by the agent's own checks (an empty argv would not even leave the host).
        (
            ExecRequest {
                env: vec!["=x".into()],
                ..ExecRequest::new(["true"])
            },
            Rejection::InvalidArgument,
        ),
        (
            ExecRequest {
                cwd: Some(not_a_dir),
                ..ExecRequest::new(["true"])
            },
            Rejection::FailedPrecondition,
        ),
    ];
    for (req, expected) in cases {
        let what = format!("{req:?}");
        let err = h.link.exec(req).await.expect_err("refused");
        assert!(
            matches!(&err, GuestError::Rejected { kind, .. } if *kind == expected),
            "{what}: {err:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_exec_starts_at_its_size_and_follows_every_resize() {
    let h = harness(Peer::Agent, CALL).await;
    let _guest = announce(&h.uds, ready(&[])).await;
    let info = h.link.connect().await.expect("connect");
    // The name the controller's callers test is the one the agent advertises.
    assert!(info.capabilities.terminal_resize());
    let (sizes, rx) = tokio::sync::watch::channel(TerminalSize {
        rows: 30,
        cols: 100,
    });
    let out = WatchedOutput::new();
    let mut req = ExecRequest::new([
        "sh",
        "-c",
        "trap 'stty size; exit 0' WINCH; stty size; while :; do sleep 0.05; done",
    ]);
    req.terminal = true;
    req.terminal_size = Some(rx);
    req.stdout = Some(out.writer());
    let link = h.link.clone();
    let exec = tokio::spawn(async move { link.exec(req).await });
    // The trap is set before the first size is printed.
    tokio::time::timeout(Duration::from_secs(20), out.shows("30 100\r\n"))
        .await
        .expect("the initial size is printed");
    sizes
        .send(TerminalSize {
            rows: 40,
            cols: 120,
        })
        .expect("the exec still watches the size");
    let code = tokio::time::timeout(Duration::from_secs(20), exec)
        .await
        .expect("the resize ends the process")
        .expect("join")
        .expect("exec");
    assert_eq!(code, ProcessExit::exited(0));
    assert_eq!(out.text(), "30 100\r\n40 120\r\n");
}

// --- File copies ---

/// A connected link to the in-process agent.
async fn connected() -> (Harness, tokio::task::JoinHandle<()>) {
    let h = harness(Peer::Agent, CALL).await;
    let guest = announce(&h.uds, ready(&[])).await;
    h.link.connect().await.expect("connect");
    (h, guest)
}

/// Deterministic, not repetitive within a chunk: a misplaced chunk shows.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 1021) as u8).collect()
}

fn guest_path(h: &Harness, name: &str) -> String {
    h.dir.path().join(name).to_str().expect("utf-8").to_owned()
}

/// Copies `path` out, checking that one header came before the data.
async fn copy_out(
    link: &VsockGuest,
    path: &str,
    max: u64,
) -> Result<(FileMeta, Vec<u8>), GuestError> {
    let sink = Capture::default();
    let mut headers = Vec::new();
    let meta = link
        .copy_out(path, max, &mut |m| headers.push(m), &mut sink.clone())
        .await?;
    assert_eq!(headers, vec![meta], "one header, before the data");
    Ok((meta, sink.bytes()))
}

fn assert_refused(err: &GuestError, request: GuestRequest, kind: Rejection) {
    assert!(
        matches!(err, GuestError::Rejected { request: r, kind: k, .. } if *r == request && *k == kind),
        "expected {request} refused with {kind:?}, got {err:?}"
    );
}

/// Reads fail with an error: a source cut in the middle of a copy.
struct Broken;

impl AsyncRead for Broken {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Err(std::io::Error::other("the copy was cut")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_or_unnormalised_path_is_refused_by_the_agent() {
    let (h, _guest) = connected().await;
    assert!(h.link.capabilities().files(), "the agent advertises files");
    let meta = FileMeta {
        mode: 0o644,
        size: 1,
    };
    for path in ["relative/x", "/a/../b", "/a//b", ""] {
        let err = h
            .link
            .copy_in(path, meta, &mut &b"x"[..])
            .await
            .expect_err("refused");
        assert_refused(&err, GuestRequest::OpenWrite, Rejection::InvalidArgument);
        let err = copy_out(&h.link, path, 10).await.expect_err("refused");
        assert_refused(&err, GuestRequest::OpenRead, Rejection::InvalidArgument);
    }
    let bad_mode = FileMeta {
        mode: 0o10644,
        size: 1,
    };
    let err = h
        .link
        .copy_in(&guest_path(&h, "x"), bad_mode, &mut &b"x"[..])
        .await
        .expect_err("mode");
    assert_refused(&err, GuestRequest::OpenWrite, Rejection::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_or_parent_is_not_found_and_a_directory_is_refused() {
    let (h, _guest) = connected().await;
    let err = copy_out(&h.link, &guest_path(&h, "missing"), 10)
        .await
        .expect_err("missing");
    assert_refused(&err, GuestRequest::OpenRead, Rejection::NotFound);
    let meta = FileMeta {
        mode: 0o644,
        size: 1,
    };
    let err = h
        .link
        .copy_in(&guest_path(&h, "no-dir/x"), meta, &mut &b"x"[..])
        .await
        .expect_err("missing parent");
    assert_refused(&err, GuestRequest::OpenWrite, Rejection::NotFound);
    let dir = h.dir.path().to_str().expect("utf-8");
    let err = copy_out(&h.link, dir, 1 << 20)
        .await
        .expect_err("a directory");
    assert_refused(&err, GuestRequest::OpenRead, Rejection::FailedPrecondition);
    let err = h
        .link
        .copy_in(dir, meta, &mut &b"x"[..])
        .await
        .expect_err("onto a directory");
    assert_refused(&err, GuestRequest::OpenWrite, Rejection::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_above_the_limit_is_refused_before_any_data() {
    let (h, _guest) = connected().await;
    let path = guest_path(&h, "big");
    std::fs::write(&path, content(4097)).expect("write");
    let sink = Capture::default();
    let mut headers = 0;
    let err = h
        .link
        .copy_out(&path, 4096, &mut |_| headers += 1, &mut sink.clone())
        .await
        .expect_err("too large");
    assert_refused(&err, GuestRequest::OpenRead, Rejection::ResourceExhausted);
    assert_eq!((headers, sink.bytes().len()), (0, 0), "no header, no data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_round_trip_byte_exact_with_the_mode_kept_replacing_a_file_there() {
    let (h, _guest) = connected().await;
    let path = guest_path(&h, "blob");
    std::fs::write(&path, b"previous").expect("old file");
    let data = content(10 << 20);
    let meta = FileMeta {
        mode: 0o640,
        size: data.len() as u64,
    };
    h.link
        .copy_in(&path, meta, &mut &data[..])
        .await
        .expect("copy in");
    assert!(
        std::fs::read(&path).expect("read") == data,
        "written byte-exact"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&path).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o7777, 0o640);
    let (back_meta, back) = copy_out(&h.link, &path, 10 << 20).await.expect("copy out");
    assert_eq!(back_meta, meta);
    assert!(back == data, "read back byte-exact");
    let entries = std::fs::read_dir(h.dir.path()).expect("ls").count();
    assert_eq!(
        entries, 3,
        "the proxy socket, the agent socket and the file; no temp file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_in_the_middle_leaves_no_file_and_the_old_one_intact() {
    let (h, _guest) = connected().await;
    let data = content(3 << 20);
    let meta = FileMeta {
        mode: 0o644,
        size: data.len() as u64,
    };
    let before: Vec<_> = std::fs::read_dir(h.dir.path()).expect("ls").collect();
    let fresh = guest_path(&h, "fresh");
    let mut cut = (&data[..(3 << 19)]).chain(Broken);
    let err = h
        .link
        .copy_in(&fresh, meta, &mut cut)
        .await
        .expect_err("cut");
    assert!(matches!(err, GuestError::Io { .. }), "{err:?}");
    assert!(!Path::new(&fresh).exists(), "no file at the destination");
    let after = std::fs::read_dir(h.dir.path()).expect("ls").count();
    assert_eq!(after, before.len(), "no temporary file left either");

    let old = guest_path(&h, "old");
    std::fs::write(&old, b"old").expect("old file");
    let mut cut = (&data[..(3 << 19)]).chain(Broken);
    h.link.copy_in(&old, meta, &mut cut).await.expect_err("cut");
    assert_eq!(std::fs::read(&old).expect("read"), b"old");
    assert_eq!(h.link.health(), LinkHealth::Connected, "the link survives");
}

// --- Shares (only the refusals: the agent here runs on the host, where nothing is mounted) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_requests_the_agent_refuses_arrive_typed() {
    let (h, _guest) = connected().await;
    assert!(h.link.capabilities().has("shares"));
    let at = |guest_path: &str| ShareMount {
        guest_path: guest_path.to_owned(),
        read_only: false,
    };
    for path in ["/proc/share", "relative", "/mnt/../dev"] {
        let err = h
            .link
            .mount_share("tag", ShareTransport::VirtioFs, &at(path))
            .await
            .expect_err("a refused guest path");
        assert_refused(&err, GuestRequest::MountShare, Rejection::InvalidArgument);
    }
    let err = h
        .link
        .mount_share("", ShareTransport::NineP, &at(&guest_path(&h, "m")))
        .await
        .expect_err("an empty tag");
    assert_refused(&err, GuestRequest::MountShare, Rejection::InvalidArgument);

    // Nothing mounted there (missing, or a plain directory): not found, never a lazy success.
    for path in [
        guest_path(&h, "missing"),
        h.dir.path().display().to_string(),
    ] {
        let err = h.link.unmount_share(&path).await.expect_err("not mounted");
        assert_refused(&err, GuestRequest::UnmountShare, Rejection::NotFound);
    }
    let err = h.link.unmount_share("/sys").await.expect_err("refused");
    assert_refused(&err, GuestRequest::UnmountShare, Rejection::InvalidArgument);
}
