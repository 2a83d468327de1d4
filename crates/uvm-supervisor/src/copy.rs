//! CopyIn and CopyOut, built on exec for now: the guest's own `sh`, `cat`, `chmod`, `mv` and
//! `stat` (busybox in our image) move the bytes, streamed through the exec's stdin or stdout, so
//! no new agent RPC is needed. CopyIn writes a temporary file next to the target and renames it
//! over the target only once complete: a failed or cancelled copy leaves nothing at the path (the
//! temporary file is removed after a failure). Sizes above [`COPY_LIMIT`] are refused before any
//! data moves.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use uvm::seams::ExecRequest;
use uvm_api::v1::copy_in_request::Frame as In;
use uvm_api::v1::copy_out_response::Frame as Out;
use uvm_api::{controller_status, v1, ApiError};

use crate::supervisor::Shared;

/// The largest file either copy moves (1 GiB).
pub(crate) const COPY_LIMIT: u64 = 1 << 30;
const CHUNK: usize = 64 << 10;

fn invalid(what: &'static str, message: impl Into<String>) -> Status {
    ApiError::InvalidRequest {
        what,
        message: message.into(),
    }
    .into()
}

fn check_path(path: &str) -> Result<(), Status> {
    if !path.starts_with('/') || path.contains('\0') || path.ends_with('/') {
        return Err(invalid(
            "copy path",
            format!("{path:?} must be an absolute path to a file"),
        ));
    }
    Ok(())
}

fn check_size(size: u64) -> Result<(), Status> {
    if size > COPY_LIMIT {
        return Err(ApiError::TooLarge {
            what: "file",
            size,
            limit: COPY_LIMIT,
        }
        .into());
    }
    Ok(())
}

/// What the guest's tools said when they refused: permission problems are `PERMISSION_DENIED`,
/// a missing file `NOT_FOUND`, anything else `INVALID_ARGUMENT` (a path the guest cannot use).
fn refusal(path: &str, stderr: &str) -> Status {
    let said = stderr.trim();
    let message = format!("the guest refused {path:?}: {said}");
    if said.contains("Permission denied") || said.contains("Read-only") {
        Status::permission_denied(message)
    } else if said.contains("No such file") {
        Status::not_found(message)
    } else {
        Status::invalid_argument(message)
    }
}

/// Collects everything written to the other end of a pipe.
fn collect(mut from: DuplexStream) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let _ = from.read_to_end(&mut out).await;
        out
    })
}

/// Runs `args` in the guest with `stdin` and `stdout` attached; returns its exit code and stderr.
async fn run(
    shared: &Shared,
    args: Vec<String>,
    stdin: Option<DuplexStream>,
    stdout: Option<DuplexStream>,
) -> Result<(i32, String), Status> {
    let (err_w, err_r) = tokio::io::duplex(CHUNK);
    let stderr = collect(err_r);
    let mut request = ExecRequest::new(args);
    request.stdin = stdin.map(|r| Box::new(r) as _);
    request.stdout = stdout.map(|w| Box::new(w) as _);
    request.stderr = Some(Box::new(err_w));
    let code = shared
        .vm
        .controller
        .exec_into_host(request)
        .await
        .map_err(|e| controller_status(&e))?;
    let stderr = stderr.await.unwrap_or_default();
    Ok((code, String::from_utf8_lossy(&stderr).into_owned()))
}

