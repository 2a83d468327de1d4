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
        /// The backend's name (`qemu`, `fake`).
        backend: &'static str,
        /// What was asked.
        operation: &'static str,
    },
    /// The request itself is wrong for this VM (e.g. a size the backend cannot represent).
    #[error("invalid {what}: {message}")]
    InvalidInput {
        /// The argument at fault.
        what: &'static str,
        /// Why it is wrong.
        message: String,
    },
    /// Something the request names does not exist on the host (e.g. a CPU group); nothing was
    /// changed.
    #[error("{what} {name:?} does not exist")]
    NotFound {
        /// What kind of thing (`cpu group`).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The operation was attempted and failed; the backend's own error is the source, its
    /// causes kept (a plain message where there is no deeper cause).
    #[error("{operation} failed")]
    Failed {
        /// What was attempted.
        operation: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The operation failed on an OS-level I/O error.
    #[error("{operation} failed")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was attempted.
        operation: &'static str,
        /// The deadline it missed.
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
    /// Beyond a bound: a file above the size limit, too many open files, a full disk.
    ResourceExhausted,
    /// In use: a mount something in the guest still holds, a mount point already taken.
    /// Retryable once the user lets go.
    Busy,
    /// Any other refusal.
    Other,
}

/// A request to the guest agent, as errors name it: callers match on it (a refused
/// [`GuestRequest::ExecProcess`] is the command's fault, a refused later request is not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestRequest {
    /// The version and capability handshake after connecting.
    Handshake,
    /// Starting a process.
    ExecProcess,
    /// Feeding a process's stdin.
    WriteStdin,
    /// Closing a process's stdin.
    CloseStdin,
    /// Reading a process's output.
    ReadOutput,
    /// Waiting for a process to exit.
    WaitProcess,
    /// Sending a process a signal.
    SignalProcess,
    /// Resizing a process's terminal.
    ResizeTerminal,
    /// Asking what the agent's tasks are doing.
    DumpStacks,
    /// Asking for the guest's resource use.
    GuestStats,
    /// Setting the guest's security policy.
    SetSecurityPolicy,
    /// Adding a fragment to the guest's security policy.
    InjectPolicyFragment,
    /// Opening a file to copy into the guest.
    OpenWrite,
    /// Writing a chunk of a file copied into the guest.
    WriteChunk,
    /// Putting a file copied into the guest in place.
    CommitWrite,
    /// Opening a file to copy out of the guest.
    OpenRead,
    /// Reading a chunk of a file copied out of the guest.
    ReadChunk,
    /// Closing a file handle.
    CloseFile,
    /// Mounting a disk.
    MountDisk,
    /// Unmounting a disk.
    UnmountDisk,
    /// Letting go of a disk before the host removes it.
    EjectDisk,
    /// Mounting a share.
    MountShare,
    /// Unmounting a share.
    UnmountShare,
    /// Asking the guest to power off.
    Shutdown,
    /// Configuring a network interface.
    ConfigureInterface,
    /// Deconfiguring a network interface.
    DeconfigureInterface,
    /// Writing the resolver and hosts files.
    ConfigureDns,
    /// Waiting for an assigned PCI device.
    WaitPciDevice,
}

impl GuestRequest {
    /// The request's name for people (`exec`, `write stdin`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            GuestRequest::Handshake => "handshake",
            GuestRequest::ExecProcess => "exec",
            GuestRequest::WriteStdin => "write stdin",
            GuestRequest::CloseStdin => "close stdin",
            GuestRequest::ReadOutput => "read output",
            GuestRequest::WaitProcess => "wait for the process",
            GuestRequest::SignalProcess => "signal the process",
            GuestRequest::ResizeTerminal => "resize the terminal",
            GuestRequest::DumpStacks => "dump stacks",
            GuestRequest::GuestStats => "guest stats",
            GuestRequest::SetSecurityPolicy => "set the security policy",
            GuestRequest::InjectPolicyFragment => "inject a policy fragment",
            GuestRequest::OpenWrite => "open a file for writing",
            GuestRequest::WriteChunk => "write to a file",
            GuestRequest::CommitWrite => "commit a written file",
            GuestRequest::OpenRead => "open a file for reading",
            GuestRequest::ReadChunk => "read from a file",
            GuestRequest::CloseFile => "close a file",
            GuestRequest::MountDisk => "mount a disk",
            GuestRequest::UnmountDisk => "unmount a disk",
            GuestRequest::EjectDisk => "eject a disk",
            GuestRequest::MountShare => "mount a share",
            GuestRequest::UnmountShare => "unmount a share",
            GuestRequest::Shutdown => "shut down",
            GuestRequest::ConfigureInterface => "configure a network interface",
            GuestRequest::DeconfigureInterface => "deconfigure a network interface",
            GuestRequest::ConfigureDns => "configure DNS",
            GuestRequest::WaitPciDevice => "wait for a PCI device",
        }
    }
}

