//! File copies between the host and the guest: [`Controller::copy_in`] and
//! [`Controller::copy_out`], Running only.
//!
//! The arguments are checked before the state (an absolute, normalised path without NUL; mode
//! bits within `0o7777`; a size within the controller's limit), so a bad request is refused the
//! same way in every state. A copy as a whole has no deadline — a large file over a slow link may
//! take long — but each request to the guest has the link's own deadline, and the VM exiting or
//! the link closing ends the copy.

use crate::controller::Controller;
use crate::error::{ControllerError, GuestError};
use crate::seams::{CopySink, CopySource, FileMeta};
use crate::state::Operation;

/// The largest file copied in or out unless [`Controller::set_copy_limit`] says otherwise:
/// 1 GiB. Large enough for binaries and data sets a utility VM is fed, small enough that a
/// mistaken copy of a disk image is refused before it fills the guest's memory-backed root.
pub const DEFAULT_COPY_LIMIT: u64 = 1 << 30;

/// Longest path accepted (Linux's `PATH_MAX`, as the agent bounds it).
const MAX_PATH_BYTES: usize = 4096;

/// Checks a guest path as the agent does: absolute, normalised (no empty, `.` or `..`
/// components, no trailing `/`), without NUL, at most 4096 bytes, and naming something below `/`.
///
/// # Errors
/// [`ControllerError::InvalidArgument`] saying what is wrong.
pub fn check_guest_path(path: &str) -> Result<(), ControllerError> {
    match guest_path_problem(path) {
        None => Ok(()),
        Some(message) => Err(ControllerError::InvalidArgument {
            what: "guest path",
            message,
        }),
    }
}

/// What is wrong with a guest path, as [`check_guest_path`] judges it; `None` when nothing is.
pub(crate) fn guest_path_problem(path: &str) -> Option<String> {
    if path.len() > MAX_PATH_BYTES {
        return Some(format!(
            "{} bytes, at most {MAX_PATH_BYTES} allowed",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Some(format!("{path:?} contains NUL"));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Some(format!("{path:?} is not absolute"));
    };
    if rest.is_empty() {
        return Some("\"/\" names no file".into());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some(format!(
            "{path:?} is not normalised (empty, \".\" or \"..\" components)"
        ));
    }
    None
}

fn check_mode(mode: u32) -> Result<(), ControllerError> {
    if mode & !0o7777 != 0 {
        return Err(ControllerError::InvalidArgument {
            what: "mode",
            message: format!("{mode:#o} has bits outside 0o7777"),
        });
    }
    Ok(())
}

impl Controller {
    /// The largest file [`Controller::copy_in`] and [`Controller::copy_out`] accept.
    pub fn copy_limit(&self) -> u64 {
        self.core().copy_limit
    }

    /// Changes the largest file copied in or out (default [`DEFAULT_COPY_LIMIT`]).
    pub fn set_copy_limit(&self, bytes: u64) {
        self.core().copy_limit = bytes;
    }

    /// Write `size` bytes from `source` to `path` in the guest with permission bits `mode`;
    /// a file already there is replaced, atomically (a failed copy leaves no partial file).
    /// Exactly `size` bytes are read from `source`. Running only; the arguments are checked
    /// first, and a size above [`Controller::copy_limit`] is refused before anything is read.
    ///
    /// # Errors
    /// [`ControllerError::InvalidArgument`] for a bad path or mode, [`ControllerError::TooLarge`]
    /// above the limit, [`ControllerError::WrongState`] outside Running, or
    /// [`ControllerError::Guest`] with the guest's refusal (its [`crate::Rejection`]), a source
    /// that ended early ([`GuestError::Io`]) or a link failure.
    #[tracing::instrument(skip_all, fields(vm = %self.id(), op = "copy_in", path, size))]
    pub async fn copy_in(
        &self,
        path: &str,
        mode: u32,
        size: u64,
        source: CopySource<'_>,
    ) -> Result<(), ControllerError> {
        check_guest_path(path)?;
        check_mode(mode)?;
        let limit = self.copy_limit();
        if size > limit {
            return Err(ControllerError::TooLarge {
                what: "file",
                size,
                limit,
            });
        }
        self.running_vm(Operation::CopyIn)?;
        self.files_supported(Operation::CopyIn)?;
        self.inner
            .guest
            .copy_in(path, FileMeta { mode, size }, source)
            .await
            .map_err(|e| self.guest_error(Operation::CopyIn, e))
    }

    /// Read the regular file `path` out of the guest into `sink`; `on_header` gets its mode and
    /// size before any data is written. Running only; a file above [`Controller::copy_limit`] is
    /// refused by the guest before any data.
    ///
    /// # Errors
    /// [`ControllerError::InvalidArgument`] for a bad path, [`ControllerError::WrongState`]
    /// outside Running, or [`ControllerError::Guest`] with the guest's refusal (not found, not a
    /// regular file, [`crate::Rejection::ResourceExhausted`] above the limit), a failing sink or
    /// a link failure.
    #[tracing::instrument(skip_all, fields(vm = %self.id(), op = "copy_out", path))]
    pub async fn copy_out(
        &self,
        path: &str,
        on_header: &mut (dyn FnMut(FileMeta) + Send),
        sink: CopySink<'_>,
    ) -> Result<FileMeta, ControllerError> {
        check_guest_path(path)?;
        let limit = self.copy_limit();
        self.running_vm(Operation::CopyOut)?;
        self.files_supported(Operation::CopyOut)?;
        self.inner
            .guest
            .copy_out(path, limit, on_header, sink)
            .await
            .map_err(|e| self.guest_error(Operation::CopyOut, e))
    }

    fn files_supported(&self, operation: Operation) -> Result<(), ControllerError> {
        if self.inner.guest.capabilities().files() {
            return Ok(());
        }
        Err(self.guest_error(
            operation,
            GuestError::Unsupported {
                operation: "file copies",
            },
        ))
    }
}
