//! Exec over the agent's long-poll API: start the process, pump stdin/stdout/stderr as separate
//! concurrent RPC streams, forward signals, wait for the exit status. An exec whose future is
//! dropped before the exit status arrived (a client gone) kills its process and reaps it — even
//! when it is dropped while the start request is still in flight: that request runs in a task
//! of its own, and a process whose start nobody hears of any more is killed on arrival.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::task::AbortOnDropHandle;
use uvm::seams::{ExecRequest, GuestConnection, ProcessExit, TerminalSize};
use uvm::{GuestError, GuestRequest};
use uvm_agent_proto::agent::{
    ExecRequest as WireExec, ExecResponse as WireStarted, OutputStream, ProcessRef,
    ReadOutputRequest, ResizeRequest, SignalRequest, TerminalSize as WireSize, WaitResponse,
    WriteStdinRequest,
};
use uvm_agent_proto::{capabilities, MAX_OUTPUT_CHUNK, MAX_STDIN_CHUNK};

use crate::link::VsockGuest;

/// How long output may still flow after the exit status arrived; longer than the agent's own
/// linger (2 s), after which it ends the streams.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);
/// SIGKILL's number (the guest is Linux too).
const SIGKILL: i32 = 9;
/// Size of one stdin write.
const STDIN_CHUNK: usize = 64 << 10;