impl std::fmt::Display for GuestRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error from the guest side (the agent inside the VM and the link to it).
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest or the link cannot do this; nothing was changed.
    #[error("{operation} is not supported by the guest")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
    },
    /// No connection to the guest exists (never made, or closed).
    #[error("no connection to the guest")]
    NotConnected,
    /// The connection to the guest broke (the VM exited, or the link collapsed).
    #[error("the connection to the guest was lost")]
    ConnectionLost,
    /// The guest answered with an error.
    #[error("the guest refused {request}: {message}")]
    Rejected {
        /// The request it refused.
        request: GuestRequest,
        /// Why, coarsely.
        kind: Rejection,
        /// The guest's message.
        message: String,
    },
    /// The guest spoke something we do not accept (garbage, oversized, wrong version). The guest
    /// is untrusted: this is never a panic on the host.
    #[error("protocol violation by the guest: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The operation did not finish in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was attempted.
        operation: &'static str,
        /// The deadline it missed.
        after: Duration,
    },
    /// The operation failed on an OS-level I/O error.
    #[error("{operation} failed")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Either side of a seam, for errors of steps that may be host or guest.
#[derive(Debug, thiserror::Error)]
pub enum SeamError {
    /// The host side failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The guest side failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// What callers of [`crate::Controller`] get back.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The operation is not allowed in the VM's current state.
    #[error("cannot {operation} VM {id}: it is {state}")]
    WrongState {
        /// The VM.
        id: String,
        /// What was refused.
        operation: Operation,
        /// The state it was refused in.
        state: State,
    },
    /// A terminal merges stdout and stderr, so a separate stderr cannot be honoured.
    #[error("a terminal cannot have a separate stderr")]
    TerminalWithStderr,
    /// An argument is invalid before any state is looked at.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// The argument at fault.
        what: &'static str,
        /// Why it is wrong.
        message: String,
    },
    /// A size is above the controller's limit; refused before anything was sent.
    #[error("{what} of {size} bytes is above the limit of {limit} bytes")]
    TooLarge {
        /// What is too large (`file`).
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// `create_vm` failed; the VM stays NotCreated.
    #[error("creating VM {id} failed")]
    CreateFailed {
        /// The VM.
        id: String,
        /// What the backend said.
        #[source]
        source: HostError,
    },
    /// `start_vm` failed at `step`; the VM is now Invalid and needs `terminate_vm`.
    #[error("starting VM {id} failed at step \"{step}\"")]
    StartFailed {
        /// The VM.
        id: String,
        /// The step that failed.
        step: StartStep,
        /// What that step's seam said.
        #[source]
        source: SeamError,
    },
    /// `terminate_vm` cancelled this `start_vm` and cleaned up what it had done.
    #[error("starting VM {id} was cancelled by terminate_vm")]
    StartCancelled {
        /// The VM.
        id: String,
    },
    /// The last step of `terminate_vm` failed; the VM is Invalid and a retry may succeed.
    #[error("releasing VM {id} failed; it is Invalid until a terminate_vm succeeds")]
    ReleaseFailed {
        /// The VM.
        id: String,
        /// What the backend said.
        #[source]
        source: HostError,
    },
    /// A host-side operation failed (the state did not change).
    #[error("{operation} on VM {id} failed")]
    Host {
        /// The VM.
        id: String,
        /// The controller operation.
        operation: Operation,
        /// What the backend said.
        #[source]
        source: HostError,
    },
    /// A guest-side operation failed (the state did not change).
    #[error("{operation} on VM {id} failed in the guest")]
    Guest {
        /// The VM.
        id: String,
        /// The controller operation.
        operation: Operation,
        /// What the guest link said.
        #[source]
        source: GuestError,
    },
    /// A disk or share request failed (the VM's state did not change); what the books show in
    /// [`crate::Controller::devices`] is what is there.
    #[error("{operation} on VM {id} failed")]
    Device {
        /// The VM.
        id: String,
        /// The controller operation.
        operation: Operation,
        /// Why.
        #[source]
        source: crate::devices::DeviceError,
    },
    /// The caller's cancellation token fired, or (for a device operation) a terminate or the
    /// VM's exit cut the operation short.
    #[error("{operation} on VM {id} was cancelled")]
    Cancelled {
        /// The VM.
        id: String,
        /// The operation that was cancelled.
        operation: Operation,
    },
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
