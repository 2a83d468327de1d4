//! The readiness pipe between `uvmctl create` and the supervisor it starts: the supervisor writes
//! one line — `{"ok":true}` once its API is served, or `{"error":"…"}` with its own message — and
//! closes its end. A supervisor that dies first closes the pipe without a line, which the starter
//! reports with the tail of the supervisor's log.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

/// The one message on the pipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyMessage {
    /// The API is served.
    Ok(bool),
    /// The supervisor failed; its message.
    Error(String),
}

/// Setting up the pipe failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// The fd given is not an open file descriptor.
    #[error("ready fd {fd} is not open")]
    BadFd {
        /// The fd.
        fd: RawFd,
    },
    /// A pipe operation failed.
    #[error("cannot {action} the readiness pipe")]
    Io {
        /// What was being done.
        action: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The supervisor's end of the pipe. Dropped without a message, the starter sees the supervisor
/// fail without a word (and quotes its log).
#[derive(Debug)]
pub struct Ready {
    fd: Option<OwnedFd>,
}

impl Ready {
    /// No pipe: a supervisor run by hand.
    pub fn none() -> Ready {
        Ready { fd: None }
    }

    /// Takes ownership of the inherited pipe end `fd` and marks it close-on-exec, so that QEMU
    /// and the helpers do not inherit it.
    pub fn from_inherited(fd: RawFd) -> Result<Ready, ReadyError> {
        // SAFETY: `fd` is only borrowed to ask the kernel whether it is open; nothing is closed.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let flags = rustix::io::fcntl_getfd(borrowed).map_err(|_| ReadyError::BadFd { fd })?;
        rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC).map_err(|e| {
            ReadyError::Io {
                action: "set close-on-exec on",
                source: e.into(),
            }
        })?;
        // SAFETY: the starter passed this fd to us for this purpose alone; it is open (checked
        // above) and nothing else in this process owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ready { fd: Some(owned) })
    }

    /// Tells the starter the API is served.
    pub fn ok(self) -> Result<(), ReadyError> {
        self.send(&ReadyMessage::Ok(true))
    }

    /// Tells the starter why the supervisor fails.
    pub fn fail(self, message: &str) -> Result<(), ReadyError> {
        self.send(&ReadyMessage::Error(message.to_owned()))
    }

    fn send(mut self, message: &ReadyMessage) -> Result<(), ReadyError> {
        let Some(fd) = self.fd.take() else {
            return Ok(());
        };
        let mut line = serde_json::to_vec(message).map_err(|e| ReadyError::Io {
            action: "encode for",
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        std::fs::File::from(fd)
            .write_all(&line)
            .map_err(|source| ReadyError::Io {
                action: "write to",
                source,
            })
    }
}

/// The starter's end: a pipe whose write end the child inherits.
#[derive(Debug)]
pub struct ReadyPipe {
    /// The read end (close-on-exec).
    pub read: OwnedFd,
    /// The write end, inheritable: give its number to the child, then drop it.
    pub write: OwnedFd,
}

impl ReadyPipe {
    /// A new pipe; the write end without close-on-exec so that a child inherits it.
    pub fn new() -> Result<ReadyPipe, ReadyError> {
        let (read, write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).map_err(|e| {
                ReadyError::Io {
                    action: "create",
                    source: e.into(),
                }
            })?;
        rustix::io::fcntl_setfd(write.as_fd(), rustix::io::FdFlags::empty()).map_err(|e| {
            ReadyError::Io {
                action: "make inheritable",
                source: e.into(),
            }
        })?;
        Ok(ReadyPipe { read, write })
    }
}

/// Reads the supervisor's message from `read` (blocking until it writes or exits). `None` when
/// the pipe closed without a message.
pub fn read_message(read: OwnedFd) -> Result<Option<ReadyMessage>, ReadyError> {
    let mut text = String::new();
    std::fs::File::from(read)
        .read_to_string(&mut text)
        .map_err(|source| ReadyError::Io {
            action: "read from",
            source,
        })?;
    let line = text.lines().next().unwrap_or_default();
    if line.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(line)
        .map(Some)
        .map_err(|e| ReadyError::Io {
            action: "decode a message from",
            source: std::io::Error::other(e),
        })
}

#[cfg(test)]
mod tests {
    use std::os::fd::IntoRawFd as _;

    use super::*;

    #[test]
    fn ok_and_error_messages_cross_the_pipe() {
        for (send, expected) in [
            (true, ReadyMessage::Ok(true)),
            (false, ReadyMessage::Error("boom: no kernel".into())),
        ] {
            let pipe = ReadyPipe::new().expect("pipe");
            let ready = Ready::from_inherited(pipe.write.into_raw_fd()).expect("ready");
            if send {
                ready.ok().expect("ok");
            } else {
                ready.fail("boom: no kernel").expect("fail");
            }
            assert_eq!(read_message(pipe.read).expect("read"), Some(expected));
        }
    }

    #[test]
    fn a_writer_that_goes_away_silently_is_no_message() {
        let pipe = ReadyPipe::new().expect("pipe");
        drop(Ready::from_inherited(pipe.write.into_raw_fd()).expect("ready"));
        assert_eq!(read_message(pipe.read).expect("read"), None);
    }

    #[test]
    fn a_closed_fd_is_refused() {
        let pipe = ReadyPipe::new().expect("pipe");
        let fd = pipe.write.into_raw_fd();
        // SAFETY: we own `fd` (just released from its OwnedFd) and close it once.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        assert!(matches!(
            Ready::from_inherited(fd),
            Err(ReadyError::BadFd { fd: f }) if f == fd
        ));
    }
}
