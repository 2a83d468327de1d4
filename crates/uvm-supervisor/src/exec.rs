//! The Exec stream: the client's frames (spec, then stdin, close_stdin, resize, signal) drive one
//! `exec_into_host`; its output comes back as `started`, `stdout`/`stderr` chunks and `exited`.
//!
//! Three tasks per exec, so that none waits behind another: the exec itself (the guest link pumps
//! stdio only while it is polled), the output forwarder, and this call's loop over the client's
//! frames. A client that goes away (its response stream dropped, its request stream reset) drops
//! the exec task, and the guest link kills and reaps the process; the VM stays Running.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Status, Streaming};
use tracing::Instrument as _;
use uvm::seams::{ExecRequest, TerminalSize};
use uvm::{ControllerError, Operation, State};
use uvm_api::v1::events_response::Event;
use uvm_api::v1::exec_request::Frame as In;
use uvm_api::v1::exec_response::Frame as Out;
use uvm_api::{controller_status, v1, ApiError};

use crate::supervisor::Shared;

/// Buffer of each stdio pipe between the client's stream and the guest link, and the largest
/// output chunk sent (the proto asks for at most 1 MiB; 64 KiB is its suggestion).
const STDIO_BUF: usize = 64 << 10;
/// Responses queued for the client before the forwarder waits.
const QUEUE: usize = 32;

type Responses = mpsc::Sender<Result<v1::ExecResponse, Status>>;

fn invalid(message: impl Into<String>) -> Status {
    ApiError::InvalidRequest {
        what: "exec stream",
        message: message.into(),
    }
    .into()
}

fn frame(f: Out) -> Result<v1::ExecResponse, Status> {
    Ok(v1::ExecResponse { frame: Some(f) })
}

/// Starts the exec the stream's first frame describes; its responses come on the returned stream.
pub(crate) async fn exec(
    shared: Arc<Shared>,
    mut inbound: Streaming<v1::ExecRequest>,
) -> Result<ReceiverStream<Result<v1::ExecResponse, Status>>, Status> {
    let spec = match inbound.message().await?.and_then(|m| m.frame) {
        Some(In::Spec(spec)) => spec,
        Some(_) | None => return Err(invalid("the first message must be a spec")),
    };
    if spec.args.is_empty() {
        return Err(invalid("the spec's args must not be empty"));
    }
    let state = shared.vm.controller.state();
    if state != State::Running {
        return Err(controller_status(&ControllerError::WrongState {
            id: shared.id().to_owned(),
            operation: Operation::ExecIntoHost,
            state,
        }));
    }
    let size = match (spec.terminal, spec.terminal_size) {
        (true, Some(size)) => Some(TerminalSize::try_from(size)?),
        (true, None) => Some(TerminalSize { rows: 24, cols: 80 }),
        (false, _) => None,
    };
    let exec_id = shared.next_exec.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(QUEUE);
    let span = tracing::info_span!("exec", vm = %shared.id(), exec_id);
    tokio::spawn(run(shared, exec_id, spec, size, inbound, tx).instrument(span));
    Ok(ReceiverStream::new(rx))
}

