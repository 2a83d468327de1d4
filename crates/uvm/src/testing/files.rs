//! The fake guest's file system: an in-memory map of files that `copy_in` fills and `copy_out`
//! reads, in chunks that scripts can fail one by one, and paths scripted to be refused.

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{lock, Call, FakeGuest};
use crate::error::{GuestError, GuestRequest};
use crate::seams::{CopySink, CopySource, FileMeta, GuestFiles, LinkHealth};
use crate::Rejection;

/// The chunk size of the fake guest's file copies (one [`Call::WriteChunk`] or
/// [`Call::ReadChunk`] each).
pub const FAKE_COPY_CHUNK: usize = 64 << 10;

impl FakeGuest {
    /// Puts a file in the fake guest's file system.
    pub fn put_file(&self, path: &str, mode: u32, data: &[u8]) {
        let meta = FileMeta {
            mode,
            size: data.len() as u64,
        };
        lock(&self.state)
            .files
            .insert(path.to_owned(), (meta, data.to_vec()));
    }
    /// A file of the fake guest's file system: its mode and size, and its bytes.
    pub fn file(&self, path: &str) -> Option<(FileMeta, Vec<u8>)> {
        lock(&self.state).files.get(path).cloned()
    }
    /// Copies to or from `path` are refused with `kind` when they open it.
    pub fn refuse_path(&self, path: &str, kind: Rejection) {
        lock(&self.state).refusals.insert(path.to_owned(), kind);
    }
    fn refusal(&self, path: &str, request: GuestRequest) -> Result<(), GuestError> {
        match lock(&self.state).refusals.get(path) {
            Some(kind) => Err(GuestError::Rejected {
                request,
                kind: *kind,
                message: format!("scripted refusal of {path}"),
            }),
            None => Ok(()),
        }
    }
    pub(super) fn connected(&self) -> Result<(), GuestError> {
        match lock(&self.state).health {
            LinkHealth::Connected => Ok(()),
            _ => Err(GuestError::NotConnected),
        }
    }
}

#[async_trait]
impl GuestFiles for FakeGuest {
    async fn copy_in(
        &self,
        path: &str,
        meta: FileMeta,
        source: CopySource<'_>,
    ) -> Result<(), GuestError> {
        self.script.guest(Call::CopyIn).await?;
        self.connected()?;
        self.refusal(path, GuestRequest::OpenWrite)?;
        let size = usize::try_from(meta.size).map_err(|_| GuestError::Rejected {
            request: GuestRequest::OpenWrite,
            kind: Rejection::ResourceExhausted,
            message: "too large for the fake".into(),
        })?;
        let mut data = Vec::new();
        while data.len() < size {
            let mut chunk = vec![0; FAKE_COPY_CHUNK.min(size - data.len())];
            source
                .read_exact(&mut chunk)
                .await
                .map_err(|source| GuestError::Io {
                    operation: "read the file to copy in",
                    source,
                })?;
            self.script.guest(Call::WriteChunk).await?;
            data.extend_from_slice(&chunk);
        }
        // Only a whole copy appears, as with the real agent's rename.
        lock(&self.state)
            .files
            .insert(path.to_owned(), (meta, data));
        Ok(())
    }

    async fn copy_out(
        &self,
        path: &str,
        max_size: u64,
        on_header: &mut (dyn FnMut(FileMeta) + Send),
        sink: CopySink<'_>,
    ) -> Result<FileMeta, GuestError> {
        self.script.guest(Call::CopyOut).await?;
        self.connected()?;
        self.refusal(path, GuestRequest::OpenRead)?;
        let refused = |kind, message: String| GuestError::Rejected {
            request: GuestRequest::OpenRead,
            kind,
            message,
        };
        let (meta, data) = self
            .file(path)
            .ok_or_else(|| refused(Rejection::NotFound, format!("{path} does not exist")))?;
        if meta.size > max_size {
            return Err(refused(
                Rejection::ResourceExhausted,
                format!("{path} has {} bytes, above {max_size}", meta.size),
            ));
        }
        on_header(meta);
        for chunk in data.chunks(FAKE_COPY_CHUNK) {
            self.script.guest(Call::ReadChunk).await?;
            sink.write_all(chunk)
                .await
                .map_err(|source| GuestError::Io {
                    operation: "write the copied-out file",
                    source,
                })?;
        }
        sink.flush().await.map_err(|source| GuestError::Io {
            operation: "write the copied-out file",
            source,
        })?;
        Ok(meta)
    }
}