pub(crate) async fn run(
    link: &VsockGuest,
    request: ExecRequest,
) -> Result<ProcessExit, GuestError> {
    if request.args.is_empty() {
        return Err(GuestError::Rejected {
            request: GuestRequest::ExecProcess,
            kind: uvm::Rejection::InvalidArgument,
            message: "empty argument list".into(),
        });
    }
    let client = link.client()?;
    let t = link.shared.cfg.call_timeout;
    let ExecRequest {
        args,
        env,
        cwd,
        terminal,
        mut terminal_size,
        stdin,
        stdout,
        stderr,
        started,
        signals,
    } = request;
    if terminal_size.is_some() && !link.capabilities().has(capabilities::TERMINAL_RESIZE) {
        return Err(GuestError::Unsupported {
            operation: "a terminal size",
        });
    }
    let wire = WireExec {
        args,
        env,
        cwd: cwd.unwrap_or_default(),
        terminal,
        stdin: stdin.is_some(),
        size: terminal_size
            .as_mut()
            .map(|sizes| wire_size(*sizes.borrow_and_update()))
            .into(),
        ..WireExec::default()
    };
    // From here on the process exists: if this future is dropped before its exit status
    // arrived, the guard kills and reaps it.
    let (started_process, mut kill_guard) = start_process(link, wire, t).await?;
    let (exec_id, pid) = (started_process.exec_id, started_process.pid);
    if let Some(started) = started {
        let _ = started.send(pid);
    }

    let _signaller = signals.map(|mut signals| {
        let link = link.clone();
        let exec_id = exec_id.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            while let Some(signal) = signals.recv().await {
                if let Err(e) = signal_process(&link, &exec_id, signal).await {
                    tracing::debug!(exec_id, signal, error = %e, "cannot signal the process");
                }
            }
        }))
    });

    // Helper tasks held as abort-on-drop handles: they end with the exec, however it ends.
    let _stdin_pump = stdin.map(|mut input| {
        let link = link.clone();
        let client = client.clone();
        let exec_id = exec_id.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut buf = vec![0u8; STDIN_CHUNK.min(MAX_STDIN_CHUNK)];
            loop {
                let n = match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let req = WriteStdinRequest {
                    exec_id: exec_id.clone(),
                    data: buf[..n].to_vec(),
                    ..WriteStdinRequest::default()
                };
                let t = link.shared.cfg.call_timeout;
                if link
                    .call(
                        GuestRequest::WriteStdin,
                        Some(t),
                        client.write_stdin(VsockGuest::ctx(), &req),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let req = ProcessRef {
                exec_id,
                ..ProcessRef::default()
            };
            let t = link.shared.cfg.call_timeout;
            let _ = link
                .call(
                    GuestRequest::CloseStdin,
                    Some(t),
                    client.close_stdin(VsockGuest::ctx(), &req),
                )
                .await;
        }))
    });

    // Every size change while the process runs; a failed resize (the process just ended, the
    // link broke) ends the forwarding, the exec itself reports what matters.
    let _resizer = terminal_size.map(|mut sizes| {
        let link = link.clone();
        let client = client.clone();
        let exec_id = exec_id.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            while sizes.changed().await.is_ok() {
                let req = ResizeRequest {
                    exec_id: exec_id.clone(),
                    size: Some(wire_size(*sizes.borrow_and_update())).into(),
                    ..ResizeRequest::default()
                };
                let t = link.shared.cfg.call_timeout;
                let resized = link
                    .call(
                        GuestRequest::ResizeTerminal,
                        Some(t),
                        client.resize_terminal(VsockGuest::ctx(), &req),
                    )
                    .await;
                if resized.is_err() {
                    return;
                }
            }
        }))
    });

    let out = pump(link, &exec_id, OutputStream::STDOUT, stdout);
    let err = async {
        if terminal {
            Ok(())
        } else {
            pump(link, &exec_id, OutputStream::STDERR, stderr).await
        }
    };
    let outputs = async { tokio::try_join!(out, err) };
    tokio::pin!(outputs);

    let wait_req = ProcessRef {
        exec_id: exec_id.clone(),
        ..ProcessRef::default()
    };
    // The process may run as long as it likes: no deadline on the wait; closing the link (VM
    // exit, terminate) releases everything.
    let waited = link.call(
        GuestRequest::WaitProcess,
        None,
        client.wait_process(VsockGuest::ctx(), &wait_req),
    );
    let mut outputs_done = false;
    let status = if link.capabilities().has(capabilities::EXEC_OUTPUT_LINGER) {
        // Output and exit status concurrently: the agent keeps a waited-for process readable
        // until its output was taken (or, with a background child holding the pipes,
        // `OUTPUT_LINGER` after the exit, when it ends the streams).
        tokio::pin!(waited);
        loop {
            tokio::select! {
                r = &mut waited => break r,
                r = &mut outputs, if !outputs_done => {
                    r?;
                    outputs_done = true;
                }
            }
        }
    } else {
        // An agent without the linger forgets the process at the wait: output first.
        (&mut outputs).await?;
        outputs_done = true;
        waited.await
    };
    let status = status?;
    // The agent has reaped and forgotten the process: nothing left to kill.
    kill_guard.disarm();
    if !outputs_done {
        match tokio::time::timeout(OUTPUT_GRACE, &mut outputs).await {
            Ok(r) => drop(r?),
            Err(_) => tracing::warn!(exec_id, "exec output did not end after the process exited"),
        }
    }
    Ok(process_exit(&status))
}

/// How the agent's wait status reads on this side of the seam.
fn process_exit(status: &WaitResponse) -> ProcessExit {
    ProcessExit {
        code: status.exit_code,
        signal: (status.signal != 0).then_some(status.signal),
    }
}

/// Asks the agent to start the process, in a task of its own so that the request completes even
/// if our caller goes away meanwhile; returns the started process with its armed kill guard.
/// When nobody takes the answer any more, the guard travelling with it kills and reaps the
/// process.
async fn start_process(
    link: &VsockGuest,
    wire: WireExec,
    timeout: Duration,
) -> Result<(WireStarted, KillOnDrop), GuestError> {
    let client = link.client()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task_link = link.clone();
    tokio::spawn(async move {
        let started = task_link
            .call(
                GuestRequest::ExecProcess,
                Some(timeout),
                client.exec_process(VsockGuest::ctx(), &wire),
            )
            .await
            .map(|started| {
                let guard = KillOnDrop {
                    link: task_link.clone(),
                    exec_id: Some(started.exec_id.clone()),
                };
                (started, guard)
            });
        // A receiver gone: the value comes back and is dropped here, guard and all.
        let _ = tx.send(started);
    });
    // The task always sends unless the runtime is shutting down.
    rx.await.unwrap_or(Err(GuestError::ConnectionLost))
}

