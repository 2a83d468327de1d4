//! The errors the API returns, and their mapping to ttrpc status codes (the host matches on the
//! code; the message is for people and carries the whole `source` chain).

use std::io;

use uvm_agent_proto::ttrpc::{self, Code};
use uvm_policy::PolicyError;
use uvm_util::error_chain;

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The host speaks another protocol version.
    #[error("protocol version mismatch: the host speaks v{host}, this agent speaks v{agent}")]
    ProtocolMismatch {
        /// The host's version.
        host: u32,
        /// Ours.
        agent: u32,
    },
    /// No tracked process has this id (never existed, or already waited for).
    #[error("no process with exec_id {exec_id:?}")]
    UnknownExecId {
        /// The id asked for.
        exec_id: String,
    },
    /// A request field is malformed or too large.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The process table is full.
    #[error("too many processes: at most {limit} can be tracked at once (wait for some first)")]
    TooManyProcesses {
        /// The bound.
        limit: usize,
    },
    /// `fork`/`exec` failed.
    #[error("cannot start {program:?}")]
    Spawn {
        /// `args[0]`.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The requested working directory is missing or not a directory.
    #[error("cannot start {program:?} in {dir:?}")]
    WorkDir {
        /// `args[0]`.
        program: String,
        /// The requested working directory.
        dir: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A terminal operation on a process without one.
    #[error("process {exec_id:?} has no terminal")]
    NotATerminal {
        /// The process.
        exec_id: String,
    },
    /// A terminal's size could not be set.
    #[error("cannot resize the terminal")]
    Resize {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No pseudo-terminal could be set up.
    #[error("cannot allocate a pseudo-terminal")]
    Pty {
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The process was started without a stdin pipe.
    #[error("process {exec_id:?} was started without stdin")]
    NoStdin {
        /// The process.
        exec_id: String,
    },
    /// Stdin was closed by `CloseStdin`, or the process closed its end.
    #[error("stdin of process {exec_id:?} is closed")]
    StdinClosed {
        /// The process.
        exec_id: String,
    },
    /// Writing to stdin failed otherwise.
    #[error("cannot write to the stdin of process {exec_id:?}")]
    StdinWrite {
        /// The process.
        exec_id: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `kill(2)` failed.
    #[error("cannot send signal {signal} to process {exec_id:?}")]
    Signal {
        /// The process.
        exec_id: String,
        /// The signal number.
        signal: i32,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
    /// No open file has this handle (never opened, closed, committed or expired).
    #[error("no open file with handle {handle:?}")]
    UnknownHandle {
        /// The handle asked for.
        handle: String,
    },
    /// A read request on a write handle, or the reverse.
    #[error("file handle {handle:?} is not open for {expected}")]
    WrongHandle {
        /// The handle.
        handle: String,
        /// What the request needs (`read`, `write`).
        expected: &'static str,
    },
    /// The file table is full.
    #[error("too many open files: at most {limit} at once (close or commit some first)")]
    TooManyFiles {
        /// The bound.
        limit: usize,
    },
    /// A file to read is larger than the host accepts.
    #[error("{path} has {size} bytes, above the limit of {limit}")]
    FileTooLarge {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// The host's limit.
        limit: u64,
    },
    /// A file to read is not a regular file.
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The file.
        path: String,
    },
    /// A file to write would replace a directory.
    #[error("{path} is a directory")]
    IsADirectory {
        /// The path.
        path: String,
    },
    /// The parent of a file to write is not a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The parent.
        path: String,
    },
    /// A commit before the declared size was written.
    #[error("file handle {handle:?} got {written} of its {size} bytes")]
    SizeMismatch {
        /// The handle.
        handle: String,
        /// Bytes written.
        written: u64,
        /// Bytes declared.
        size: u64,
    },
    /// A file system call failed.
    #[error("cannot {op} {path}")]
    File {
        /// What was attempted.
        op: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A disk that did not appear in time, or a partition it does not have.
    #[error("{what}")]
    NoDevice {
        /// What is missing, and for how long it was awaited.
        what: String,
    },
    /// A disk (or partition) without a filesystem the guest knows.
    #[error("{device} holds no filesystem the guest knows (ext4, xfs, vfat)")]
    NoFilesystem {
        /// The device.
        device: String,
    },
    /// An unmount where nothing is mounted.
    #[error("nothing is mounted at {path}")]
    NotMounted {
        /// The guest path.
        path: String,
    },
    /// In use: a mount something still holds, a mount point already taken. Retryable.
    #[error("{what}")]
    Busy {
        /// What is busy, and with what.
        what: String,
    },
    /// A mount, an unmount, or a device's sysfs control failed.
    #[error("cannot {op} {target}")]
    Mount {
        /// What was attempted.
        op: &'static str,
        /// The guest path or device.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A share could not be mounted or unmounted.
    #[error(transparent)]
    Share(#[from] crate::mounts::share::ShareError),
    /// The security policy denied the request.
    #[error(transparent)]
    Denied(#[from] uvm_policy::Denial),
    /// A policy or fragment was not taken.
    #[error(transparent)]
    Policy(#[from] uvm_policy::PolicyError),
    /// `SetPolicy` when a policy is in force already.
    #[error("a security policy is set already: it is set once, at start (fragments add to it)")]
    PolicySet,
    /// `AddPolicyFragment` without a policy.
    #[error("no security policy is set: a fragment adds to one")]
    NoPolicy,
    /// A netlink request failed (the kernel's refusal, or the socket).
    #[error("cannot {op} {target}: {reason}")]
    Network {
        /// What was attempted.
        op: &'static str,
        /// The interface or object.
        target: String,
        /// The kernel's errno, 0 when there was none.
        errno: i32,
        /// What netlink said.
        reason: String,
    },
    /// A `/proc` file could not be read or understood.
    #[error("cannot read {what}")]
    Proc {
        /// Which file.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ApiError {
    /// The ttrpc status code the host sees.
    pub fn code(&self) -> Code {
        match self {
            ApiError::ProtocolMismatch { .. }
            | ApiError::NotATerminal { .. }
            | ApiError::NoStdin { .. }
            | ApiError::StdinClosed { .. } => Code::FAILED_PRECONDITION,
            ApiError::UnknownExecId { .. } | ApiError::UnknownHandle { .. } => Code::NOT_FOUND,
            ApiError::WrongHandle { .. } => Code::INVALID_ARGUMENT,
            ApiError::TooManyFiles { .. } | ApiError::FileTooLarge { .. } => {
                Code::RESOURCE_EXHAUSTED
            }
            ApiError::NotRegular { .. }
            | ApiError::IsADirectory { .. }
            | ApiError::NotADirectory { .. }
            | ApiError::SizeMismatch { .. } => Code::FAILED_PRECONDITION,
            ApiError::File { source, .. } => file_code(source),
            ApiError::NoDevice { .. }
            | ApiError::NoFilesystem { .. }
            | ApiError::NotMounted { .. } => Code::NOT_FOUND,
            // The host's Busy: retry once the guest lets go.
            ApiError::Busy { .. } => Code::UNAVAILABLE,
            ApiError::Mount { source, .. } => mount_code(source),
            ApiError::InvalidArgument { .. } => Code::INVALID_ARGUMENT,
            ApiError::TooManyProcesses { .. } => Code::RESOURCE_EXHAUSTED,
            // The request is fine; the guest's file system does not fit it.
            ApiError::WorkDir { .. } => Code::FAILED_PRECONDITION,
            ApiError::Spawn { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => Code::NOT_FOUND,
                io::ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
                io::ErrorKind::InvalidInput => Code::INVALID_ARGUMENT,
                _ => Code::INTERNAL,
            },
            ApiError::Share(e) => e.code(),
            ApiError::Denied(_) => Code::PERMISSION_DENIED,
            ApiError::Policy(e) => match e {
                PolicyError::Compile { .. }
                | PolicyError::BasePackage { .. }
                | PolicyError::FragmentPackage { .. } => Code::INVALID_ARGUMENT,
                PolicyError::FragmentExists { .. } => Code::FAILED_PRECONDITION,
                PolicyError::FragmentRefused { .. } => Code::PERMISSION_DENIED,
            },
            ApiError::PolicySet | ApiError::NoPolicy => Code::FAILED_PRECONDITION,
            ApiError::Network { errno, .. } => match *errno {
                libc::EINVAL | libc::ERANGE | libc::EAFNOSUPPORT | libc::ENETUNREACH => {
                    Code::INVALID_ARGUMENT
                }
                libc::ENODEV | libc::ENOENT => Code::NOT_FOUND,
                libc::EPERM | libc::EACCES => Code::PERMISSION_DENIED,
                _ => Code::INTERNAL,
            },
            ApiError::Pty { .. }
            | ApiError::Resize { .. }
            | ApiError::StdinWrite { .. }
            | ApiError::Signal { .. }
            | ApiError::Proc { .. } => Code::INTERNAL,
        }
    }

    /// Shorthand for [`ApiError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

/// The code of a failed file system call: what the host may act on.
fn file_code(e: &io::Error) -> Code {
    match e.raw_os_error() {
        Some(libc::ENOENT) => Code::NOT_FOUND,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => Code::PERMISSION_DENIED,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => Code::RESOURCE_EXHAUSTED,
        Some(libc::ENOTDIR | libc::EISDIR | libc::ELOOP | libc::ETXTBSY) => {
            Code::FAILED_PRECONDITION
        }
        Some(libc::ENAMETOOLONG) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    }
}

/// The code of a failed mount, unmount or device control: what the host may act on.
fn mount_code(e: &io::Error) -> Code {
    match e.raw_os_error() {
        Some(libc::EBUSY) => Code::UNAVAILABLE,
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO | libc::ENOTBLK) => Code::NOT_FOUND,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => Code::PERMISSION_DENIED,
        Some(libc::EINVAL | libc::ENAMETOOLONG | libc::ENOTDIR) => Code::INVALID_ARGUMENT,
        _ => Code::INTERNAL,
    }
}

impl From<ApiError> for ttrpc::Error {
    fn from(e: ApiError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_carries_code_and_source_chain() {
        let e = ApiError::Spawn {
            program: "nope".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let ttrpc::Error::RpcStatus(status) = ttrpc::Error::from(e) else {
            panic!("not a status");
        };
        assert_eq!(status.code(), Code::NOT_FOUND);
        assert!(status.message().starts_with("cannot start \"nope\": "));
    }

    #[test]
    fn mount_failures_map_to_what_the_host_acts_on() {
        let mount = |errno| ApiError::Mount {
            op: "mount",
            target: "/mnt/d".into(),
            source: io::Error::from_raw_os_error(errno),
        };
        assert_eq!(mount(libc::EBUSY).code(), Code::UNAVAILABLE);
        assert_eq!(mount(libc::ENODEV).code(), Code::NOT_FOUND);
        assert_eq!(mount(libc::EROFS).code(), Code::PERMISSION_DENIED);
        assert_eq!(mount(libc::EACCES).code(), Code::PERMISSION_DENIED);
        assert_eq!(mount(libc::EINVAL).code(), Code::INVALID_ARGUMENT);
        assert_eq!(mount(libc::EIO).code(), Code::INTERNAL);
        let busy = ApiError::Busy {
            what: "/mnt/d is in use".into(),
        };
        assert_eq!(busy.code(), Code::UNAVAILABLE);
        let gone = ApiError::NotMounted {
            path: "/mnt/d".into(),
        };
        assert_eq!(gone.code(), Code::NOT_FOUND);
    }

    #[test]
    fn unknown_ids_are_not_found_and_bad_input_is_invalid() {
        let unknown = ApiError::UnknownExecId {
            exec_id: "e9".into(),
        };
        assert_eq!(unknown.code(), Code::NOT_FOUND);
        assert_eq!(
            ApiError::invalid("args", "must not be empty").code(),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            ApiError::ProtocolMismatch { host: 2, agent: 1 }.code(),
            Code::FAILED_PRECONDITION
        );
    }
}
