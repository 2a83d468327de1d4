//! Files copied between the host and the guest: the `OpenWrite` / `WriteChunk` / `CommitWrite`
//! and `OpenRead` / `ReadChunk` / `CloseFile` requests, through a table of handles.
//!
//! A write goes to a temporary file next to its target (`.<name>.uvm-copy-<handle>`, created
//! exclusively, mode 0600), and only `CommitWrite` — after checking that exactly the declared size
//! arrived — sets the mode, fsyncs, renames it into place and fsyncs the directory. A write that
//! never commits (the host gave up, failed, or went away) is removed when its handle is dropped:
//! by `CloseFile`, or by the sweeper once the handle was idle for [`FileLimits::idle`]. ttrpc does
//! not tell a handler which connection it serves nor when that connection ends, so idleness is
//! what "the host went away" means here; the table also bounds how many files are open at once.
//!
//! The host is trusted less than the guest's own files deserve: every path is checked (absolute,
//! normalised, no NUL, bounded), every chunk bounded, offsets sequential and within the declared
//! size. File I/O runs on the blocking pool, so a slow disk never stalls the other requests.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use uvm_agent_proto::{FILE_IDLE_TIMEOUT_SECS, MAX_FILE_CHUNK, MAX_OPEN_FILES, MAX_PATH_BYTES};
use uvm_util::lock;

use crate::error::ApiError;

/// Bounds of the file table.
#[derive(Debug, Clone, Copy)]
pub struct FileLimits {
    /// Files open at once.
    pub max_open: usize,
    /// A handle unused this long is dropped (its unfinished write removed).
    pub idle: Duration,
}

impl Default for FileLimits {
    fn default() -> Self {
        FileLimits {
            max_open: MAX_OPEN_FILES,
            idle: Duration::from_secs(FILE_IDLE_TIMEOUT_SECS),
        }
    }
}

/// A file being written: the temporary file and where it goes.
#[derive(Debug)]
struct Writer {
    file: File,
    temp: PathBuf,
    target: PathBuf,
    mode: u32,
    size: u64,
    written: u64,
    committed: bool,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: the file is ours, nobody else knows its name.
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A file being read.
#[derive(Debug)]
struct Reader {
    file: File,
    path: String,
}

#[derive(Debug, Clone)]
enum Open {
    Write(Arc<Mutex<Writer>>),
    Read(Arc<Mutex<Reader>>),
}

#[derive(Debug)]
struct Entry {
    last_used: Instant,
    open: Open,
}

#[derive(Debug, Default)]
struct Table {
    next: u64,
    open: HashMap<String, Entry>,
}

/// What `OpenRead` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOpened {
    /// The new handle.
    pub handle: String,
    /// Permission bits.
    pub mode: u32,
    /// Size at open.
    pub size: u64,
}

/// The table of open files.
#[derive(Debug)]
pub struct Files {
    limits: FileLimits,
    table: Mutex<Table>,
}

impl Files {
    /// An empty table with `limits`.
    pub fn new(limits: FileLimits) -> Arc<Files> {
        Arc::new(Files {
            limits,
            table: Mutex::new(Table::default()),
        })
    }

    /// Drops handles idle for longer than the limit, every quarter of it, until `files` is gone.
    pub async fn sweep(files: Weak<Files>) {
        let period = match files.upgrade() {
            Some(f) => (f.limits.idle / 4).max(Duration::from_millis(10)),
            None => return,
        };
        loop {
            tokio::time::sleep(period).await;
            let Some(files) = files.upgrade() else { return };
            files.expire(Instant::now());
        }
    }