/// Sends `signal` to the process `exec_id` through the agent's `SignalProcess`.
async fn signal_process(link: &VsockGuest, exec_id: &str, signal: i32) -> Result<(), GuestError> {
    let client = link.client()?;
    let req = SignalRequest {
        exec_id: exec_id.to_string(),
        signal,
        ..SignalRequest::default()
    };
    let t = link.shared.cfg.call_timeout;
    link.call(
        GuestRequest::SignalProcess,
        Some(t),
        client.signal_process(VsockGuest::ctx(), &req),
    )
    .await
    .map(drop)
}

/// Kills (SIGKILL) and reaps the process `exec_id` when dropped while still set: an exec whose
/// caller went away must not leave its process running in the guest.
struct KillOnDrop {
    link: VsockGuest,
    exec_id: Option<String>,
}

impl KillOnDrop {
    /// The process was reaped: nothing to do on drop.
    fn disarm(&mut self) {
        self.exec_id = None;
    }
}

/// SIGKILL, then the wait that makes the agent reap and forget the process — the wait even when
/// the signal failed (the process may have ended just before it: its wait reaps it).
async fn kill_and_reap(link: &VsockGuest, exec_id: &str) {
    if let Err(e) = signal_process(link, exec_id, SIGKILL).await {
        tracing::debug!(exec_id, error = %e, "cannot kill an abandoned guest process; reaping it anyway");
    }
    let Ok(client) = link.client() else {
        tracing::warn!(
            exec_id,
            "the guest link is gone: cannot reap an abandoned guest process"
        );
        return;
    };
    let req = ProcessRef {
        exec_id: exec_id.to_string(),
        ..ProcessRef::default()
    };
    let t = link.shared.cfg.call_timeout;
    match link
        .call(
            GuestRequest::WaitProcess,
            Some(t),
            client.wait_process(VsockGuest::ctx(), &req),
        )
        .await
    {
        Ok(status) => tracing::debug!(
            exec_id,
            code = status.exit_code,
            "abandoned guest process killed and reaped"
        ),
        Err(e) => tracing::warn!(exec_id, error = %e, "cannot reap an abandoned guest process"),
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let Some(exec_id) = self.exec_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(exec_id, "no runtime to kill an abandoned guest process");
            return;
        };
        let link = self.link.clone();
        runtime.spawn(async move { kill_and_reap(&link, &exec_id).await });
    }
}

fn wire_size(size: TerminalSize) -> WireSize {
    WireSize {
        rows: u32::from(size.rows),
        cols: u32::from(size.cols),
        ..WireSize::default()
    }
}

/// Reads one output stream until EOF, writing it to `sink` (or discarding it: the agent's buffer
/// must be drained or the process would block).
async fn pump(
    link: &VsockGuest,
    exec_id: &str,
    stream: OutputStream,
    mut sink: Option<Box<dyn tokio::io::AsyncWrite + Send + Unpin>>,
) -> Result<(), GuestError> {
    let client = link.client()?;
    let req = ReadOutputRequest {
        exec_id: exec_id.to_string(),
        stream: stream.into(),
        max_bytes: MAX_OUTPUT_CHUNK,
        ..ReadOutputRequest::default()
    };
    loop {
        let chunk = match link
            .call(
                GuestRequest::ReadOutput,
                None,
                client.read_output(VsockGuest::ctx(), &req),
            )
            .await
        {
            Ok(chunk) => chunk,
            // The agent forgot the process after its exit and linger: its output is over.
            Err(e) if VsockGuest::is_not_found(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(sink) = sink.as_mut() {
            if !chunk.data.is_empty() {
                sink.write_all(&chunk.data)
                    .await
                    .map_err(|source| GuestError::Io {
                        operation: "write exec output",
                        source,
                    })?;
                sink.flush().await.map_err(|source| GuestError::Io {
                    operation: "write exec output",
                    source,
                })?;
            }
        }
        if chunk.eof {
            return Ok(());
        }
    }
}
