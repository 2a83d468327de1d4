//! A small typed QMP client: the greeting, capability negotiation, commands matched to their
//! replies by `id`, and events (SHUTDOWN with its `reason`).
//!
//! Why not the `qapi` crate: its QMP types are generated from QEMU 9.1's schema, with closed enums
//! that reject values newer QEMUs send, and the whole generated API is a heavy build for the four
//! commands this backend needs. Here replies stay `serde_json::Value` until the command that asked
//! for them gives them a type, and event data is only typed for the events we read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
// The pending map stays consistent across a panic (single inserts and removes): keep using it.
use uvm_util::lock;

/// Longest QMP line accepted (QEMU's replies to our commands are far smaller).
const MAX_LINE: usize = 1 << 20;

/// An error of the QMP connection or of a command.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The connection is closed (QEMU exited or closed it).
    #[error("the QMP connection is closed")]
    Closed,
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command QEMU refused.
        command: &'static str,
        /// QEMU's error class (`GenericError`, `DeviceNotActive`, …).
        class: String,
        /// QEMU's human-readable description of the error.
        desc: String,
    },
    /// QEMU sent something this client does not understand.
    #[error("QMP protocol violation: {message}")]
    Protocol {
        /// What was wrong with it.
        message: String,
    },
    /// Reading or writing the socket failed.
    #[error("QMP I/O failed")]
    Io {
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
}

impl From<std::io::Error> for QmpError {
    fn from(source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof => QmpError::Closed,
            _ => QmpError::Io { source },
        }
    }
}

/// QEMU's version, from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// The major version (the 9 of 9.2.1).
    pub major: u32,
    /// The minor version (the 2 of 9.2.1).
    pub minor: u32,
    /// The micro version (the 1 of 9.2.1).
    pub micro: u32,
}

/// The first message of a QMP connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// The distribution's package version string (empty when QEMU sends none).
    pub package: String,
    /// The QMP capabilities the server offers (empty when it sends none).
    pub capabilities: Vec<String>,
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// The event's name (`SHUTDOWN`, `BALLOON_CHANGE`, …).
    pub name: String,
    /// The event's `data`, untyped (`null` when it has none).
    pub data: Value,
}

/// The SHUTDOWN event's data: QEMU is about to exit (or stop, with `-no-shutdown`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ShutdownEvent {
    /// Whether the guest asked for it.
    pub guest: bool,
    /// QEMU's `ShutdownCause`: `guest-shutdown`, `host-qmp-quit`, `guest-reset`, `guest-panic`,
    /// `host-signal`… Kept as text so that causes newer than this code still come through.
    pub reason: String,
}

impl QmpEvent {
    /// The typed SHUTDOWN data, when this is a well-formed SHUTDOWN event.
    pub fn shutdown(&self) -> Option<ShutdownEvent> {
        (self.name == "SHUTDOWN")
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }
}

