"""uvmctl_client: a Python client for uvmctl's long-lived utility VMs.

A VM is created with ``uvmctl create --json`` and then used over its supervisor's gRPC API
(``uvm.v1.VmService`` on ``<root>/<id>/api.sock``)::

    from uvmctl_client import Vm

    with Vm.create(memory_mib=256) as vm:          # removed on exit, error or not
        r = vm.exec(["sh", "-c", "cat | wc -c"], stdin=b"hello")
        assert r.exit_code == 0 and r.stdout == b"5\\n"

The generated ``uvm.v1`` messages are :mod:`uvmctl_client.pb` (and the stubs
``uvmctl_client.pb_grpc``); :meth:`Vm.inspect` and :meth:`Vm.stats` return them as they are.
"""

from ._proto import pb, pb_grpc
from ._uvmctl import UVMCTL_ENV, find_uvmctl
from .errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unsupported,
    UvmctlError,
    UvmError,
    from_rpc_error,
)
from .vm import CHANNEL_OPTIONS, CHUNK_BYTES, MAX_MESSAGE_BYTES, ExecResult, Vm, connect

__all__ = [
    "CHANNEL_OPTIONS",
    "CHUNK_BYTES",
    "MAX_MESSAGE_BYTES",
    "UVMCTL_ENV",
    "DeadlineExceeded",
    "ExecResult",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unavailable",
    "Unsupported",
    "UvmError",
    "UvmctlError",
    "Vm",
    "connect",
    "find_uvmctl",
    "from_rpc_error",
    "pb",
    "pb_grpc",
]