pub(crate) async fn copy_in(
    shared: Arc<Shared>,
    mut inbound: Streaming<v1::CopyInRequest>,
) -> Result<v1::CopyInResponse, Status> {
    let header = match inbound.message().await?.and_then(|m| m.frame) {
        Some(In::Header(h)) => h,
        Some(In::Data(_)) | None => {
            return Err(invalid("copy stream", "the first message must be a header"))
        }
    };
    check_path(&header.path)?;
    if header.mode > 0o7777 {
        return Err(invalid(
            "copy mode",
            format!("{:o} has bits outside 07777", header.mode),
        ));
    }
    check_size(header.size)?;
    let n = shared.next_exec.fetch_add(1, Ordering::Relaxed);
    let tmp = format!("{}.uvmcp-{n}", header.path);
    let script = r#"set -e; cat > "$1"; chmod "$2" "$1"; mv -f "$1" "$3""#;
    let args = [
        "sh",
        "-c",
        script,
        "sh",
        &tmp,
        &format!("{:o}", header.mode),
        &header.path,
    ]
    .map(String::from)
    .to_vec();
    let (mut feed, stdin) = tokio::io::duplex(CHUNK);
    let exec = run(&shared, args, Some(stdin), None);
    tokio::pin!(exec);
    let fed = async {
        let mut total = 0u64;
        while let Some(message) = inbound.message().await? {
            match message.frame {
                Some(In::Data(data)) => {
                    total += data.len() as u64;
                    if total > header.size {
                        return Err(invalid(
                            "copy stream",
                            format!("more than the {} bytes announced", header.size),
                        ));
                    }
                    // The guest side closed early (it refused the path): its exit says why.
                    if feed.write_all(&data).await.is_err() {
                        return Ok(false);
                    }
                }
                Some(In::Header(_)) => return Err(invalid("copy stream", "a second header")),
                None => return Err(invalid("copy stream", "an empty message")),
            }
        }
        if total < header.size {
            return Err(invalid(
                "copy stream",
                format!("ended after {total} of {} bytes", header.size),
            ));
        }
        drop(feed);
        Ok::<_, Status>(true)
    };
    let outcome = tokio::select! {
        r = fed => match r {
            Ok(true) => exec.await,
            // The guest stopped reading: its exit status and stderr tell why.
            Ok(false) => match exec.await {
                Ok((0, _)) => Err(invalid("copy stream", "the guest stopped reading early")),
                other => other,
            },
            Err(status) => Err(status),
        },
        r = &mut exec => match r {
            // The guest ended before all data arrived: a refusal, or a stream cut short.
            Ok((0, _)) => Err(invalid("copy stream", "the guest stopped reading early")),
            other => other,
        },
    };
    match outcome {
        Ok((0, _)) => Ok(v1::CopyInResponse { size: header.size }),
        failed => {
            // Whatever went wrong, nothing stays behind: not the target (never renamed), not the
            // temporary file.
            let cleanup = ["rm", "-f", "--", &tmp].map(String::from).to_vec();
            let _ = run(&shared, cleanup, None, None).await;
            match failed {
                Ok((_, stderr)) => Err(refusal(&header.path, &stderr)),
                Err(status) => Err(status),
            }
        }
    }
}

pub(crate) async fn copy_out(
    shared: Arc<Shared>,
    path: String,
) -> Result<ReceiverStream<Result<v1::CopyOutResponse, Status>>, Status> {
    check_path(&path)?;
    let (out_w, out_r) = tokio::io::duplex(CHUNK);
    let stat = collect(out_r);
    let args = ["stat", "-L", "-c", "%a %s %F", "--", &path]
        .map(String::from)
        .to_vec();
    let (code, stderr) = run(&shared, args, None, Some(out_w)).await?;
    if code != 0 {
        return Err(refusal(&path, &stderr));
    }
    let stat = String::from_utf8_lossy(&stat.await.unwrap_or_default()).into_owned();
    let mut fields = stat.trim().splitn(3, ' ');
    let (Some(mode), Some(size), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
        return Err(Status::internal(format!(
            "cannot read the guest's stat of {path:?}: {stat:?}"
        )));
    };
    if kind != "regular file" {
        return Err(invalid(
            "copy path",
            format!("{path:?} is a {kind}, not a regular file"),
        ));
    }
    let (Ok(mode), Ok(size)) = (u32::from_str_radix(mode, 8), size.parse::<u64>()) else {
        return Err(Status::internal(format!(
            "cannot read the guest's stat of {path:?}: {stat:?}"
        )));
    };
    check_size(size)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let header = v1::CopyOutResponse {
            frame: Some(Out::Header(v1::CopyOutHeader { mode, size })),
        };
        if tx.send(Ok(header)).await.is_err() {
            return;
        }
        let (data_w, mut data_r) = tokio::io::duplex(CHUNK);
        let args = ["cat", "--", &path].map(String::from).to_vec();
        let exec = run(&shared, args, None, Some(data_w));
        let forward = async {
            let mut buf = vec![0u8; CHUNK];
            let mut total = 0u64;
            loop {
                match data_r.read(&mut buf).await {
                    Ok(0) | Err(_) => return Ok(total),
                    Ok(n) => {
                        total += n as u64;
                        let data = v1::CopyOutResponse {
                            frame: Some(Out::Data(buf[..n].to_vec())),
                        };
                        if tx.send(Ok(data)).await.is_err() {
                            return Err(());
                        }
                    }
                }
            }
        };
        let (ran, sent) = tokio::join!(exec, forward);
        let end = match (ran, sent) {
            (_, Err(())) => return,
            (Ok((0, _)), Ok(total)) if total == size => return,
            (Ok((0, _)), Ok(total)) => Err(Status::aborted(format!(
                "{path:?} changed during the copy: {total} bytes read of {size} announced"
            ))),
            (Ok((_, stderr)), _) => Err(refusal(&path, &stderr)),
            (Err(status), _) => Err(status),
        };
        let _ = tx.send(end).await;
    });
    Ok(ReceiverStream::new(rx))
}
