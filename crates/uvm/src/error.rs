//! Typed errors: one enum per concern. Seam errors are what backends return; [`ControllerError`] is
//! what callers of the controller see.

use std::time::Duration;

use crate::state::{Operation, StartStep, State};

/// An error from the host side of a VM (the VM process, its resources).
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The backend cannot do this at all; nothing was changed.
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        backend: &'static str,
        operation: &'static str,
    },
    /// The request itself is wrong for this VM (e.g. a size the backend cannot represent).
    #[error("invalid {what}: {message}")]
    InvalidInput { what: &'static str, message: String },
    /// The operation was attempted and failed.
    #[error("{operation} failed: {message}")]
    Failed {
        operation: &'static str,
        message: String,
    },
    /// The operation failed on an OS-level I/O error.
    #[error("{operation} failed")]
    Io {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    /// The VM process is no longer there.
    #[error("the VM process is gone")]
    Gone,
}

/// Why the guest refused a request (the agent's status code, coarsely): what a caller may act
/// on, as a shell tells "not found" (127) from "cannot execute" (126).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Something named in the request does not exist (a program, an exec id).
    NotFound,
    /// The guest may not do it (e.g. a program that is not executable).
    PermissionDenied,
    /// The request itself is malformed or out of bounds.
    InvalidArgument,
    /// The request is well formed but does not fit the guest's state (e.g. a working directory
    /// that does not exist, a resize of a process without a terminal).
    FailedPrecondition,
    /// Any other refusal.
    Other,
}

/// An error from the guest side (the agent inside the VM and the link to it).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest or the link cannot do this; nothing was changed.
    #[error("{operation} is not supported by the guest")]
    Unsupported { operation: &'static str },
    /// No connection to the guest exists (never made, or closed).
    #[error("no connection to the guest")]
    NotConnected,
    /// The connection to the guest broke (the VM exited, or the link collapsed).
    #[error("the connection to the guest was lost")]
    ConnectionLost,
    /// The guest answered with an error.
    #[error("the guest refused {operation}: {message}")]
    Rejected {
        operation: &'static str,
        kind: Rejection,
        message: String,
    },
    /// The guest spoke something we do not accept (garbage, oversized, wrong version). The guest
    /// is untrusted: this is never a panic on the host.
    #[error("protocol violation by the guest: {message}")]
    Protocol { message: String },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    /// The operation failed on an OS-level I/O error.
    #[error("{operation} failed")]
    Io {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Either side of a seam, for errors of steps that may be host or guest.
#[derive(Debug, thiserror::Error)]
pub enum SeamError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// What callers of [`crate::Controller`] get back.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The operation is not allowed in the VM's current state.
    #[error("cannot {operation} VM {id}: it is {state}")]
    WrongState {
        id: String,
        operation: Operation,
        state: State,
    },
    /// A terminal merges stdout and stderr, so a separate stderr cannot be honoured.
    #[error("a terminal cannot have a separate stderr")]
    TerminalWithStderr,
    /// An argument is invalid before any state is looked at.
    #[error("invalid {what}: {message}")]
    InvalidArgument { what: &'static str, message: String },
    /// `create_vm` failed; the VM stays NotCreated.
    #[error("creating VM {id} failed")]
    CreateFailed {
        id: String,
        #[source]
        source: HostError,
    },
    /// `start_vm` failed at `step`; the VM is now Invalid and needs `terminate_vm`.
    #[error("starting VM {id} failed at step \"{step}\"")]
    StartFailed {
        id: String,
        step: StartStep,
        #[source]
        source: SeamError,
    },
    /// `terminate_vm` cancelled this `start_vm` and cleaned up what it had done.
    #[error("starting VM {id} was cancelled by terminate_vm")]
    StartCancelled { id: String },
    /// The last step of `terminate_vm` failed; the VM is Invalid and a retry may succeed.
    #[error("releasing VM {id} failed; it is Invalid until a terminate_vm succeeds")]
    ReleaseFailed {
        id: String,
        #[source]
        source: HostError,
    },
    /// A host-side operation failed (the state did not change).
    #[error("{operation} on VM {id} failed")]
    Host {
        id: String,
        operation: Operation,
        #[source]
        source: HostError,
    },
    /// A guest-side operation failed (the state did not change).
    #[error("{operation} on VM {id} failed in the guest")]
    Guest {
        id: String,
        operation: Operation,
        #[source]
        source: GuestError,
    },
    /// The caller's cancellation token fired.
    #[error("{operation} on VM {id} was cancelled")]
    Cancelled { id: String, operation: Operation },
}

impl ControllerError {
    /// The state an operation was refused in, when it was refused for its state.
    pub fn refused_in(&self) -> Option<State> {
        match self {
            ControllerError::WrongState { state, .. } => Some(*state),
            _ => None,
        }
    }
}

/// An error and its sources, joined with ": ", for logs and state reasons.
pub use uvm_util::error_chain;
