//! File copies over the agent's file requests: a handle, then chunks of at most
//! [`MAX_FILE_CHUNK`] bytes, each request under the link's call deadline (a whole copy has none).
//!
//! The guest is untrusted: the handle it names is bounded, a read reply longer than asked or a
//! file that ends before its announced size is a protocol violation, and nothing beyond the
//! announced size is read. A copy that fails closes its handle before it returns, so the agent
//! has discarded the unfinished write by then; a copy whose future is dropped closes it in the
//! background; should that close never arrive, the agent's idle expiry does the same.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uvm::seams::{CopySink, CopySource, FileMeta};
use uvm::{GuestError, GuestRequest};
use uvm_agent_proto::agent::{
    FileHandle, OpenReadRequest, OpenWriteRequest, ReadChunkRequest, WriteChunkRequest,
};
use uvm_agent_proto::agent_ttrpc::AgentClient;
use uvm_agent_proto::MAX_FILE_CHUNK;

use crate::link::VsockGuest;

/// Longest handle accepted from the agent (it makes `f<counter>`).
const MAX_HANDLE_BYTES: usize = 64;

/// Closes a handle in the background unless disarmed: the clean-up of a failed or dropped copy.
struct OpenHandle {
    link: VsockGuest,
    client: AgentClient,
    handle: String,
    armed: bool,
}

impl OpenHandle {
    fn new(link: &VsockGuest, client: &AgentClient, handle: String) -> Result<Self, GuestError> {
        if handle.len() > MAX_HANDLE_BYTES {
            return Err(GuestError::Protocol {
                message: format!(
                    "a file handle of {} bytes (at most {MAX_HANDLE_BYTES})",
                    handle.len()
                ),
            });
        }
        Ok(OpenHandle {
            link: link.clone(),
            client: client.clone(),
            handle,
            armed: true,
        })
    }

    fn wire(&self) -> FileHandle {
        FileHandle {
            handle: self.handle.clone(),
            ..FileHandle::default()
        }
    }

    /// The agent forgot the handle (committed): nothing to close.
    fn disarm(&mut self) {
        self.armed = false;
    }

    /// Closes the handle now, best effort (a lost link or an expired handle leave nothing to
    /// clean up), and passes `result` on.
    async fn close_after<T>(mut self, result: Result<T, GuestError>) -> Result<T, GuestError> {
        self.disarm();
        let t = self.link.shared.cfg.call_timeout;
        let _ = self
            .link
            .call(
                GuestRequest::CloseFile,
                Some(t),
                self.client.close_file(VsockGuest::ctx(), &self.wire()),
            )
            .await;
        result
    }
}

impl Drop for OpenHandle {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (link, client, wire) = (self.link.clone(), self.client.clone(), self.wire());
        let t = link.shared.cfg.call_timeout;
        runtime.spawn(async move {
            // Best effort: a lost link or an expired handle leave nothing to clean up here.
            let _ = link
                .call(
                    GuestRequest::CloseFile,
                    Some(t),
                    client.close_file(VsockGuest::ctx(), &wire),
                )
                .await;
        });
    }
}

fn chunk_len(remaining: u64) -> usize {
    // At most MAX_FILE_CHUNK, which fits a usize and a u32.
    usize::try_from(remaining.min(u64::from(MAX_FILE_CHUNK))).unwrap_or(MAX_FILE_CHUNK as usize)
}

pub(crate) async fn copy_in(
    link: &VsockGuest,
    path: &str,
    meta: FileMeta,
    source: CopySource<'_>,
) -> Result<(), GuestError> {
    let client = link.client()?;
    let t = Some(link.shared.cfg.call_timeout);
    let open = OpenWriteRequest {
        path: path.to_owned(),
        mode: meta.mode,
        size: meta.size,
        ..OpenWriteRequest::default()
    };
    let opened = link
        .call(
            GuestRequest::OpenWrite,
            t,
            client.open_write(VsockGuest::ctx(), &open),
        )
        .await?;
    let mut handle = OpenHandle::new(link, &client, opened.handle)?;
    let sent = send_chunks(link, &client, &handle.handle, meta.size, source).await;
    if sent.is_err() {
        return handle.close_after(sent).await;
    }
    let wire = handle.wire();
    let committed = link
        .call(
            GuestRequest::CommitWrite,
            t,
            client.commit_write(VsockGuest::ctx(), &wire),
        )
        .await;
    // The agent forgets the handle at a commit, whether it succeeded or not.
    handle.disarm();
    committed.map(drop)
}