    /// Drops the handles last used before `now - idle`; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let idle = self.limits.idle;
        // Dropped outside the lock: a writer's drop removes its file.
        let expired: Vec<Entry> = {
            let mut t = lock(&self.table);
            let stale: Vec<String> = t
                .open
                .iter()
                .filter(|(_, e)| now.saturating_duration_since(e.last_used) >= idle)
                .map(|(h, _)| h.clone())
                .collect();
            stale.iter().filter_map(|h| t.open.remove(h)).collect()
        };
        expired.len()
    }

    /// How many handles are open.
    pub fn open_count(&self) -> usize {
        lock(&self.table).open.len()
    }

    fn insert(
        &self,
        make: impl FnOnce(&str) -> Result<Open, ApiError>,
    ) -> Result<String, ApiError> {
        let handle = {
            let mut t = lock(&self.table);
            if t.open.len() >= self.limits.max_open {
                return Err(ApiError::TooManyFiles {
                    limit: self.limits.max_open,
                });
            }
            t.next += 1;
            format!("f{}", t.next)
        };
        let open = make(&handle)?;
        let mut t = lock(&self.table);
        if t.open.len() >= self.limits.max_open {
            return Err(ApiError::TooManyFiles {
                limit: self.limits.max_open,
            });
        }
        t.open.insert(
            handle.clone(),
            Entry {
                last_used: Instant::now(),
                open,
            },
        );
        Ok(handle)
    }

    fn get(&self, handle: &str) -> Result<Open, ApiError> {
        let mut t = lock(&self.table);
        let entry = t.open.get_mut(handle).ok_or_else(|| unknown(handle))?;
        entry.last_used = Instant::now();
        Ok(entry.open.clone())
    }

    /// `OpenWrite`: a temporary file next to `path`, for `size` bytes with `mode`.
    pub async fn open_write(&self, path: &str, mode: u32, size: u64) -> Result<String, ApiError> {
        let target = check_path("path", path)?;
        if mode & !0o7777 != 0 {
            return Err(ApiError::invalid(
                "mode",
                format!("{mode:#o} has bits outside 07777"),
            ));
        }
        let (parent, name) = split(&target)?;
        blocking(move || check_write_target(&parent, &target)).await?;
        let target = PathBuf::from(path);
        self.insert(|handle| {
            let (parent, _) = split(&target)?;
            let temp = parent.join(format!(".{name}.uvm-copy-{handle}"));
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
                .map_err(|source| ApiError::File {
                    op: "create",
                    path: temp.display().to_string(),
                    source,
                })?;
            Ok(Open::Write(Arc::new(Mutex::new(Writer {
                file,
                temp,
                target,
                mode,
                size,
                written: 0,
                committed: false,
            }))))
        })
    }

    /// `WriteChunk`: `data` at `offset`, which must follow what was written.
    pub async fn write_chunk(
        &self,
        handle: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), ApiError> {
        if data.len() > MAX_FILE_CHUNK as usize {
            return Err(ApiError::invalid(
                "data",
                format!("{} bytes, at most {MAX_FILE_CHUNK} allowed", data.len()),
            ));
        }
        let Open::Write(writer) = self.get(handle)? else {
            return Err(ApiError::WrongHandle {
                handle: handle.to_owned(),
                expected: "write",
            });
        };
        blocking(move || {
            let mut w = lock(&writer);
            if offset != w.written {
                return Err(ApiError::invalid(
                    "offset",
                    format!("{offset}, the next byte to write is {}", w.written),
                ));
            }
            let len = data.len() as u64;
            let end = offset.checked_add(len).filter(|end| *end <= w.size);
            let Some(end) = end else {
                return Err(ApiError::invalid(
                    "data",
                    format!(
                        "{len} bytes at {offset} go beyond the declared size {}",
                        w.size
                    ),
                ));
            };
            w.file
                .write_all_at(&data, offset)
                .map_err(|source| ApiError::File {
                    op: "write",
                    path: w.target.display().to_string(),
                    source,
                })?;
            w.written = end;
            Ok(())
        })
        .await
    }

    /// `CommitWrite`: the declared size arrived; mode, fsync, rename into place.
    pub async fn commit_write(&self, handle: &str) -> Result<(), ApiError> {
        let writer = {
            let mut t = lock(&self.table);
            match t.open.get(handle).map(|e| &e.open) {
                None => return Err(unknown(handle)),
                Some(Open::Read(_)) => {
                    return Err(ApiError::WrongHandle {
                        handle: handle.to_owned(),
                        expected: "write",
                    })
                }
                Some(Open::Write(w)) => {
                    let w = w.clone();
                    t.open.remove(handle);
                    w
                }
            }
        };
        let handle = handle.to_owned();
        blocking(move || {
            let mut w = lock(&writer);
            if w.written != w.size {
                return Err(ApiError::SizeMismatch {
                    handle,
                    written: w.written,
                    size: w.size,
                });
            }
            let file_err = |op: &'static str, path: &Path| {
                let path = path.display().to_string();
                move |source| ApiError::File { op, path, source }
            };
            let target = w.target.clone();
            w.file
                .set_permissions(std::fs::Permissions::from_mode(w.mode))
                .map_err(file_err("chmod", &target))?;
            w.file.sync_all().map_err(file_err("fsync", &target))?;
            std::fs::rename(&w.temp, &target).map_err(file_err("rename", &target))?;
            w.committed = true;
            // The rename is durable once the directory is: a copy that returned survives a crash.
            if let Some(parent) = target.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(file_err("fsync the directory of", &target))?;
            }
            Ok(())
        })
        .await
    }

    /// `OpenRead`: a regular file of at most `max_size` bytes.
    pub async fn open_read(&self, path: &str, max_size: u64) -> Result<ReadOpened, ApiError> {
        let target = check_path("path", path)?;
        let path = path.to_owned();
        let opened_path = path.clone();
        let (file, mode, size) = blocking(move || {
            let err = |op| {
                let path = path.clone();
                move |source| ApiError::File { op, path, source }
            };
            // O_NONBLOCK: opening a FIFO must not wait for a writer; refused below anyway.
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&target)
                .map_err(err("open"))?;
            let meta = file.metadata().map_err(err("stat"))?;
            if !meta.is_file() {
                return Err(ApiError::NotRegular { path });
            }
            if meta.len() > max_size {
                return Err(ApiError::FileTooLarge {
                    path,
                    size: meta.len(),
                    limit: max_size,
                });
            }
            Ok((file, meta.mode() & 0o7777, meta.len()))
        })
        .await?;
        let reader = Reader {
            file,
            path: opened_path,
        };
        let handle = self.insert(|_| Ok(Open::Read(Arc::new(Mutex::new(reader)))))?;
        Ok(ReadOpened { handle, mode, size })
    }

    /// `ReadChunk`: up to `max_bytes` (0: [`MAX_FILE_CHUNK`]) from `offset`; short only at EOF.
    pub async fn read_chunk(
        &self,
        handle: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<Vec<u8>, ApiError> {
        let max = match max_bytes {
            0 => MAX_FILE_CHUNK,
            n if n > MAX_FILE_CHUNK => {
                return Err(ApiError::invalid(
                    "max_bytes",
                    format!("{n}, at most {MAX_FILE_CHUNK} allowed"),
                ))
            }
            n => n,
        };
        let Open::Read(reader) = self.get(handle)? else {
            return Err(ApiError::WrongHandle {
                handle: handle.to_owned(),
                expected: "read",
            });
        };
        blocking(move || {
            let r = lock(&reader);
            let mut buf = vec![0u8; max as usize];
            let mut filled = 0;
            while filled < buf.len() {
                let at = offset.saturating_add(filled as u64);
                match r.file.read_at(&mut buf[filled..], at) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(ApiError::File {
                            op: "read",
                            path: r.path.clone(),
                            source,
                        })
                    }
                }
            }
            buf.truncate(filled);
            Ok(buf)
        })
        .await
    }

    /// `CloseFile`: forgets `handle`; an uncommitted write is removed.
    pub fn close(&self, handle: &str) -> Result<(), ApiError> {
        let entry = lock(&self.table).open.remove(handle);
        entry.map(drop).ok_or_else(|| unknown(handle))
    }
}

