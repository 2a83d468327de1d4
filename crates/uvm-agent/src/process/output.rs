//! Bounded output buffers of a process (stdout / stderr / pty), filled by a pump task and
//! drained by `ReadOutput` long-polls.
//!
//! When a buffer is full the pump stops reading, so the pipe fills and the child blocks on its
//! next write: back-pressure instead of unbounded memory. The pump also stops when the process
//! is forgotten (its `stop` channel closes), which closes our read end.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Mutex, MutexGuard};

use tokio::io::Interest;
use tokio::sync::{watch, Notify};

use crate::warn;

/// Bytes read from the fd in one go.
const READ_CHUNK: usize = 64 * 1024;

/// One output stream's buffered bytes and EOF flag.
#[derive(Debug)]
pub struct OutputBuf {
    state: Mutex<OutState>,
    /// Data or EOF arrived.
    changed: Notify,
    /// Data was taken (room for the pump).
    drained: Notify,
    limit: usize,
}

#[derive(Debug, Default)]
struct OutState {
    data: Vec<u8>,
    eof: bool,
}

impl OutputBuf {
    /// An empty, open buffer holding at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        OutputBuf {
            state: Mutex::new(OutState::default()),
            changed: Notify::new(),
            drained: Notify::new(),
            limit: limit.max(1),
        }
    }

    /// A buffer that is at EOF from the start (stderr of a terminal process).
    pub fn finished() -> Self {
        let buf = OutputBuf::new(1);
        buf.lock().eof = true;
        buf
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        uvm_util::lock(&self.state)
    }

    /// Waits until some bytes are buffered or the stream ended, then takes up to `max` bytes.
    /// Returns `(data, eof)` with `eof` true once everything was taken and the stream ended.
    ///
    /// Cancel-safe: bytes are taken only in the synchronous step after the wait.
    pub async fn read(&self, max: usize) -> (Vec<u8>, bool) {
        let max = max.max(1);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.lock();
                if !state.data.is_empty() {
                    let data = if state.data.len() <= max {
                        std::mem::take(&mut state.data)
                    } else {
                        let rest = state.data.split_off(max);
                        std::mem::replace(&mut state.data, rest)
                    };
                    let eof = state.eof && state.data.is_empty();
                    drop(state);
                    self.drained.notify_waiters();
                    return (data, eof);
                }
                if state.eof {
                    return (Vec::new(), true);
                }
            }
            notified.await;
        }
    }

    /// Waits until the stream ended and every byte was taken by a reader.
    pub async fn until_drained(&self) {
        loop {
            let changed = self.changed.notified();
            let drained = self.drained.notified();
            tokio::pin!(changed, drained);
            changed.as_mut().enable();
            drained.as_mut().enable();
            {
                let state = self.lock();
                if state.eof && state.data.is_empty() {
                    return;
                }
            }
            tokio::select! {
                () = changed => {}
                () = drained => {}
            }
        }
    }

    /// Bytes currently buffered (for diagnostics).
    pub fn buffered(&self) -> usize {
        self.lock().data.len()
    }

    fn set_eof(&self) {
        self.lock().eof = true;
        self.changed.notify_waiters();
    }

    async fn wait_for_room(&self) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().data.len() < self.limit {
                return;
            }
            notified.await;
        }
    }

    /// One non-blocking read from `fd` straight into the buffer. `Ok(0)` is EOF.
    fn read_from(&self, fd: &OwnedFd) -> io::Result<usize> {
        let mut state = self.lock();
        let start = state.data.len();
        let room = self.limit.saturating_sub(start).min(READ_CHUNK);
        state.data.resize(start + room, 0);
        let result = rustix::io::read(fd, &mut state.data[start..]).map_err(io::Error::from);
        let got = *result.as_ref().unwrap_or(&0);
        state.data.truncate(start + got);
        drop(state);
        if got > 0 {
            self.changed.notify_waiters();
        }
        result
    }
}

/// Copies `fd` into `buf` until EOF (or `EIO`, what a pty master reads once every slave end is
/// closed), a read error, or `stop` closing. Marks `buf` at EOF in every case.
pub async fn pump(fd: OwnedFd, buf: std::sync::Arc<OutputBuf>, mut stop: watch::Receiver<()>) {
    if let Err(e) = pump_inner(fd, &buf, &mut stop).await {
        warn!("output pump stopped: {e}");
    }
    buf.set_eof();
}

async fn pump_inner(
    fd: OwnedFd,
    buf: &OutputBuf,
    stop: &mut watch::Receiver<()>,
) -> io::Result<()> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    let fd = super::register_fd(fd, Interest::READABLE)?;
    loop {
        tokio::select! {
            () = buf.wait_for_room() => {}
            _ = stop.changed() => return Ok(()),
        }
        let mut guard = tokio::select! {
            guard = fd.readable() => guard?,
            _ = stop.changed() => return Ok(()),
        };
        match guard.try_io(|inner| buf.read_from(inner.get_ref())) {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn read_returns_at_most_max_and_eof_with_the_last_bytes() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let buf = Arc::new(OutputBuf::new(1024));
        let (_stop_tx, stop_rx) = watch::channel(());
        let task = tokio::spawn(pump(r, buf.clone(), stop_rx));
        rustix::io::write(&w, b"hello world").expect("write");
        drop(w);
        task.await.expect("pump task");
        assert_eq!(buf.read(5).await, (b"hello".to_vec(), false));
        assert_eq!(buf.read(100).await, (b" world".to_vec(), true));
        assert_eq!(buf.read(100).await, (Vec::new(), true));
    }

    #[tokio::test]
    async fn a_full_buffer_back_pressures_the_writer() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let buf = Arc::new(OutputBuf::new(8));
        let (_stop_tx, stop_rx) = watch::channel(());
        tokio::spawn(pump(r, buf.clone(), stop_rx));
        rustix::io::write(&w, b"0123456789abcdef").expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(buf.buffered(), 8);
        drop(w);
        let mut all = Vec::new();
        loop {
            let (data, eof) = buf.read(3).await;
            all.extend(data);
            if eof {
                break;
            }
        }
        assert_eq!(all, b"0123456789abcdef");
    }

    #[tokio::test]
    async fn closing_stop_ends_the_pump_at_eof() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let buf = Arc::new(OutputBuf::new(8));
        let (stop_tx, stop_rx) = watch::channel(());
        let task = tokio::spawn(pump(r, buf.clone(), stop_rx));
        drop(stop_tx);
        task.await.expect("pump task");
        assert_eq!(buf.read(3).await, (Vec::new(), true));
    }

    #[tokio::test]
    async fn finished_buffers_are_at_eof() {
        assert_eq!(OutputBuf::finished().read(3).await, (Vec::new(), true));
    }
}