/// Reads `size` bytes from `source` and writes them in chunks to `handle`.
async fn send_chunks(
    link: &VsockGuest,
    client: &AgentClient,
    handle: &str,
    size: u64,
    source: CopySource<'_>,
) -> Result<(), GuestError> {
    let t = Some(link.shared.cfg.call_timeout);
    let mut offset = 0u64;
    let mut buf = vec![0u8; chunk_len(size)];
    while offset < size {
        let len = chunk_len(size - offset);
        source
            .read_exact(&mut buf[..len])
            .await
            .map_err(|source| GuestError::Io {
                operation: "read the file to copy in",
                source,
            })?;
        let chunk = WriteChunkRequest {
            handle: handle.to_owned(),
            offset,
            data: buf[..len].to_vec(),
            ..WriteChunkRequest::default()
        };
        link.call(
            GuestRequest::WriteChunk,
            t,
            client.write_chunk(VsockGuest::ctx(), &chunk),
        )
        .await?;
        offset += len as u64;
    }
    Ok(())
}

pub(crate) async fn copy_out(
    link: &VsockGuest,
    path: &str,
    max_size: u64,
    on_header: &mut (dyn FnMut(FileMeta) + Send),
    sink: CopySink<'_>,
) -> Result<FileMeta, GuestError> {
    let client = link.client()?;
    let t = Some(link.shared.cfg.call_timeout);
    let open = OpenReadRequest {
        path: path.to_owned(),
        max_size,
        ..OpenReadRequest::default()
    };
    let opened = link
        .call(
            GuestRequest::OpenRead,
            t,
            client.open_read(VsockGuest::ctx(), &open),
        )
        .await?;
    let handle = OpenHandle::new(link, &client, opened.handle)?;
    if opened.size > max_size || opened.mode & !0o7777 != 0 {
        let bad = Err(GuestError::Protocol {
            message: format!(
                "opened {path} with mode {:#o} and {} bytes, asked for at most {max_size}",
                opened.mode, opened.size
            ),
        });
        return handle.close_after(bad).await;
    }
    let meta = FileMeta {
        mode: opened.mode,
        size: opened.size,
    };
    on_header(meta);
    let received = receive_chunks(link, &client, &handle.handle, path, meta.size, sink).await;
    handle.close_after(received.map(|()| meta)).await
}

/// Reads `size` bytes from `handle` in chunks into `sink`.
async fn receive_chunks(
    link: &VsockGuest,
    client: &AgentClient,
    handle: &str,
    path: &str,
    size: u64,
    sink: CopySink<'_>,
) -> Result<(), GuestError> {
    let t = Some(link.shared.cfg.call_timeout);
    let mut offset = 0u64;
    while offset < size {
        let len = chunk_len(size - offset);
        let request = ReadChunkRequest {
            handle: handle.to_owned(),
            offset,
            // chunk_len is at most MAX_FILE_CHUNK, a u32.
            max_bytes: u32::try_from(len).unwrap_or(MAX_FILE_CHUNK),
            ..ReadChunkRequest::default()
        };
        let reply = link
            .call(
                GuestRequest::ReadChunk,
                t,
                client.read_chunk(VsockGuest::ctx(), &request),
            )
            .await?;
        if reply.data.is_empty() || reply.data.len() > len {
            return Err(GuestError::Protocol {
                message: format!(
                    "a read of {len} bytes at {offset} of {path} ({size} bytes) returned {}",
                    reply.data.len()
                ),
            });
        }
        sink.write_all(&reply.data)
            .await
            .map_err(|source| GuestError::Io {
                operation: "write the copied-out file",
                source,
            })?;
        offset += reply.data.len() as u64;
    }
    sink.flush().await.map_err(|source| GuestError::Io {
        operation: "write the copied-out file",
        source,
    })
}
