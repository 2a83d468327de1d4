//! The agent API end to end, in-process: the real service on a unix socket, the generated
//! async client on the other end — reached directly and through a fake hybrid-vsock proxy,
//! the way the host reaches a guest through vhost-device-vsock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use uvm_agent::clock::{self, BootTimes};
use uvm_agent::power::ShutdownAction;
use uvm_agent::process::{Limits, Processes, ReapMode};
use uvm_agent::service::{serve, AgentService, ServiceConfig};
use uvm_agent_proto::agent::{
    Empty, ExecRequest, HandshakeRequest, OutputStream, ProcessRef, ReadOutputRequest,
    ResizeRequest, SignalRequest, TerminalSize, WriteStdinRequest,
};
use uvm_agent_proto::agent_ttrpc::AgentClient;
use uvm_agent_proto::ttrpc::r#async::transport::Listener;
use uvm_agent_proto::ttrpc::r#async::Server;
use uvm_agent_proto::ttrpc::{self, context, Code};
use uvm_agent_proto::{capabilities, hybrid_vsock, MAX_OUTPUT_CHUNK, PROTOCOL_VERSION};

/// Generous bound on any single call, so that a bug fails the test instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

struct Agent {
    client: AgentClient,
    socket: PathBuf,
    shutdown: Arc<Notify>,
    _server: Server,
    _dir: tempfile::TempDir,
}

async fn start_agent() -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let listener =
        Listener::bind(format!("unix://{}", socket.display())).expect("bind unix socket");
    let procs = Processes::new(ReapMode::TrackedOnly, Limits::default());
    procs.spawn_reaper().expect("reaper");
    let shutdown = Arc::new(Notify::new());
    let service = AgentService::new(
        procs,
        Arc::new(BootTimes::new(clock::boottime())),
        ServiceConfig {
            system_duties: false,
            shutdown: ShutdownAction::Notify(shutdown.clone()),
        },
    );
    let server = serve(listener, service).await.expect("serve");
    let stream = UnixStream::connect(&socket).await.expect("connect");
    Agent {
        client: hybrid_vsock::client_from_stream(stream),
        socket,
        shutdown,
        _server: server,
        _dir: dir,
    }
}

fn ctx() -> context::Context {
    context::with_timeout(i64::try_from(CALL_TIMEOUT.as_nanos()).expect("fits"))
}