/// One message from QEMU's QMP server.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    /// The greeting, the first message of a connection.
    Greeting(QmpGreeting),
    /// A command's success, with the command's `id`.
    Return {
        /// The `id` the command was sent with, if any.
        id: Option<Value>,
        /// The command's `return` value.
        value: Value,
    },
    /// A command's failure, with the command's `id`.
    Error {
        /// The `id` the command was sent with, if any.
        id: Option<Value>,
        /// QEMU's error class (`GenericError`, `DeviceNotActive`, …).
        class: String,
        /// QEMU's human-readable description of the error.
        desc: String,
    },
    /// An asynchronous event.
    Event(QmpEvent),
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(rename = "QMP")]
    greeting: Option<RawGreeting>,
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<RawError>,
    event: Option<String>,
    #[serde(default)]
    data: Value,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct RawGreeting {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: QemuVersion,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

impl QmpMessage {
    /// Parse one line (one JSON object) from the server.
    ///
    /// # Errors
    ///
    /// [`QmpError::Protocol`] when the line is not JSON of a QMP message, or is a message that
    /// is neither greeting, return, error nor event.
    pub fn parse(line: &[u8]) -> Result<QmpMessage, QmpError> {
        let raw: RawMessage = serde_json::from_slice(line).map_err(|e| QmpError::Protocol {
            message: format!("not a QMP message: {e}"),
        })?;
        if let Some(g) = raw.greeting {
            return Ok(QmpMessage::Greeting(QmpGreeting {
                version: g.version.qemu,
                package: g.version.package,
                capabilities: g.capabilities,
            }));
        }
        if let Some(value) = raw.ret {
            return Ok(QmpMessage::Return { id: raw.id, value });
        }
        if let Some(e) = raw.error {
            return Ok(QmpMessage::Error {
                id: raw.id,
                class: e.class,
                desc: e.desc,
            });
        }
        if let Some(name) = raw.event {
            return Ok(QmpMessage::Event(QmpEvent {
                name,
                data: raw.data,
            }));
        }
        Err(QmpError::Protocol {
            message: "a message that is neither greeting, return, error nor event".to_owned(),
        })
    }
}

/// A QMP command: its name, its arguments (the struct's fields) and the type of its return.
pub(crate) trait Command: Serialize {
    const NAME: &'static str;
    type Output: DeserializeOwned;
}

/// A return with nothing in it (`{}`).
#[derive(Debug, Deserialize)]
pub(crate) struct Empty {}

#[derive(Serialize)]
pub(crate) struct QmpCapabilities {}
impl Command for QmpCapabilities {
    const NAME: &'static str = "qmp_capabilities";
    type Output = Empty;
}

#[derive(Serialize)]
pub(crate) struct Quit {}
impl Command for Quit {
    const NAME: &'static str = "quit";
    type Output = Empty;
}

/// Ask the balloon driver to bring the guest to `value` bytes.
#[derive(Serialize)]
pub(crate) struct Balloon {
    pub value: u64,
}
impl Command for Balloon {
    const NAME: &'static str = "balloon";
    type Output = Empty;
}

#[derive(Serialize)]
pub(crate) struct QueryBalloon {}
#[derive(Debug, Deserialize)]
pub(crate) struct BalloonInfo {
    pub actual: u64,
}
impl Command for QueryBalloon {
    const NAME: &'static str = "query-balloon";
    type Output = BalloonInfo;
}

/// The request line for `command` with `id`.
pub(crate) fn request_line<C: Command>(command: &C, id: u64) -> Result<Vec<u8>, QmpError> {
    let arguments = serde_json::to_value(command).map_err(|e| QmpError::Protocol {
        message: format!("cannot encode the arguments of {}: {e}", C::NAME),
    })?;
    Ok(named_request_line(C::NAME, arguments, id))
}

/// The request line for the command `name` with `arguments` (an object, or nothing) and `id`.
fn named_request_line(name: &str, arguments: Value, id: u64) -> Vec<u8> {
    let mut request = serde_json::json!({ "execute": name, "id": id });
    if arguments.as_object().is_some_and(|a| !a.is_empty()) {
        request["arguments"] = arguments;
    }
    let mut line = request.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// Receives what the reader sees besides replies.
pub(crate) trait QmpObserver: Send + Sync + 'static {
    fn event(&self, event: &QmpEvent);
}

type Reply = Result<Value, (String, String)>;

#[derive(Default)]
struct Pending {
    closed: bool,
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
}

/// A negotiated QMP connection. Dropping it stops its reader.
pub(crate) struct QmpClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    greeting: QmpGreeting,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.greeting)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

