//! Errors as gRPC statuses: the one place that decides which [`Code`] each typed error becomes, as
//! the table at the top of `uvm.proto` promises. Every match is exhaustive and without a wildcard,
//! so a new error variant does not compile until its code is decided; no typed error becomes
//! `UNKNOWN`.
//!
//! The message is the error with its sources ([`uvm::error_chain`]): for a refusal in the wrong
//! state it names the state, which the trailer [`STATE_METADATA`] also carries as a `uvm.v1.State`
//! value name, for clients that branch on it.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use uvm::{error_chain, ControllerError, DeviceError, GuestError, HostError, Rejection, SeamError};

use crate::v1;

/// The metadata key of a refusal's state (e.g. `STATE_TERMINATED`), set with `FAILED_PRECONDITION`
/// for [`ControllerError::WrongState`].
pub const STATE_METADATA: &str = "uvm-state";

/// The status a controller error is answered with.
pub fn controller_status(err: &ControllerError) -> Status {
    let mut status = Status::new(controller_code(err), error_chain(err));
    if let ControllerError::WrongState { state, .. } = err {
        let name = v1::State::from(*state).as_str_name();
        status
            .metadata_mut()
            .insert(STATE_METADATA, MetadataValue::from_static(name));
    }
    status
}

/// The code of a controller error: its own when it has one, else its source's.
pub fn controller_code(err: &ControllerError) -> Code {
    match err {
        ControllerError::WrongState { .. } => Code::FailedPrecondition,
        ControllerError::TerminalWithStderr => Code::InvalidArgument,
        ControllerError::InvalidArgument { .. } => Code::InvalidArgument,
        ControllerError::TooLarge { .. } => Code::ResourceExhausted,
        ControllerError::CreateFailed { source, .. } => host_code(source),
        ControllerError::StartFailed { source, .. } => seam_code(source),
        // A concurrent Terminate cancelled the start: the caller may retry at a higher level.
        ControllerError::StartCancelled { .. } => Code::Aborted,
        ControllerError::ReleaseFailed { source, .. } => host_code(source),
        ControllerError::Host { source, .. } => host_code(source),
        ControllerError::Guest { source, .. } => guest_code(source),
        ControllerError::Device { source, .. } => device_code(source),
        ControllerError::Cancelled { .. } => Code::Cancelled,
    }
}

/// The code of a disk or share request's error.
pub fn device_code(err: &DeviceError) -> Code {
    match err {
        DeviceError::InvalidArgument { .. } => Code::InvalidArgument,
        DeviceError::NoAvailableSlots { .. } => Code::ResourceExhausted,
        DeviceError::ConfigMismatch { .. } | DeviceError::WrongDeviceState { .. } => {
            Code::FailedPrecondition
        }
        DeviceError::GuestPathInUse { .. } => Code::AlreadyExists,
        DeviceError::WritableShareRefused { .. } => Code::PermissionDenied,
        DeviceError::UnknownReservation { .. }
        | DeviceError::NotFound { .. }
        | DeviceError::UnknownNic { .. }
        | DeviceError::UnknownDevice { .. } => Code::NotFound,
        DeviceError::Incomplete { first, .. } => device_code(first),
        DeviceError::Host { source, .. } => host_code(source),
        DeviceError::Guest { source, .. } => guest_code(source),
    }
}

/// The code of a host or guest error.
pub fn seam_code(err: &SeamError) -> Code {
    match err {
        SeamError::Host(e) => host_code(e),
        SeamError::Guest(e) => guest_code(e),
    }
}

/// The code of a host-side error.
pub fn host_code(err: &HostError) -> Code {
    match err {
        HostError::Unsupported { .. } => Code::Unimplemented,
        HostError::InvalidInput { .. } => Code::InvalidArgument,
        HostError::NotFound { .. } => Code::NotFound,
        HostError::Failed { .. } => Code::Internal,
        HostError::Io { .. } => Code::Internal,
        HostError::Timeout { .. } => Code::DeadlineExceeded,
        // The VM process ended under the call: retrying will not help until the state changes.
        HostError::Gone => Code::FailedPrecondition,
    }
}

