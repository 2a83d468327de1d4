//! The stdin side of a process: a non-blocking pipe (or pty master) written by `WriteStdin`,
//! closed by `CloseStdin`.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::error::ApiError;

/// ASCII EOT: what a terminal's line discipline turns into end-of-file (`VEOF`, `^D`).
const VEOF: u8 = 0x04;

/// A process's stdin; writes are serialized.
#[derive(Debug)]
pub struct Stdin {
    fd: tokio::sync::Mutex<Option<AsyncFd<OwnedFd>>>,
    pty: bool,
}

impl Stdin {
    /// Wraps our end of the stdin pipe, or a duplicate of the pty master when `pty`.
    /// Must be called inside the runtime.
    pub fn new(fd: OwnedFd, pty: bool) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        let fd = super::register_fd(fd, Interest::WRITABLE)?;
        Ok(Stdin {
            fd: tokio::sync::Mutex::new(Some(fd)),
            pty,
        })
    }

    /// Writes all of `data`; returns its length. If the deadline of the request cancels this,
    /// a prefix of `data` may have been written.
    pub async fn write_all(&self, exec_id: &str, data: &[u8]) -> Result<usize, ApiError> {
        let mut slot = self.fd.lock().await;
        let Some(fd) = slot.as_ref() else {
            return Err(ApiError::StdinClosed {
                exec_id: exec_id.to_owned(),
            });
        };
        let mut written = 0;
        while written < data.len() {
            let mut guard = fd.writable().await.map_err(|source| ApiError::StdinWrite {
                exec_id: exec_id.to_owned(),
                source,
            })?;
            let rest = &data[written..];
            match guard
                .try_io(|inner| rustix::io::write(inner.get_ref(), rest).map_err(io::Error::from))
            {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    // The process closed its end (or exited): nothing will ever read more.
                    *slot = None;
                    return Err(ApiError::StdinClosed {
                        exec_id: exec_id.to_owned(),
                    });
                }
                Ok(Err(source)) => {
                    return Err(ApiError::StdinWrite {
                        exec_id: exec_id.to_owned(),
                        source,
                    })
                }
                Err(_would_block) => {}
            }
        }
        Ok(written)
    }

    /// Closes stdin: the pipe's write end is closed; on a terminal, which cannot be half-closed,
    /// an end-of-file character (`^D`) is sent instead. Closing twice is fine.
    pub async fn close(&self, exec_id: &str) -> Result<(), ApiError> {
        if self.pty {
            let open = self.fd.lock().await.is_some();
            if open {
                self.write_all(exec_id, &[VEOF]).await?;
            }
        }
        *self.fd.lock().await = None;
        Ok(())
    }
}
