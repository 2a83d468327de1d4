"""The errors of uvmctl_client: one hierarchy under :class:`UvmError`.

A gRPC status becomes the class its code names (see :func:`from_rpc_error`), following the table at
the top of ``uvm.proto``; any other code becomes a plain :class:`UvmError` whose ``code`` tells it.
A failing ``uvmctl`` command is a :class:`UvmctlError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

#: The trailer a FAILED_PRECONDITION refusal carries: the VM's state as a ``uvm.v1.State`` value
#: name, e.g. ``STATE_TERMINATED``.
STATE_METADATA = "uvm-state"


class UvmError(Exception):
    """Any error of this package.

    ``code`` is the gRPC status code when the error came from the API, else ``None``; ``details``
    is the server's message (or ours).
    """

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details if code is None else f"{code.name}: {details}")
        self.details = details
        self.code = code


class NotFound(UvmError):
    """NOT_FOUND: a program, a path, or the VM id sent in ``uvm-vm-id`` does not exist."""


class FailedPrecondition(UvmError):
    """FAILED_PRECONDITION: refused in the VM's current state.

    ``state`` is the state's ``uvm.v1.State`` value name (e.g. ``"STATE_TERMINATED"``) when the
    server sent it in the ``uvm-state`` trailer, else ``None`` (the guest not connected, the VM
    process gone, a missing working directory, ...).
    """

    def __init__(
        self, details: str, code: grpc.StatusCode | None = None, state: str | None = None
    ) -> None:
        super().__init__(details, code)
        self.state = state


class Unsupported(UvmError):
    """UNIMPLEMENTED: the backend, the guest or this supervisor cannot do this at all."""


class InvalidArgument(UvmError):
    """INVALID_ARGUMENT: a malformed request or stream (or one this client refused to send)."""


class PermissionDenied(UvmError):
    """PERMISSION_DENIED: the guest or its security policy refused."""


class DeadlineExceeded(UvmError):
    """DEADLINE_EXCEEDED: the call's deadline (``timeout``) or a step of the operation ran out."""


class Unavailable(UvmError):
    """``UNAVAILABLE``: in use (a busy mount; retry once it is free), or the guest link broke."""


class UvmctlError(UvmError):
    """A ``uvmctl`` command failed (or could not be found, or printed what we cannot read).

    ``argv`` is the command line, ``returncode`` its exit status (``None`` when it did not run) and
    ``stderr`` what it wrote there.
    """

    def __init__(
        self,
        details: str,
        argv: Sequence[str],
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(details)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


_BY_CODE: dict[grpc.StatusCode, type[UvmError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNIMPLEMENTED: Unsupported,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _trailer(call: grpc.Call, key: str) -> str | None:
    try:
        metadata = call.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a failed call without trailers
        return None
    for k, v in metadata:
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None


def from_rpc_error(err: grpc.RpcError) -> UvmError:
    """The :class:`UvmError` for a failed gRPC call (``err`` is also a ``grpc.Call``)."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    details: str = err.details() or ""  # type: ignore[attr-defined]
    cls = _BY_CODE.get(code, UvmError)
    if cls is FailedPrecondition:
        return FailedPrecondition(details, code, state=_trailer(err, STATE_METADATA))  # type: ignore[arg-type]
    return cls(details, code)
