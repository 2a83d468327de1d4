//! Logs: the VM's serial console (QEMU's `console.log` in the VM's runtime directory) from its
//! beginning, and the guest agent's forwarded log lines (the last ones the guest link keeps);
//! with `follow`, then new output as it comes until the VM has ended, the VM is removed or the
//! client goes away.
//!
//! Neither follower polls. The console file is written by QEMU, so the follower learns of new
//! output from inotify (a watch on the runtime directory, set before the file is read, so a
//! write between the last read and the wait is not missed; the directory, because the file
//! appears only when QEMU starts). The guest log is forwarded by the guest link, which bumps a
//! counter on every line ([`uvm_guest::VsockGuest::subscribe_log`]). The console file goes with
//! the runtime directory when the VM is released: a terminated VM has none left (a follower that
//! has it open reads it to its end).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt as _, Interest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uvm::State;
use uvm_api::v1;

use crate::supervisor::Shared;

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
            tokio::spawn(follow_guest(shared, request.follow, tx));
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
            // Watching before the first read: nothing written after it is missed.
            let watch = match request.follow {
                true => Some(DirWatch::new(&path).map_err(|e| {
                    Status::internal(format!(
                        "cannot follow the console log of VM {}: {e}",
                        shared.id()
                    ))
                })?),
                false => None,
            };
            tokio::spawn(follow_console(shared, path, watch, tx));
        }
    }
    Ok(ReceiverStream::new(rx))
}

fn ended(state: State) -> bool {
    matches!(state, State::Terminated | State::Invalid)
}

async fn send(tx: &Responses, data: &[u8]) -> bool {
    for chunk in data.chunks(CHUNK) {
        let message = v1::LogsResponse {
            data: chunk.to_vec(),
        };
        if tx.send(Ok(message)).await.is_err() {
            return false;
        }
    }
    true
}

/// Resolves once the VM has ended and its guest log was forwarded (never, if it was removed
/// first: the removal ends the follower anyway).
async fn vm_ended(shared: &Shared, cancel: &CancellationToken) {
    if shared.vm.controller.wait(cancel).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The guest log: the lines kept, then (following) every new one.
async fn follow_guest(shared: Arc<Shared>, follow: bool, tx: Responses) {
    let guest = &shared.vm.guest;
    // Subscribed before the first read: a line forwarded in between is not missed.
    let mut lines = guest.subscribe_log();
    let cancel = shared.removed.child_token();
    let mut ended = std::pin::pin!(vm_ended(&shared, &cancel));
    let mut seen = 0;
    let mut over = false;
    loop {
        let slice = guest.log_after(seen);
        seen = slice.next;
        let mut text = String::new();
        if slice.skipped > 0 {
            text.push_str(&format!(
                "[uvmctl: {} guest log lines were dropped before they could be sent]\n",
                slice.skipped
            ));
        }
        for line in slice.lines {
            text.push_str(&line);
            text.push('\n');
        }
        if !send(&tx, text.as_bytes()).await || !follow || over {
            return;
        }
        tokio::select! {
            r = lines.changed() => if r.is_err() { return },
            // One more round for what came with the end, then done.
            () = &mut ended => over = true,
            () = shared.removed.cancelled() => return,
            () = tx.closed() => return,
        }
    }
}

/// The console file from its beginning; with a watch, new output until the VM has ended.
async fn follow_console(
    shared: Arc<Shared>,
    path: PathBuf,
    mut watch: Option<DirWatch>,
    tx: Responses,
) {
    let cancel = shared.removed.child_token();
    let mut ended = std::pin::pin!(vm_ended(&shared, &cancel));
    let mut over = false;
    let mut file = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        // Everything there is now.
        loop {
            if file.is_none() {
                file = tokio::fs::File::open(&path).await.ok();
            }
            let n = match file.as_mut() {
                Some(f) => f.read(&mut buf).await.unwrap_or(0),
                None => 0,
            };
            if n == 0 {
                break;
            }
            if !send(&tx, &buf[..n]).await {
                return;
            }
        }
        let Some(watch) = watch.as_mut() else {
            return;
        };
        if over || ended_without_output(&shared, file.is_some()) {
            return;
        }
        tokio::select! {
            r = watch.changed() => if let Err(e) = r {
                tracing::warn!(error = %e, "cannot watch the console log; the follow ends");
                return;
            },
            // QEMU has exited: read what it wrote last, then done.
            () = &mut ended => over = true,
            () = shared.removed.cancelled() => return,
            () = tx.closed() => return,
        }
    }
}

/// A VM that ended before its console file was ever opened has no more output to come.
fn ended_without_output(shared: &Shared, opened: bool) -> bool {
    !opened && ended(shared.vm.controller.state())
}

/// An inotify watch on the directory a file is in: it changes when a file in it is created or
/// written.
struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    fn new(file: &Path) -> std::io::Result<DirWatch> {
        use rustix::fs::inotify;
        let dir = file.parent().unwrap_or(Path::new("."));
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::CREATE | inotify::WatchFlags::MODIFY,
        )?;
        // SAFETY: `fd` is an OwnedFd we just made; the AsyncFd owns it from here, and an
        // OwnedFd's `as_raw_fd` is the same open descriptor for as long as it lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(DirWatch { fd })
    }

    /// Resolves once something in the directory was created or written since the last call;
    /// the events themselves are drained (which file does not matter: the caller reads on).
    async fn changed(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
                Ok(Ok(_)) => {
                    // Drain what else is queued, without waiting.
                    while rustix::io::read(self.fd.get_ref(), &mut buf).is_ok() {}
                    return Ok(());
                }
                Ok(Err(e)) => return Err(e),
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[tokio::test]
    async fn a_write_to_a_file_in_the_watched_directory_wakes_the_watch_and_a_created_file_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut watch = DirWatch::new(&path).expect("watch");
        // Created after the watch was set: seen.
        let mut file = std::fs::File::create(&path).expect("create");
        watch.changed().await.expect("created");
        // Written: seen, even though the write came before the wait.
        file.write_all(b"line\n").expect("write");
        watch.changed().await.expect("written");
    }
}