/// The code of a guest-side error.
pub fn guest_code(err: &GuestError) -> Code {
    match err {
        GuestError::Unsupported { .. } => Code::Unimplemented,
        GuestError::NotConnected => Code::FailedPrecondition,
        // The link broke during the call; Inspect's link health tells whether it is back.
        GuestError::ConnectionLost => Code::Unavailable,
        GuestError::Rejected { kind, .. } => rejection_code(*kind),
        GuestError::Protocol { .. } => Code::Internal,
        GuestError::Timeout { .. } => Code::DeadlineExceeded,
        GuestError::Io { .. } => Code::Internal,
    }
}

/// The code of a guest refusal; the guest's policy denying a request is `PERMISSION_DENIED`.
pub fn rejection_code(kind: Rejection) -> Code {
    match kind {
        Rejection::NotFound => Code::NotFound,
        Rejection::PermissionDenied => Code::PermissionDenied,
        Rejection::InvalidArgument => Code::InvalidArgument,
        Rejection::FailedPrecondition => Code::FailedPrecondition,
        Rejection::ResourceExhausted => Code::ResourceExhausted,
        // In use (a busy mount): retryable once the user lets go.
        Rejection::Busy => Code::Unavailable,
        // The guest failed in a way it did not classify: a server-side failure, not the caller's.
        Rejection::Other => Code::Internal,
    }
}

/// The errors of the API layer itself, beside the controller's: what a supervisor answers that
/// the controller never sees. Each maps to the code `uvm.proto` documents for it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The controller refused or failed; mapped by [`controller_status`].
    #[error(transparent)]
    Controller(#[from] ControllerError),
    /// The caller named a VM (by `uvm-vm-id`) that this supervisor does not serve: `NOT_FOUND`.
    #[error("no VM {requested} here: this socket serves VM {served}")]
    UnknownVm {
        /// The id the caller asked for.
        requested: String,
        /// The id of the VM this supervisor serves.
        served: String,
    },
    /// A malformed request or stream (a missing first frame, a second header…): `INVALID_ARGUMENT`.
    #[error("invalid {what}: {message}")]
    InvalidRequest {
        /// What is wrong (e.g. "exec stream", "copy size").
        what: &'static str,
        /// Why, in a sentence.
        message: String,
    },
    /// Over a size limit of the supervisor (e.g. a copy): `RESOURCE_EXHAUSTED`.
    #[error("{what} of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// What is too large (e.g. "file").
        what: &'static str,
        /// Its size in bytes.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Events asked to resume after `since`, but events after it are no longer kept: `OUT_OF_RANGE`.
    #[error("events after {since} are no longer kept; the oldest kept is {oldest}")]
    EventsExpired {
        /// The `since` of the request.
        since: u64,
        /// The oldest sequence number still kept.
        oldest: u64,
    },
    /// The VM was removed while the call was open: `UNAVAILABLE`.
    #[error("VM {id} was removed")]
    Removed {
        /// The removed VM's id.
        id: String,
    },
}

