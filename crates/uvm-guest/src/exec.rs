//! Exec over the agent's long-poll API: start the process, pump stdin/stdout/stderr as separate
//! concurrent RPC streams, wait for the exit code.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uvm::seams::ExecRequest;
use uvm::GuestError;
use uvm_agent_proto::agent::{
    ExecRequest as WireExec, OutputStream, ProcessRef, ReadOutputRequest, WriteStdinRequest,
};
use uvm_agent_proto::{MAX_OUTPUT_CHUNK, MAX_STDIN_CHUNK};

use crate::link::VsockGuest;

/// Size of one stdin write.
const STDIN_CHUNK: usize = 64 << 10;

pub(crate) async fn run(link: &VsockGuest, request: ExecRequest) -> Result<i32, GuestError> {
    if request.args.is_empty() {
        return Err(GuestError::Rejected {
            operation: "exec",
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
        stdin,
        stdout,
        stderr,
    } = request;
    let wire = WireExec {
        args,
        env,
        cwd: cwd.unwrap_or_default(),
        terminal,
        stdin: stdin.is_some(),
        ..WireExec::default()
    };
    let started = link
        .call(
            "exec",
            Some(t),
            client.exec_process(VsockGuest::ctx(Some(t)), &wire),
        )
        .await?;
    let exec_id = started.exec_id;

    let stdin_pump = stdin.map(|mut input| {
        let link = link.clone();
        let client = client.clone();
        let exec_id = exec_id.clone();
        tokio::spawn(async move {
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
                        "write stdin",
                        Some(t),
                        client.write_stdin(VsockGuest::ctx(Some(t)), &req),
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
                    "close stdin",
                    Some(t),
                    client.close_stdin(VsockGuest::ctx(Some(t)), &req),
                )
                .await;
        })
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

    // Output first, then the exit status: the agent forgets a process once it was waited for, so
    // the output must have reached EOF by then. The process may run as long as it likes: no
    // deadline here; closing the link (VM exit, terminate) releases everything.
    let outputs = outputs.await;
    if let Some(p) = stdin_pump {
        p.abort();
    }
    outputs?;
    let wait_req = ProcessRef {
        exec_id: exec_id.clone(),
        ..ProcessRef::default()
    };
    let status = link
        .call(
            "wait for the process",
            None,
            client.wait_process(VsockGuest::ctx(None), &wait_req),
        )
        .await?;
    Ok(status.exit_code)
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
        let chunk = link
            .call(
                "read output",
                None,
                client.read_output(VsockGuest::ctx(None), &req),
            )
            .await?;
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