fn unknown(handle: &str) -> ApiError {
    ApiError::UnknownHandle {
        handle: handle.to_owned(),
    }
}

/// Runs file I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::File {
            op: "run file I/O",
            path: String::new(),
            source: io::Error::other(e.to_string()),
        })
    })
}

/// An absolute, normalised path without NUL, naming something below `/`.
pub fn check_path(field: &'static str, path: &str) -> Result<PathBuf, ApiError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(ApiError::invalid(
            field,
            format!("{} bytes, at most {MAX_PATH_BYTES} allowed", path.len()),
        ));
    }
    if path.contains('\0') {
        return Err(ApiError::invalid(field, format!("{path:?} contains NUL")));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} is not absolute"),
        ));
    };
    if rest.is_empty() {
        return Err(ApiError::invalid(field, "\"/\" names no file"));
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ApiError::invalid(
            field,
            format!("{path:?} is not normalised (empty, \".\" or \"..\" components)"),
        ));
    }
    Ok(PathBuf::from(path))
}

/// The parent directory and the file name of a checked path.
fn split(path: &Path) -> Result<(PathBuf, String), ApiError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_owned(), name.to_string_lossy().into_owned())),
        _ => Err(ApiError::invalid("path", "names no file")),
    }
}

/// The parent must be a directory, the target must not be one.
fn check_write_target(parent: &Path, target: &Path) -> Result<(), ApiError> {
    let meta = std::fs::metadata(parent).map_err(|source| ApiError::File {
        op: "find the parent directory of",
        path: target.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(ApiError::NotADirectory {
            path: parent.display().to_string(),
        });
    }
    match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => Err(ApiError::IsADirectory {
            path: target.display().to_string(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Arc<Files> {
        Files::new(FileLimits {
            max_open: 2,
            idle: Duration::from_secs(60),
        })
    }

    #[test]
    fn paths_must_be_absolute_normalised_and_free_of_nul() {
        for bad in [
            "", "rel/x", "/", "/a//b", "/a/./b", "/a/../b", "/a/", "/a\0b",
        ] {
            assert!(
                matches!(
                    check_path("path", bad),
                    Err(ApiError::InvalidArgument { .. })
                ),
                "{bad:?} accepted"
            );
        }
        assert_eq!(
            check_path("path", "/a/b").expect("fine"),
            PathBuf::from("/a/b")
        );
    }

    #[tokio::test]
    async fn an_uncommitted_write_leaves_nothing_once_closed_or_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files();
        let target = dir.path().join("x");
        let path = target.to_str().expect("utf-8");
        let h = f.open_write(path, 0o640, 4).await.expect("open");
        f.write_chunk(&h, 0, b"ab".to_vec()).await.expect("write");
        f.close(&h).expect("close");
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);

        let h = f.open_write(path, 0o640, 4).await.expect("open");
        f.write_chunk(&h, 0, b"ab".to_vec()).await.expect("write");
        assert_eq!(f.expire(Instant::now() + Duration::from_secs(61)), 1);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
        assert!(matches!(
            f.write_chunk(&h, 2, b"cd".to_vec()).await,
            Err(ApiError::UnknownHandle { .. })
        ));
    }

    #[tokio::test]
    async fn a_commit_needs_the_whole_declared_size_and_sets_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files();
        let target = dir.path().join("x");
        let path = target.to_str().expect("utf-8");
        std::fs::write(&target, b"old").expect("old file");
        let h = f.open_write(path, 0o751, 4).await.expect("open");
        f.write_chunk(&h, 0, b"ab".to_vec()).await.expect("write");
        assert!(matches!(
            f.write_chunk(&h, 1, b"cd".to_vec()).await,
            Err(ApiError::InvalidArgument {
                field: "offset",
                ..
            })
        ));
        assert!(matches!(
            f.write_chunk(&h, 2, b"cde".to_vec()).await,
            Err(ApiError::InvalidArgument { field: "data", .. })
        ));
        let short = f.open_write(path, 0o600, 9).await.expect("open");
        assert!(matches!(
            f.commit_write(&short).await,
            Err(ApiError::SizeMismatch {
                written: 0,
                size: 9,
                ..
            })
        ));
        f.write_chunk(&h, 2, b"cd".to_vec()).await.expect("write");
        f.commit_write(&h).await.expect("commit");
        assert_eq!(std::fs::read(&target).expect("read"), b"abcd");
        let mode = std::fs::metadata(&target).expect("stat").mode() & 0o7777;
        assert_eq!(mode, 0o751);
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
        assert_eq!(f.open_count(), 0);
    }

    #[tokio::test]
    async fn reads_refuse_directories_large_files_and_too_many_handles() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = files();
        let d = dir.path().to_str().expect("utf-8");
        assert!(matches!(
            f.open_read(d, 10).await,
            Err(ApiError::NotRegular { .. })
        ));
        let file = dir.path().join("x");
        std::fs::write(&file, b"hello").expect("write");
        let p = file.to_str().expect("utf-8");
        assert!(matches!(
            f.open_read(p, 4).await,
            Err(ApiError::FileTooLarge {
                size: 5,
                limit: 4,
                ..
            })
        ));
        let missing = f.open_read(&format!("{d}/nope"), 4).await;
        assert!(matches!(&missing, Err(e) if e.code() == uvm_agent_proto::ttrpc::Code::NOT_FOUND));
        let a = f.open_read(p, 5).await.expect("open");
        assert_eq!(a.size, 5);
        assert_eq!(f.read_chunk(&a.handle, 1, 3).await.expect("read"), b"ell");
        assert_eq!(f.read_chunk(&a.handle, 4, 0).await.expect("read"), b"o");
        let _b = f.open_read(p, 5).await.expect("open");
        assert!(matches!(
            f.open_read(p, 5).await,
            Err(ApiError::TooManyFiles { limit: 2 })
        ));
    }
}
