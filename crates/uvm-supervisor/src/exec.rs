//! The Exec stream: the client's frames (spec, then stdin, close_stdin, resize, signal) drive one
//! `exec_into_host`; its output comes back as `started`, `stdout`/`stderr` chunks and `exited`.
//!
//! Four tasks per exec, so that none waits behind another: the exec itself (the guest link pumps
//! stdio only while it is polled), the output forwarder, the stdin writer, and this call's loop
//! over the client's frames. A client that goes away (its response stream dropped, its request
//! stream reset) drops the exec task, and the guest link kills and reaps the process; the VM
//! stays Running.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::task::AbortOnDropHandle;
use tonic::{Status, Streaming};
use tracing::Instrument as _;
use uvm::seams::{ExecRequest, ProcessExit, TerminalSize, EXEC_SIGNAL_QUEUE};
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
/// The most stdin bytes queued for a process that does not read them yet.
const STDIN_BUDGET: usize = 1 << 20;

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
    inbound: Streaming<v1::ExecRequest>,
    tx: Responses,
) {
    let (started_tx, started_rx) = oneshot::channel();
    let (signals, signals_rx) = mpsc::channel(EXEC_SIGNAL_QUEUE);
    let (stdin_w, stdin_r) = pipe(spec.attach_stdin);
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
        async move { controller.exec_into_host_exit(request).await }.in_current_span(),
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
    let controls = Controls {
        stdin: stdin_w.map(StdinQueue::new),
        stdin_closed: !spec.attach_stdin,
        sizes,
        signals,
    };
    let mut frames = std::pin::pin!(drive_frames(inbound, controls));

    let mut exit: Option<Result<ProcessExit, ControllerError>> = None;
    let mut started: Option<bool> = None;
    let mut frames_open = true;
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
            r = &mut frames, if frames_open => match r {
                // Half-close: the process's stdin ends (after what is queued), nothing else.
                Ok(()) => frames_open = false,
                // A frame out of order, a message the server refused (over the size limit,
                // undecodable) or a client gone: the process is killed. A client still there
                // learns why.
                Err(status) => {
                    tracing::debug!(error = %status.message(), "exec stream refused or broken; killing the process");
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
        Some(Ok(exit)) => {
            let exited = v1::ExecExited {
                exit_code: exit.code,
                signal: exit.signal.unwrap_or(0),
            };
            shared.push_event(Event::ExecExited(v1::ExecExitedEvent {
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

/// The process's stdin, written by a task of its own from a queue of at most [`STDIN_BUDGET`]
/// bytes: a process that does not read its stdin does not hold up the frames behind it (a
/// signal, a resize) until that much is queued; beyond it the client's stream waits (gRPC flow
/// control pushes back on the client).
struct StdinQueue {
    chunks: mpsc::UnboundedSender<(Vec<u8>, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    _writer: AbortOnDropHandle<()>,
}

impl StdinQueue {
    fn new(mut pipe: DuplexStream) -> StdinQueue {
        // Unbounded as a channel, bounded in bytes: every chunk holds its permits until written.
        let (chunks, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, OwnedSemaphorePermit)>();
        let writer = tokio::spawn(
            async move {
                while let Some((data, _permits)) = rx.recv().await {
                    // The process closed its stdin or ended: its exit will say so.
                    if pipe.write_all(&data).await.is_err() {
                        return;
                    }
                }
                // The queue closed (close_stdin, half-close): the process reads end-of-file.
                let _ = pipe.shutdown().await;
            }
            .in_current_span(),
        );
        StdinQueue {
            chunks,
            budget: Arc::new(Semaphore::new(STDIN_BUDGET)),
            _writer: AbortOnDropHandle::new(writer),
        }
    }

    /// The permits `len` bytes take: a chunk larger than the whole budget takes all of it.
    fn permits(len: usize) -> u32 {
        u32::try_from(len.min(STDIN_BUDGET)).unwrap_or(u32::MAX)
    }

    /// Queues `data` once the budget has room for it.
    async fn push(&self, data: Vec<u8>) {
        let Ok(permits) = self
            .budget
            .clone()
            .acquire_many_owned(Self::permits(data.len()))
            .await
        else {
            return;
        };
        // The writer gone (the process closed its stdin): nothing more is written.
        let _ = self.chunks.send((data, permits));
    }

    /// Closes the queue: what is queued is written, then the process's stdin is closed.
    fn close(self) {
        let StdinQueue {
            chunks, _writer, ..
        } = self;
        drop(chunks);
        // The writer finishes on its own: detach it instead of aborting it.
        drop(_writer.detach());
    }
}

/// What the client's frames after the spec act on.
struct Controls {
    stdin: Option<StdinQueue>,
    stdin_closed: bool,
    sizes: Option<watch::Sender<TerminalSize>>,
    signals: mpsc::Sender<i32>,
}

/// Applies the client's frames as they come until the client half-closes (`Ok`) or sends a
/// frame that ends the call (`Err`: invalid, undecodable, the client gone). Each kind of frame
/// is handled on its own: stdin goes to its queue, so a signal or a resize behind stdin the
/// process does not read is still delivered.
async fn drive_frames<S>(mut inbound: S, mut controls: Controls) -> Result<(), Status>
where
    S: Stream<Item = Result<v1::ExecRequest, Status>> + Unpin,
{
    while let Some(message) = inbound.next().await {
        controls.apply(message?.frame).await?;
    }
    // Half-close: the process's stdin ends, nothing else.
    if let Some(stdin) = controls.stdin.take() {
        stdin.close();
    }
    // The process runs on: keep the signal and size senders until it ends.
    std::future::pending::<()>().await;
    Ok(())
}

impl Controls {
    /// Applies one client frame after the spec.
    async fn apply(&mut self, frame: Option<In>) -> Result<(), Status> {
        match frame {
            None => Err(invalid("an empty message")),
            Some(In::Spec(_)) => Err(invalid("a second spec")),
            Some(In::Stdin(data)) => {
                if self.stdin_closed {
                    return Err(invalid(
                        "stdin after close_stdin, or without spec.attach_stdin",
                    ));
                }
                if let Some(stdin) = &self.stdin {
                    stdin.push(data).await;
                }
                Ok(())
            }
            Some(In::CloseStdin(_)) => {
                if self.stdin_closed {
                    return Err(invalid("close_stdin twice, or without spec.attach_stdin"));
                }
                self.stdin_closed = true;
                if let Some(stdin) = self.stdin.take() {
                    stdin.close();
                }
                Ok(())
            }
            Some(In::Resize(size)) => {
                let Some(sizes) = &self.sizes else {
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
                // Bounded: a guest that does not take signals makes the client wait.
                let _ = self.signals.send(signal.number).await;
                Ok(())
            }
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
    // After the transitions it follows (the VM reached Running before any exec started).
    shared.push_event(Event::ExecStarted(v1::ExecStartedEvent {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn message(f: In) -> Result<v1::ExecRequest, Status> {
        Ok(v1::ExecRequest { frame: Some(f) })
    }

    /// A hang guard, not a timing assertion: a broken frame loop blocks forever.
    const HANG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_signal_behind_stdin_the_process_does_not_read_is_still_delivered() {
        // The process's end of stdin is never read: the writer blocks once the pipe is full.
        let (ours, _theirs) = tokio::io::duplex(STDIO_BUF);
        let (signals, mut signals_rx) = mpsc::channel(EXEC_SIGNAL_QUEUE);
        let controls = Controls {
            stdin: Some(StdinQueue::new(ours)),
            stdin_closed: false,
            sizes: None,
            signals,
        };
        let frames = tokio_stream::iter(vec![
            message(In::Stdin(vec![b'x'; 3 * STDIO_BUF])),
            message(In::Stdin(vec![b'y'; STDIO_BUF])),
            message(In::Signal(v1::Signal { number: 15 })),
        ])
        .chain(tokio_stream::pending());
        let driver = tokio::spawn(drive_frames(frames, controls));
        let signal = tokio::time::timeout(HANG, signals_rx.recv())
            .await
            .expect("the signal is not held up by the blocked stdin");
        assert_eq!(signal, Some(15));
        driver.abort();
    }

    #[tokio::test]
    async fn stdin_beyond_the_budget_waits_and_what_was_queued_arrives_in_order_before_eof() {
        let (ours, mut theirs) = tokio::io::duplex(STDIO_BUF);
        let (signals, _signals_rx) = mpsc::channel(EXEC_SIGNAL_QUEUE);
        let controls = Controls {
            stdin: Some(StdinQueue::new(ours)),
            stdin_closed: false,
            sizes: None,
            signals,
        };
        let chunks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 64 << 10]).collect();
        let expected: Vec<u8> = chunks.concat();
        let frames = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|c| message(In::Stdin(c)))
                .chain([message(In::CloseStdin(v1::CloseStdin {}))]),
        )
        .chain(tokio_stream::pending());
        let driver = tokio::spawn(drive_frames(frames, controls));
        let mut got = Vec::new();
        tokio::time::timeout(HANG, theirs.read_to_end(&mut got))
            .await
            .expect("stdin ends after close_stdin")
            .expect("read");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "stdin arrives whole and in order");
        driver.abort();
    }

    #[tokio::test]
    async fn frames_out_of_order_end_the_stream_with_invalid_argument() {
        for (frames, attach) in [
            (vec![message(In::Spec(v1::ExecSpec::default()))], true),
            (vec![message(In::Stdin(b"x".to_vec()))], false),
            (
                vec![
                    message(In::CloseStdin(v1::CloseStdin {})),
                    message(In::Stdin(b"x".to_vec())),
                ],
                true,
            ),
            (
                vec![message(In::Resize(v1::TerminalSize { rows: 1, cols: 1 }))],
                true,
            ),
            (vec![message(In::Signal(v1::Signal { number: 65 }))], true),
            (vec![Ok(v1::ExecRequest { frame: None })], true),
        ] {
            let (ours, _theirs) = tokio::io::duplex(STDIO_BUF);
            let (signals, _rx) = mpsc::channel(EXEC_SIGNAL_QUEUE);
            let controls = Controls {
                stdin: attach.then(|| StdinQueue::new(ours)),
                stdin_closed: !attach,
                sizes: None,
                signals,
            };
            let status = drive_frames(tokio_stream::iter(frames), controls)
                .await
                .expect_err("refused");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        }
    }
}