async fn run(
    shared: Arc<Shared>,
    exec_id: u64,
    spec: v1::ExecSpec,
    size: Option<TerminalSize>,
    mut inbound: Streaming<v1::ExecRequest>,
    tx: Responses,
) {
    let (started_tx, started_rx) = oneshot::channel();
    let (signals, signals_rx) = mpsc::unbounded_channel();
    let (mut stdin, stdin_r) = pipe(spec.attach_stdin);
    let (out_w, out_r) = tokio::io::duplex(STDIO_BUF);
    let (err_w, err_r) = pipe(!spec.terminal);
    let (sizes, sizes_rx) = match size {
        Some(size) => {
            let (tx, rx) = watch::channel(size);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let mut request = ExecRequest::new(spec.args.clone());
    request.env = spec.env;
    request.cwd = (!spec.workdir.is_empty()).then_some(spec.workdir);
    request.terminal = spec.terminal;
    request.terminal_size = sizes_rx;
    request.stdin = stdin_r.map(|r| Box::new(r) as _);
    request.stdout = Some(Box::new(out_w));
    request.stderr = err_w.map(|w| Box::new(w) as _);
    request.started = Some(started_tx);
    request.signals = Some(signals_rx);

    let controller = shared.vm.controller.clone();
    let mut exec_task = AbortOnDropHandle::new(tokio::spawn(
        async move { controller.exec_into_host(request).await }.in_current_span(),
    ));
    let mut out_task = AbortOnDropHandle::new(tokio::spawn(
        forward_output(
            shared.clone(),
            spec.args.clone(),
            spec.terminal,
            started_rx,
            exec_id,
            out_r,
            err_r,
            tx.clone(),
        )
        .in_current_span(),
    ));

    let mut exit: Option<Result<i32, ControllerError>> = None;
    let mut started: Option<bool> = None;
    let mut inbound_open = true;
    let mut stdin_closed = !spec.attach_stdin;
    while exit.is_none() || started.is_none() {
        tokio::select! {
            r = &mut exec_task, if exit.is_none() => {
                exit = Some(r.unwrap_or_else(|e| Err(ControllerError::Host {
                    id: shared.id().to_owned(),
                    operation: Operation::ExecIntoHost,
                    source: uvm::HostError::Failed { operation: "exec", source: e.to_string().into() },
                })));
            }
            r = &mut out_task, if started.is_none() => started = Some(r.unwrap_or(false)),
            m = inbound.message(), if inbound_open => match m {
                Ok(Some(message)) => {
                    let applied = apply(message.frame, &mut stdin, &mut stdin_closed, &sizes, &signals, &tx).await;
                    if let Err(status) = applied {
                        tracing::debug!(error = %status.message(), "exec stream refused; killing the process");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                // Half-close: the process's stdin ends, nothing else.
                Ok(None) => {
                    inbound_open = false;
                    stdin = None;
                }
                // A message the server refused (over the size limit, undecodable) or a client
                // gone: either way the process is killed. A client still there learns why.
                Err(status) => {
                    tracing::debug!(error = %status.message(), "exec stream broken; killing the process");
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            },
            () = tx.closed() => {
                tracing::debug!("exec client went away; killing the process");
                return;
            }
            () = shared.removed.cancelled() => {
                let _ = tx.send(Err(ApiError::Removed { id: shared.id().to_owned() }.into())).await;
                return;
            }
        }
    }
    let last = match exit {
        Some(Ok(code)) => {
            // The exec seam gives the shell-style status only (128 + n for a signal, which an
            // `exit 130` looks like too): the signal is not known here, hence 0.
            let exited = v1::ExecExited {
                exit_code: code,
                signal: 0,
            };
            shared.events.push(Event::ExecExited(v1::ExecExitedEvent {
                exec_id,
                exit: Some(exited),
            }));
            frame(Out::Exited(exited))
        }
        Some(Err(e)) => Err(controller_status(&e)),
        None => return,
    };
    let _ = tx.send(last).await;
}

/// A pipe for one stdio stream, if wanted: the end we write or read, and the guest link's end.
fn pipe(wanted: bool) -> (Option<DuplexStream>, Option<DuplexStream>) {
    if !wanted {
        return (None, None);
    }
    let (ours, theirs) = tokio::io::duplex(STDIO_BUF);
    (Some(ours), Some(theirs))
}

/// Applies one client frame after the spec.
async fn apply(
    frame: Option<In>,
    stdin: &mut Option<DuplexStream>,
    stdin_closed: &mut bool,
    sizes: &Option<watch::Sender<TerminalSize>>,
    signals: &mpsc::UnboundedSender<i32>,
    tx: &Responses,
) -> Result<(), Status> {
    match frame {
        None => Err(invalid("an empty message")),
        Some(In::Spec(_)) => Err(invalid("a second spec")),
        Some(In::Stdin(data)) => {
            if *stdin_closed {
                return Err(invalid(
                    "stdin after close_stdin, or without spec.attach_stdin",
                ));
            }
            let Some(w) = stdin.as_mut() else {
                // Half-closed already: nothing more can come.
                return Ok(());
            };
            tokio::select! {
                r = w.write_all(&data) => {
                    // The process closed its stdin or ended: its exit will say so.
                    if r.is_err() {
                        *stdin = None;
                    }
                }
                () = tx.closed() => {}
            }
            Ok(())
        }
        Some(In::CloseStdin(_)) => {
            if *stdin_closed {
                return Err(invalid("close_stdin twice, or without spec.attach_stdin"));
            }
            *stdin_closed = true;
            if let Some(mut w) = stdin.take() {
                let _ = w.shutdown().await;
            }
            Ok(())
        }
        Some(In::Resize(size)) => {
            let Some(sizes) = sizes else {
                return Err(invalid("resize without a terminal"));
            };
            let size = TerminalSize::try_from(size)?;
            let _ = sizes.send(size);
            Ok(())
        }
        Some(In::Signal(signal)) => {
            if !(1..=64).contains(&signal.number) {
                return Err(invalid(format!(
                    "signal {} is not a Linux signal number",
                    signal.number
                )));
            }
            let _ = signals.send(signal.number);
            Ok(())
        }
    }
}

/// Sends `started` once the process exists (and records the event), then its output until both
/// streams end. Returns whether the process started.
#[expect(
    clippy::too_many_arguments,
    reason = "one exec's plumbing, named at its one caller"
)]
async fn forward_output(
    shared: Arc<Shared>,
    args: Vec<String>,
    terminal: bool,
    started: oneshot::Receiver<u32>,
    exec_id: u64,
    stdout: DuplexStream,
    stderr: Option<DuplexStream>,
    tx: Responses,
) -> bool {
    let Ok(pid) = started.await else {
        return false;
    };
    shared.events.push(Event::ExecStarted(v1::ExecStartedEvent {
        exec_id,
        pid,
        args,
        terminal,
    }));
    if tx
        .send(frame(Out::Started(v1::ExecStarted { exec_id, pid })))
        .await
        .is_err()
    {
        return true;
    }
    let out = copy(stdout, Out::Stdout, &tx);
    let err = async {
        if let Some(stderr) = stderr {
            copy(stderr, Out::Stderr, &tx).await;
        }
    };
    tokio::join!(out, err);
    true
}

/// Forwards `reader` as frames made by `make` until it ends or the client goes away.
async fn copy(mut reader: impl AsyncRead + Unpin, make: fn(Vec<u8>) -> Out, tx: &Responses) {
    let mut buf = vec![0u8; STDIO_BUF];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(frame(make(buf[..n].to_vec()))).await.is_err() {
                    return;
                }
            }
        }
    }
}
