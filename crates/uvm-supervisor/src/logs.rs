//! Logs: the VM's serial console (QEMU's `console.log` in the VM's runtime directory) from its
//! beginning, following new output until the VM ends; and the guest agent's recent forwarded log
//! lines. The console file goes with the runtime directory when the VM is released, so a
//! terminated VM has none left; following the guest log is not built yet.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use uvm::State;
use uvm_api::v1;

use crate::supervisor::Shared;

/// How often a follower looks for new console output.
const POLL: Duration = Duration::from_millis(100);
/// The largest chunk sent.
const CHUNK: usize = 64 << 10;

type Responses = mpsc::Sender<Result<v1::LogsResponse, Status>>;

pub(crate) fn logs(
    shared: Arc<Shared>,
    request: &v1::LogsRequest,
) -> Result<ReceiverStream<Result<v1::LogsResponse, Status>>, Status> {
    let (tx, rx) = mpsc::channel(8);
    match request.source() {
        v1::LogSource::Unspecified => {
            return Err(Status::invalid_argument(
                "invalid logs request: the source must be CONSOLE or GUEST",
            ))
        }
        v1::LogSource::Guest => {
            if request.follow {
                return Err(Status::unimplemented(
                    "following the guest log is not implemented by this supervisor yet",
                ));
            }
            let mut text = shared.vm.guest.recent_log().join("\n");
            if !text.is_empty() {
                text.push('\n');
            }
            tokio::spawn(async move {
                for chunk in text.as_bytes().chunks(CHUNK) {
                    if tx
                        .send(Ok(v1::LogsResponse {
                            data: chunk.to_vec(),
                        }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
        v1::LogSource::Console => {
            let state = shared.vm.controller.state();
            let Some(path) = shared.vm.qemu_vm().map(|q| q.paths().console_log.clone()) else {
                return Err(Status::failed_precondition(format!(
                    "VM {} has no console log (it is {state})",
                    shared.id()
                )));
            };
            if !path.exists() && ended(state) {
                return Err(Status::failed_precondition(format!(
                    "VM {} is {state}: its console log went with its runtime directory",
                    shared.id()
                )));
            }
            tokio::spawn(follow_console(shared, path, request.follow, tx));
        }
    }
    Ok(ReceiverStream::new(rx))
}

fn ended(state: State) -> bool {
    matches!(state, State::Terminated | State::Invalid)
}

async fn follow_console(
    shared: Arc<Shared>,
    path: std::path::PathBuf,
    follow: bool,
    tx: Responses,
) {
    let mut file = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if file.is_none() {
            file = tokio::fs::File::open(&path).await.ok();
        }
        let n = match file.as_mut() {
            Some(f) => f.read(&mut buf).await.unwrap_or(0),
            None => 0,
        };
        if n > 0 {
            let data = buf[..n].to_vec();
            if tx.send(Ok(v1::LogsResponse { data })).await.is_err() {
                return;
            }
            continue;
        }
        // At the end of what is there: done, unless following a VM that still runs.
        if !follow || ended(shared.vm.controller.state()) {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = shared.removed.cancelled() => return,
            () = tx.closed() => return,
        }
    }
}
