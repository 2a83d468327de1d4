"""The generated uvm.v1 modules, with a clear error when they have not been generated."""

from __future__ import annotations

try:
    from ._gen.uvm.v1 import uvm_pb2 as pb
    from ._gen.uvm.v1 import uvm_pb2_grpc as pb_grpc
except ModuleNotFoundError as e:  # pragma: no cover - only before generate.sh ran
    if e.name is None or not e.name.startswith(__package__ + "._gen"):
        raise
    raise ImportError(
        "uvmctl_client's generated uvm.v1 modules are missing: run clients/python/generate.sh "
        "(scripts/test-python.sh does it) with an interpreter that has grpcio-tools"
    ) from e

__all__ = ["pb", "pb_grpc"]
