//! CopyIn and CopyOut over the controller's file copies (the agent's file RPCs): this module only
//! turns the gRPC streams into a reader and a writer. The guarantees are the controller's and the
//! agent's: paths and modes checked before the state, a size limit refused before any data, a
//! copy in written to a temporary file renamed into place only when complete.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Status, Streaming};
use uvm::seams::FileMeta;
use uvm::Controller;
use uvm_api::v1::copy_in_request::Frame as In;
use uvm_api::v1::copy_out_response::Frame as Out;
use uvm_api::{controller_status, v1, ApiError};

/// The pipe between a gRPC stream and the controller, and the size of one data message out.
const CHUNK: usize = 64 << 10;

fn invalid(what: &'static str, message: impl Into<String>) -> Status {
    ApiError::InvalidRequest {
        what,
        message: message.into(),
    }
    .into()
}

pub(crate) async fn copy_in(
    controller: Controller,
    mut inbound: Streaming<v1::CopyInRequest>,
) -> Result<v1::CopyInResponse, Status> {
    let header = match inbound.message().await?.and_then(|m| m.frame) {
        Some(In::Header(h)) => h,
        Some(In::Data(_)) | None => {
            return Err(invalid("copy stream", "the first message must be a header"))
        }
    };
    let size = header.size;
    let (mut feed, reader) = tokio::io::duplex(CHUNK);
    // Feeds the client's data to the controller. A write that fails means the copy stopped
    // reading (it failed): its own error says why, so the feeder then just stops.
    let feeder = async move {
        let mut total = 0u64;
        while let Some(message) = inbound.message().await? {
            match message.frame {
                Some(In::Data(data)) => {
                    total += data.len() as u64;
                    if total > size {
                        return Err(invalid(
                            "copy stream",
                            format!("more than the {size} bytes announced"),
                        ));
                    }
                    if feed.write_all(&data).await.is_err() {
                        return Ok(());
                    }
                }
                Some(In::Header(_)) => return Err(invalid("copy stream", "a second header")),
                None => return Err(invalid("copy stream", "an empty message")),
            }
        }
        if total < size {
            return Err(invalid(
                "copy stream",
                format!("ended after {total} of {size} bytes"),
            ));
        }
        Ok::<(), Status>(())
    };
    let copy = async move {
        let mut reader = reader;
        let copied = controller
            .copy_in(&header.path, header.mode, size, &mut reader)
            .await;
        // Whatever the outcome, the feeder must not wait on a reader nobody reads.
        drop(reader);
        copied
    };
    tokio::pin!(copy, feeder);
    let done = v1::CopyInResponse { size };
    // Whichever ends first decides: a copy refused at once (too large, wrong state, a path the
    // guest refuses) must not wait for a client that keeps its stream open until it hears back;
    // a client that broke the stream's rules is told so, and dropping the copy cancels it.
    tokio::select! {
        copied = &mut copy => match copied {
            Err(e) => Err(controller_status(&e)),
            Ok(()) => feeder.await.map(|()| done),
        },
        fed = &mut feeder => match fed {
            Err(status) => Err(status),
            Ok(()) => copy.await.map(|()| done).map_err(|e| controller_status(&e)),
        },
    }
}

pub(crate) async fn copy_out(
    controller: Controller,
    path: String,
) -> Result<ReceiverStream<Result<v1::CopyOutResponse, Status>>, Status> {
    let (header_tx, header_rx) = oneshot::channel::<FileMeta>();
    let (sink, mut data) = tokio::io::duplex(CHUNK);
    let copy = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut header_tx = Some(header_tx);
        let mut on_header = move |meta: FileMeta| {
            if let Some(tx) = header_tx.take() {
                let _ = tx.send(meta);
            }
        };
        let mut sink = sink;
        let copied = controller.copy_out(&path, &mut on_header, &mut sink).await;
        // The end of the data for the forwarder.
        drop(sink);
        copied
    }));
    // A refusal before any data (not found, too large, wrong state) is the call's status.
    let Ok(meta) = header_rx.await else {
        return Err(match copy.await {
            Ok(Err(e)) => controller_status(&e),
            Ok(Ok(_)) => Status::internal("the copy ended without announcing the file"),
            Err(e) => Status::internal(format!("the copy task failed: {e}")),
        });
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let header = v1::CopyOutResponse {
            frame: Some(Out::Header(v1::CopyOutHeader {
                mode: meta.mode,
                size: meta.size,
            })),
        };
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            match data.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Some(Out::Data(buf[..n].to_vec()));
                    // The client went away: dropping `copy` (and `data`) ends the copy.
                    if tx.send(Ok(v1::CopyOutResponse { frame })).await.is_err() {
                        return;
                    }
                }
            }
        }
        let end = match copy.await {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => controller_status(&e),
            Err(e) => Status::internal(format!("the copy task failed: {e}")),
        };
        let _ = tx.send(Err(end)).await;
    });
    Ok(ReceiverStream::new(rx))
}