fn code(result: &ttrpc::Error) -> Option<Code> {
    match result {
        ttrpc::Error::RpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

fn exec_request(args: &[&str]) -> ExecRequest {
    let mut req = ExecRequest::new();
    req.args = args.iter().map(|s| (*s).to_owned()).collect();
    req
}

fn process_ref(exec_id: &str) -> ProcessRef {
    let mut r = ProcessRef::new();
    r.exec_id = exec_id.to_owned();
    r
}

async fn read_to_eof(client: &AgentClient, exec_id: &str, stream: OutputStream) -> Vec<u8> {
    let mut all = Vec::new();
    loop {
        let mut req = ReadOutputRequest::new();
        req.exec_id = exec_id.to_owned();
        req.stream = stream.into();
        let resp = client.read_output(ctx(), &req).await.expect("read_output");
        all.extend_from_slice(&resp.data);
        if resp.eof {
            return all;
        }
    }
}

#[tokio::test]
async fn handshake_reports_version_capabilities_and_boot_marks() {
    let agent = start_agent().await;
    let mut req = HandshakeRequest::new();
    req.protocol_version = PROTOCOL_VERSION;
    req.entropy = vec![7; 64];
    let resp = agent
        .client
        .handshake(ctx(), &req)
        .await
        .expect("handshake");
    assert_eq!(resp.protocol_version, PROTOCOL_VERSION);
    assert_eq!(resp.agent_version, env!("CARGO_PKG_VERSION"));
    for cap in [
        capabilities::EXEC,
        capabilities::DUMP_STACKS,
        capabilities::STATS,
    ] {
        assert!(resp.capabilities.iter().any(|c| c == cap), "{cap} missing");
    }
    assert!(resp.boot.kernel_to_init_ns > 0);

    req.protocol_version = PROTOCOL_VERSION + 1;
    let err = agent
        .client
        .handshake(ctx(), &req)
        .await
        .expect_err("mismatch");
    assert!(
        matches!(code(&err), Some(Code::FAILED_PRECONDITION)),
        "{err:?}"
    );

    req.protocol_version = PROTOCOL_VERSION;
    req.entropy = vec![0; 513];
    let err = agent
        .client
        .handshake(ctx(), &req)
        .await
        .expect_err("too much");
    assert!(
        matches!(code(&err), Some(Code::INVALID_ARGUMENT)),
        "{err:?}"
    );
}

#[tokio::test]
async fn exec_separates_stdout_stderr_and_forwards_the_exit_code() {
    let agent = start_agent().await;
    let c = &agent.client;
    let started = c
        .exec_process(
            ctx(),
            &exec_request(&["sh", "-c", "echo hi; echo err >&2; exit 3"]),
        )
        .await
        .expect("exec");
    assert!(started.pid > 0);
    assert_eq!(
        read_to_eof(c, &started.exec_id, OutputStream::STDOUT).await,
        b"hi\n"
    );
    assert_eq!(
        read_to_eof(c, &started.exec_id, OutputStream::STDERR).await,
        b"err\n"
    );
    let exit = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
    assert_eq!((exit.exit_code, exit.signal), (3, 0));
    // Waited for: forgotten.
    let err = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect_err("forgotten");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");
}

#[tokio::test]
async fn stdin_round_trips_through_cat() {
    let agent = start_agent().await;
    let c = &agent.client;
    let mut req = exec_request(&["cat"]);
    req.stdin = true;
    let started = c.exec_process(ctx(), &req).await.expect("exec");
    let mut write = WriteStdinRequest::new();
    write.exec_id = started.exec_id.clone();
    write.data = b"hello agent\n".to_vec();
    let written = c.write_stdin(ctx(), &write).await.expect("write");
    assert_eq!(written.written, 12);
    c.close_stdin(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("close");
    assert_eq!(
        read_to_eof(c, &started.exec_id, OutputStream::STDOUT).await,
        b"hello agent\n"
    );
    let err = c.write_stdin(ctx(), &write).await.expect_err("closed");
    assert!(
        matches!(code(&err), Some(Code::FAILED_PRECONDITION)),
        "{err:?}"
    );
    let exit = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
    assert_eq!((exit.exit_code, exit.signal), (0, 0));
}

#[tokio::test]
async fn unknown_ids_are_not_found_and_bad_requests_are_invalid() {
    let agent = start_agent().await;
    let c = &agent.client;
    let unknown = process_ref("e999");
    let err = c.wait_process(ctx(), &unknown).await.expect_err("unknown");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");
    let err = c.close_stdin(ctx(), &unknown).await.expect_err("unknown");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");
    let mut read = ReadOutputRequest::new();
    read.exec_id = "e999".into();
    let err = c.read_output(ctx(), &read).await.expect_err("unknown");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");
    let mut signal = SignalRequest::new();
    signal.exec_id = "e999".into();
    signal.signal = 15;
    let err = c.signal_process(ctx(), &signal).await.expect_err("unknown");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");

    let err = c
        .exec_process(ctx(), &exec_request(&[]))
        .await
        .expect_err("empty args");
    assert!(
        matches!(code(&err), Some(Code::INVALID_ARGUMENT)),
        "{err:?}"
    );
    let err = c
        .exec_process(ctx(), &exec_request(&["/nonexistent/program"]))
        .await
        .expect_err("no such program");
    assert!(matches!(code(&err), Some(Code::NOT_FOUND)), "{err:?}");

    let started = c
        .exec_process(ctx(), &exec_request(&["true"]))
        .await
        .expect("exec");
    read.exec_id = started.exec_id.clone();
    read.max_bytes = MAX_OUTPUT_CHUNK + 1;
    let err = c.read_output(ctx(), &read).await.expect_err("too large");
    assert!(
        matches!(code(&err), Some(Code::INVALID_ARGUMENT)),
        "{err:?}"
    );
    let mut write = WriteStdinRequest::new();
    write.exec_id = started.exec_id.clone();
    write.data = b"x".to_vec();
    let err = c.write_stdin(ctx(), &write).await.expect_err("no stdin");
    assert!(
        matches!(code(&err), Some(Code::FAILED_PRECONDITION)),
        "{err:?}"
    );
    c.wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
}

/// A deadline, as the client sees it: its own timer (usually first) or the server's status.
fn is_deadline(err: &ttrpc::Error) -> bool {
    matches!(err, ttrpc::Error::Others(m) if m == "Request deadline elapsed")
        || matches!(code(err), Some(Code::DEADLINE_EXCEEDED))
}

#[tokio::test]
async fn read_output_long_polls_and_loses_nothing_to_a_deadline_then_signals_kill() {
    let agent = start_agent().await;
    let c = &agent.client;
    let started = c
        .exec_process(
            ctx(),
            &exec_request(&["sh", "-c", "sleep 1; echo late; exec sleep 30"]),
        )
        .await
        .expect("exec");
    // Nothing to read yet: the long poll runs into its deadline.
    let mut read = ReadOutputRequest::new();
    read.exec_id = started.exec_id.clone();
    let err = c
        .read_output(context::with_timeout(200_000_000), &read)
        .await
        .expect_err("deadline");
    assert!(is_deadline(&err), "{err:?}");
    // The next poll gets the bytes as soon as they come.
    let resp = c.read_output(ctx(), &read).await.expect("read");
    assert_eq!((resp.data.as_slice(), resp.eof), (&b"late\n"[..], false));
    let mut signal = SignalRequest::new();
    signal.exec_id = started.exec_id.clone();
    signal.signal = 15;
    c.signal_process(ctx(), &signal).await.expect("signal");
    let exit = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
    assert_eq!((exit.exit_code, exit.signal), (143, 15));
}

#[tokio::test]
async fn terminal_processes_get_a_pty_with_all_output_on_stdout() {
    let agent = start_agent().await;
    let c = &agent.client;
    let mut req = exec_request(&["sh", "-c", "tty; echo to-stderr >&2"]);
    req.terminal = true;
    let started = c.exec_process(ctx(), &req).await.expect("exec");
    let stderr = read_to_eof(c, &started.exec_id, OutputStream::STDERR).await;
    assert!(stderr.is_empty());
    let stdout = String::from_utf8(read_to_eof(c, &started.exec_id, OutputStream::STDOUT).await)
        .expect("utf-8");
    assert!(stdout.contains("/dev/pts/"), "{stdout:?}");
    assert!(stdout.contains("to-stderr\r\n"), "{stdout:?}");
    let exit = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
    assert_eq!(exit.exit_code, 0);
}

fn size(rows: u32, cols: u32) -> TerminalSize {
    let mut s = TerminalSize::new();
    s.rows = rows;
    s.cols = cols;
    s
}

fn resize(exec_id: &str, rows: u32, cols: u32) -> ResizeRequest {
    let mut r = ResizeRequest::new();
    r.exec_id = exec_id.to_owned();
    r.size = Some(size(rows, cols)).into();
    r
}

#[tokio::test]
async fn a_terminal_starts_at_its_requested_size_and_a_resize_signals_winch() {
    let agent = start_agent().await;
    let c = &agent.client;
    // The trap is set before the first size is printed: once that is seen, a resize is caught.
    let mut req = exec_request(&[
        "sh",
        "-c",
        "trap 'stty size; exit 0' WINCH; stty size; while :; do sleep 0.05; done",
    ]);
    req.terminal = true;
    req.size = Some(size(30, 100)).into();
    let started = c.exec_process(ctx(), &req).await.expect("exec");
    let mut seen = String::new();
    while !seen.contains("30 100\r\n") {
        let mut read = ReadOutputRequest::new();
        read.exec_id = started.exec_id.clone();
        let resp = c.read_output(ctx(), &read).await.expect("read_output");
        assert!(!resp.eof, "ended early: {seen:?}");
        seen.push_str(&String::from_utf8_lossy(&resp.data));
    }
    c.resize_terminal(ctx(), &resize(&started.exec_id, 40, 120))
        .await
        .expect("resize");
    let rest = read_to_eof(c, &started.exec_id, OutputStream::STDOUT).await;
    assert_eq!(String::from_utf8_lossy(&rest), "40 120\r\n");
    let exit = c
        .wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
    assert_eq!(exit.exit_code, 0);
}

#[tokio::test]
async fn terminal_sizes_are_refused_where_they_make_no_sense() {
    let agent = start_agent().await;
    let c = &agent.client;
    let piped = c
        .exec_process(ctx(), &exec_request(&["sleep", "30"]))
        .await
        .expect("exec");
    let err = c
        .resize_terminal(ctx(), &resize(&piped.exec_id, 40, 120))
        .await
        .expect_err("no terminal");
    assert_eq!(code(&err), Some(Code::FAILED_PRECONDITION), "{err:?}");
    let err = c
        .resize_terminal(ctx(), &resize("e999", 40, 120))
        .await
        .expect_err("unknown");
    assert_eq!(code(&err), Some(Code::NOT_FOUND), "{err:?}");
    for (rows, cols) in [(0, 80), (24, 0), (70_000, 80), (0, 0)] {
        let err = c
            .resize_terminal(ctx(), &resize(&piped.exec_id, rows, cols))
            .await
            .expect_err("bad size");
        assert_eq!(
            code(&err),
            Some(Code::INVALID_ARGUMENT),
            "{rows}x{cols}: {err:?}"
        );
    }
    let mut req = exec_request(&["true"]);
    req.size = Some(size(24, 80)).into();
    let err = c
        .exec_process(ctx(), &req)
        .await
        .expect_err("not a terminal");
    assert_eq!(code(&err), Some(Code::INVALID_ARGUMENT), "{err:?}");
    let mut kill = SignalRequest::new();
    kill.exec_id = piped.exec_id.clone();
    kill.signal = 9;
    c.signal_process(ctx(), &kill).await.expect("kill");
}

#[tokio::test]
async fn diagnostics_describe_the_agent_and_the_machine() {
    let agent = start_agent().await;
    let c = &agent.client;
    let started = c
        .exec_process(ctx(), &exec_request(&["sleep", "30"]))
        .await
        .expect("exec");
    let dump = c.dump_stacks(ctx(), &Empty::new()).await.expect("dump");
    assert!(dump.text.contains(&started.exec_id), "{}", dump.text);
    assert!(dump.text.contains("threads ("), "{}", dump.text);
    let stats = c.guest_stats(ctx(), &Empty::new()).await.expect("stats");
    assert!(stats.mem_total_bytes > 0);
    assert!(stats.mem_available_bytes > 0);
    assert!(stats.uptime_ns > 0);
    assert!(stats.cpu_user_ns + stats.cpu_system_ns + stats.cpu_idle_ns > 0);
    assert!(stats.processes > 0);
    let mut signal = SignalRequest::new();
    signal.exec_id = started.exec_id.clone();
    signal.signal = 9;
    c.signal_process(ctx(), &signal).await.expect("kill");
    c.wait_process(ctx(), &process_ref(&started.exec_id))
        .await
        .expect("wait");
}

#[tokio::test]
async fn shutdown_replies_first_then_acts() {
    let agent = start_agent().await;
    let notified = agent.shutdown.notified();
    agent
        .client
        .shutdown(ctx(), &Empty::new())
        .await
        .expect("shutdown");
    tokio::time::timeout(CALL_TIMEOUT, notified)
        .await
        .expect("shutdown action ran");
}

/// A stand-in for vhost-device-vsock's host socket: answers `CONNECT <port>` with
/// `OK <port>` and splices the stream to the agent's socket.
async fn fake_hybrid_vsock(dir: &Path, agent_socket: PathBuf) -> PathBuf {
    let path = dir.join("vsock.sock");
    let listener = UnixListener::bind(&path).expect("bind proxy");
    tokio::spawn(async move {
        let (mut host, _) = listener.accept().await.expect("accept");
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while host.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
            line.push(byte[0]);
        }
        assert_eq!(line, b"CONNECT 1024");
        let mut guest = UnixStream::connect(agent_socket).await.expect("agent");
        host.write_all(b"OK 1073741824\n").await.expect("reply");
        let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
    });
    path
}

#[tokio::test]
async fn the_host_reaches_the_api_through_hybrid_vsock() {
    let agent = start_agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = fake_hybrid_vsock(dir.path(), agent.socket.clone()).await;
    let client = tokio::time::timeout(CALL_TIMEOUT, hybrid_vsock::connect_agent(&uds))
        .await
        .expect("in time")
        .expect("connected");
    let mut req = HandshakeRequest::new();
    req.protocol_version = PROTOCOL_VERSION;
    let resp = client.handshake(ctx(), &req).await.expect("handshake");
    assert_eq!(resp.protocol_version, PROTOCOL_VERSION);
}