impl QmpClient {
    /// Read the greeting, start the reader and leave capability negotiation mode. `guard` is held
    /// by the reader and dropped when it ends (connection closed, or client dropped).
    pub(crate) async fn connect<G: Send + 'static>(
        stream: UnixStream,
        observer: Arc<dyn QmpObserver>,
        guard: G,
    ) -> Result<QmpClient, QmpError> {
        let (read, writer) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut line = Vec::new();
        if !read_line(&mut read, &mut line).await? {
            return Err(QmpError::Closed);
        }
        let greeting = match QmpMessage::parse(&line)? {
            QmpMessage::Greeting(g) => g,
            other => {
                return Err(QmpError::Protocol {
                    message: format!("expected the greeting, got {other:?}"),
                })
            }
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader = tokio::spawn(read_loop(read, pending.clone(), observer, guard));
        let client = QmpClient {
            writer: tokio::sync::Mutex::new(writer),
            pending,
            next_id: AtomicU64::new(1),
            reader,
            greeting,
        };
        client.execute(&QmpCapabilities {}).await?;
        Ok(client)
    }

    pub(crate) fn greeting(&self) -> &QmpGreeting {
        &self.greeting
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    /// Run `command` and wait for its reply. Dropping the future abandons the reply (the reader
    /// then discards it).
    pub(crate) async fn execute<C: Command>(&self, command: &C) -> Result<C::Output, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = request_line(command, id)?;
        let value = self.round_trip(C::NAME, id, line).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Protocol {
            message: format!("unexpected return of {}: {e}", C::NAME),
        })
    }

    /// Run the command `name` with `arguments` (untyped, for probes and debugging).
    pub(crate) async fn execute_value(
        &self,
        name: &str,
        arguments: Value,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = named_request_line(name, arguments, id);
        self.round_trip("(raw)", id, line).await
    }

    /// Run `command` with `fd` passed along (`SCM_RIGHTS` on the line's first byte), as
    /// `getfd` needs: QEMU keeps its copy under the command's name.
    pub(crate) async fn execute_with_fd<C: Command>(
        &self,
        command: &C,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<C::Output, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = request_line(command, id)?;
        let value = self.round_trip_fd(C::NAME, id, line, Some(fd)).await?;
        serde_json::from_value(value).map_err(|e| QmpError::Protocol {
            message: format!("unexpected return of {}: {e}", C::NAME),
        })
    }

    async fn round_trip(
        &self,
        command: &'static str,
        id: u64,
        line: Vec<u8>,
    ) -> Result<Value, QmpError> {
        self.round_trip_fd(command, id, line, None).await
    }

    async fn round_trip_fd(
        &self,
        command: &'static str,
        id: u64,
        line: Vec<u8>,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if pending.closed {
                return Err(QmpError::Closed);
            }
            pending.waiters.insert(id, tx);
        }
        let written = {
            let mut writer = self.writer.lock().await;
            let rest = match fd {
                None => Ok(&line[..]),
                Some(fd) => send_with_fd(&writer, &line, fd).await.map(|n| &line[n..]),
            };
            match rest {
                Ok(rest) => match writer.write_all(rest).await {
                    Ok(()) => writer.flush().await,
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            lock(&self.pending).waiters.remove(&id);
            return Err(e.into());
        }
        tracing::trace!(command, id, "QMP command sent");
        match rx.await {
            Err(_) => Err(QmpError::Closed),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command,
                class,
                desc,
            }),
            Ok(Ok(value)) => Ok(value),
        }
    }
}

/// Sends what of `line` one `sendmsg` takes, with `fd` attached; returns how much went.
async fn send_with_fd(
    writer: &OwnedWriteHalf,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let stream: &UnixStream = writer.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space =
                [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("no room for the fd"));
            }
            rustix::net::sendmsg(
                stream,
                &[std::io::IoSlice::new(line)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Read one line into `buf`; `false` at end of stream (a partial last line counts as the end).
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, QmpError> {
    buf.clear();
    let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
    let n = (&mut *r).take(limit).read_until(b'\n', buf).await?;
    if n == 0 {
        return Ok(false);
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > MAX_LINE {
            return Err(QmpError::Protocol {
                message: format!("a line longer than {MAX_LINE} bytes"),
            });
        }
        return Ok(false);
    }
    Ok(true)
}

async fn read_loop<R: AsyncBufRead + Unpin, G>(
    mut read: R,
    pending: Arc<Mutex<Pending>>,
    observer: Arc<dyn QmpObserver>,
    guard: G,
) {
    // Whatever ends this task — end of stream, an error, abort — the waiters learn it is closed.
    struct Close<G>(Arc<Mutex<Pending>>, G);
    impl<G> Drop for Close<G> {
        fn drop(&mut self) {
            let mut p = lock(&self.0);
            p.closed = true;
            p.waiters.clear();
        }
    }
    let _close = Close(pending.clone(), guard);
    let mut line = Vec::new();
    loop {
        match read_line(&mut read, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            // A reset is how QEMU's exit often looks from here: the end, not a failure.
            Err(QmpError::Closed) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed");
                break;
            }
        }
        match QmpMessage::parse(&line) {
            Ok(QmpMessage::Return { id, value }) => deliver(&pending, id, Ok(value)),
            Ok(QmpMessage::Error { id, class, desc }) => {
                deliver(&pending, id, Err((class, desc)));
            }
            Ok(QmpMessage::Event(event)) => {
                tracing::debug!(event = %event.name, data = %event.data, "QMP event");
                observer.event(&event);
            }
            Ok(QmpMessage::Greeting(_)) => tracing::warn!("ignoring a second QMP greeting"),
            Err(e) => tracing::warn!(error = %e, "ignoring a QMP line"),
        }
    }
    tracing::debug!("QMP connection closed");
}

fn deliver(pending: &Mutex<Pending>, id: Option<Value>, reply: Reply) {
    let Some(id) = id.as_ref().and_then(Value::as_u64) else {
        tracing::warn!(?id, "QMP reply without one of our ids");
        return;
    };
    // A waiter that gave up (its future was dropped) is simply gone.
    if let Some(tx) = lock(pending).waiters.remove(&id) {
        let _ = tx.send(reply);
    }
}

#[cfg(test)]
#[path = "qmp_tests.rs"]
mod tests;