impl ApiError {
    /// The code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Controller(e) => controller_code(e),
            ApiError::UnknownVm { .. } => Code::NotFound,
            ApiError::InvalidRequest { .. } => Code::InvalidArgument,
            ApiError::TooLarge { .. } => Code::ResourceExhausted,
            ApiError::EventsExpired { .. } => Code::OutOfRange,
            ApiError::Removed { .. } => Code::Unavailable,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match &err {
            ApiError::Controller(e) => controller_status(e),
            ApiError::UnknownVm { .. }
            | ApiError::InvalidRequest { .. }
            | ApiError::TooLarge { .. }
            | ApiError::EventsExpired { .. }
            | ApiError::Removed { .. } => Status::new(err.code(), error_chain(&err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use uvm::{Operation, StartStep, State};

    use super::*;

    fn host(source: HostError) -> ControllerError {
        ControllerError::Host {
            id: "vm".into(),
            operation: Operation::Stats,
            source,
        }
    }

    fn guest(source: GuestError) -> ControllerError {
        ControllerError::Guest {
            id: "vm".into(),
            operation: Operation::ExecIntoHost,
            source,
        }
    }

    fn rejected(kind: Rejection) -> ControllerError {
        guest(GuestError::Rejected {
            request: uvm::GuestRequest::ExecProcess,
            kind,
            message: "refused".into(),
        })
    }

    fn io_error() -> std::io::Error {
        std::io::Error::other("disk on fire")
    }

    #[test]
    fn wrong_state_is_failed_precondition_naming_the_state_in_message_and_metadata() {
        for state in State::ALL {
            let status = controller_status(&ControllerError::WrongState {
                id: "vm".into(),
                operation: Operation::Start,
                state,
            });
            assert_eq!(status.code(), Code::FailedPrecondition);
            assert!(
                status.message().contains(&state.to_string()),
                "{}",
                status.message()
            );
            let value = status.metadata().get(STATE_METADATA).expect("uvm-state");
            assert_eq!(
                value.to_str().ok(),
                Some(v1::State::from(state).as_str_name())
            );
        }
    }

    #[test]
    fn bad_arguments_are_invalid_argument() {
        assert_eq!(
            controller_code(&ControllerError::TerminalWithStderr),
            Code::InvalidArgument
        );
        assert_eq!(
            controller_code(&ControllerError::InvalidArgument {
                what: "memory size",
                message: "must be greater than zero".into(),
            }),
            Code::InvalidArgument
        );
    }

    #[test]
    fn every_host_error_has_its_code_in_every_wrapper() {
        let cases: [(fn() -> HostError, Code); 7] = [
            (
                || HostError::Unsupported {
                    backend: "qemu",
                    operation: "update_memory",
                },
                Code::Unimplemented,
            ),
            (
                || HostError::InvalidInput {
                    what: "memory",
                    message: "too big".into(),
                },
                Code::InvalidArgument,
            ),
            (
                || HostError::NotFound {
                    what: "cpu group",
                    name: "batch".into(),
                },
                Code::NotFound,
            ),
            (
                || HostError::Failed {
                    operation: "start",
                    source: "qemu died".into(),
                },
                Code::Internal,
            ),
            (
                || HostError::Io {
                    operation: "spawn",
                    source: io_error(),
                },
                Code::Internal,
            ),
            (
                || HostError::Timeout {
                    operation: "stats",
                    after: Duration::from_secs(10),
                },
                Code::DeadlineExceeded,
            ),
            (|| HostError::Gone, Code::FailedPrecondition),
        ];
        for (make, code) in cases {
            let id = || "vm".to_string();
            let wrapped = [
                host(make()),
                ControllerError::CreateFailed {
                    id: id(),
                    source: make(),
                },
                ControllerError::StartFailed {
                    id: id(),
                    step: StartStep::StartVm,
                    source: SeamError::Host(make()),
                },
                ControllerError::ReleaseFailed {
                    id: id(),
                    source: make(),
                },
            ];
            for err in wrapped {
                let status = controller_status(&err);
                assert_eq!(status.code(), code, "{err:?}");
                assert!(status.metadata().get(STATE_METADATA).is_none());
            }
        }
    }

    #[test]
    fn every_guest_error_has_its_code_directly_and_in_a_failed_start() {
        let cases: [(fn() -> GuestError, Code); 6] = [
            (
                || GuestError::Unsupported {
                    operation: "dump_stacks",
                },
                Code::Unimplemented,
            ),
            (|| GuestError::NotConnected, Code::FailedPrecondition),
            (|| GuestError::ConnectionLost, Code::Unavailable),
            (
                || GuestError::Protocol {
                    message: "garbage".into(),
                },
                Code::Internal,
            ),
            (
                || GuestError::Timeout {
                    operation: "connect",
                    after: Duration::from_secs(60),
                },
                Code::DeadlineExceeded,
            ),
            (
                || GuestError::Io {
                    operation: "read",
                    source: io_error(),
                },
                Code::Internal,
            ),
        ];
        for (make, code) in cases {
            assert_eq!(controller_code(&guest(make())), code);
            let start = ControllerError::StartFailed {
                id: "vm".into(),
                step: StartStep::ConnectGuest,
                source: SeamError::Guest(make()),
            };
            assert_eq!(controller_code(&start), code);
        }
    }

    #[test]
    fn every_guest_rejection_has_its_code_and_policy_denial_is_permission_denied() {
        let cases = [
            (Rejection::NotFound, Code::NotFound),
            (Rejection::PermissionDenied, Code::PermissionDenied),
            (Rejection::InvalidArgument, Code::InvalidArgument),
            (Rejection::FailedPrecondition, Code::FailedPrecondition),
            (Rejection::ResourceExhausted, Code::ResourceExhausted),
            (Rejection::Busy, Code::Unavailable),
            (Rejection::Other, Code::Internal),
        ];
        for (kind, code) in cases {
            assert_eq!(controller_code(&rejected(kind)), code);
        }
        // A security policy the guest refuses while starting.
        let policy = ControllerError::StartFailed {
            id: "vm".into(),
            step: StartStep::ApplySecurityPolicy,
            source: SeamError::Guest(GuestError::Rejected {
                request: uvm::GuestRequest::SetSecurityPolicy,
                kind: Rejection::PermissionDenied,
                message: "denied by policy".into(),
            }),
        };
        assert_eq!(controller_code(&policy), Code::PermissionDenied);
    }

    #[test]
    fn device_errors_have_their_documented_codes_and_seam_errors_their_own() {
        let device = |source: DeviceError| ControllerError::Device {
            id: "vm".into(),
            operation: Operation::AddDisk,
            source,
        };
        let cases = [
            (
                DeviceError::NoAvailableSlots { capacity: 64 },
                Code::ResourceExhausted,
            ),
            (
                DeviceError::GuestPathInUse {
                    guest_path: "/a".into(),
                },
                Code::AlreadyExists,
            ),
            (
                DeviceError::WritableShareRefused {
                    host_path: "/srv".into(),
                },
                Code::PermissionDenied,
            ),
            (
                DeviceError::NotFound {
                    what: "disk",
                    guest_path: "/a".into(),
                },
                Code::NotFound,
            ),
            (
                DeviceError::Host {
                    step: "attach disk",
                    source: HostError::InvalidInput {
                        what: "disk",
                        message: "attached writable to another VM".into(),
                    },
                },
                Code::InvalidArgument,
            ),
            (
                DeviceError::Guest {
                    step: "unmount disk",
                    source: GuestError::Rejected {
                        request: uvm::GuestRequest::UnmountDisk,
                        kind: Rejection::Busy,
                        message: "busy".into(),
                    },
                },
                Code::Unavailable,
            ),
        ];
        for (source, code) in cases {
            assert_eq!(controller_code(&device(source)), code);
        }
    }

    #[test]
    fn cancellations_are_aborted_or_cancelled() {
        assert_eq!(
            controller_code(&ControllerError::StartCancelled { id: "vm".into() }),
            Code::Aborted
        );
        assert_eq!(
            controller_code(&ControllerError::Cancelled {
                id: "vm".into(),
                operation: Operation::Wait,
            }),
            Code::Cancelled
        );
    }

    #[test]
    fn the_message_carries_the_whole_error_chain() {
        let status = controller_status(&ControllerError::StartFailed {
            id: "vm-7".into(),
            step: StartStep::ConnectGuest,
            source: SeamError::Guest(GuestError::Timeout {
                operation: "connect",
                after: Duration::from_secs(60),
            }),
        });
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("vm-7"), "{}", status.message());
        assert!(
            status.message().contains("connect guest"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("timed out after 60s"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn api_errors_have_their_documented_codes() {
        let cases = [
            (
                ApiError::UnknownVm {
                    requested: "a".into(),
                    served: "b".into(),
                },
                Code::NotFound,
            ),
            (
                ApiError::InvalidRequest {
                    what: "exec stream",
                    message: "the first message must be a spec".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ApiError::TooLarge {
                    what: "file",
                    size: 2,
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                ApiError::EventsExpired {
                    since: 3,
                    oldest: 10,
                },
                Code::OutOfRange,
            ),
            (ApiError::Removed { id: "vm".into() }, Code::Unavailable),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn a_controller_error_through_api_error_keeps_its_code_and_metadata() {
        let err = ApiError::from(ControllerError::WrongState {
            id: "vm".into(),
            operation: Operation::ExecIntoHost,
            state: State::Created,
        });
        assert_eq!(err.code(), Code::FailedPrecondition);
        let status = Status::from(err);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status
                .metadata()
                .get(STATE_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("STATE_CREATED")
        );
    }
}
