"""An in-process stand-in for a VM's supervisor: a grpcio server implementing uvm.v1.VmService on
a unix socket, with scripted Exec programs (chosen by args[0]) and an in-memory file system for
CopyIn/CopyOut. It records what clients sent so the tests can check the framing."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from uvmctl_client import MAX_MESSAGE_BYTES, pb, pb_grpc

VM_ID = "0123456789abcdef"


@dataclass
class ExecRecord:
    """What one Exec call received, and how it ended."""

    requests: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    ended: threading.Event = field(default_factory=threading.Event)
    # Set once the fake sent `exited` (or ended on purpose without it).
    finished: threading.Event = field(default_factory=threading.Event)


class FakeVmService(pb_grpc.VmServiceServicer):
    def __init__(self, copy_supported: bool = True) -> None:
        self.copy_supported = copy_supported
        # How Start refuses: None (it does not), "terminated" or "no-trailer".
        self.start_refusal: str | None = None
        self.execs: list[ExecRecord] = []
        self.files: dict[str, tuple[int, bytes]] = {}
        self.copy_in_chunks: list[int] = []
        self.fragments: list[str] = []
        self.lock = threading.Lock()

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_vm_id(context: grpc.ServicerContext) -> None:
        sent = dict(context.invocation_metadata()).get("uvm-vm-id")
        if sent is not None and sent != VM_ID:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this supervisor serves VM {VM_ID}, not {sent}")

    # ---- unary -----------------------------------------------------------------------------

    def Inspect(self, request, context):
        self._check_vm_id(context)
        return pb.InspectResponse(
            id=VM_ID,
            name="fake",
            status=pb.VmStatus(state=pb.STATE_RUNNING, link=pb.LINK_HEALTH_CONNECTED),
            config=pb.VmConfig(memory_mib=256, cpus=1),
        )

    def Stats(self, request, context):
        self._check_vm_id(context)
        resp = pb.StatsResponse(
            host=pb.HostStats(rss_bytes=123 << 20),
            guest=pb.GuestStats(mem_total_bytes=256 << 20, mem_available_bytes=200 << 20),
        )
        resp.host.cpu_time.FromMilliseconds(1500)
        return resp

    def UpdateMemory(self, request, context):
        self._check_vm_id(context)
        if request.memory_bytes > 512 << 20:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "above the maximum")
        return pb.UpdateMemoryResponse(memory_bytes=request.memory_bytes)

    def UpdateCpus(self, request, context):
        self._check_vm_id(context)
        self.cpus = request.cpus
        return pb.UpdateCpusResponse()

    def UpdatePolicyFragment(self, request, context):
        self._check_vm_id(context)
        if "package" not in request.fragment:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the fragment does not compile")
        if "package other" in request.fragment:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the policy's load_fragment rule does not allow a fragment in package \"other\"",
            )
        self.fragments.append(request.fragment)
        return pb.UpdatePolicyFragmentResponse()

    def UpdateCpuLimits(self, request, context):
        self._check_vm_id(context)
        self.cpu_limits = (
            request.limit_per_10000 if request.HasField("limit_per_10000") else None,
            request.weight if request.HasField("weight") else None,
        )
        return pb.UpdateCpuLimitsResponse()

    def Start(self, request, context):
        if self.start_refusal == "terminated":
            context.set_trailing_metadata((("uvm-state", "STATE_TERMINATED"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused in state Terminated")
        if self.start_refusal == "no-trailer":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the guest is not connected")
        return pb.StartResponse(status=pb.VmStatus(state=pb.STATE_RUNNING))

    # ---- Exec ------------------------------------------------------------------------------

    def Exec(self, request_iterator, context):
        record = ExecRecord(metadata=dict(context.invocation_metadata()))
        with self.lock:
            self.execs.append(record)

        # Set when the call ends, however: the handlers that never finish by themselves wait on it,
        # so only the client (its deadline or a cancel) can end them.
        context.add_callback(record.ended.set)

        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "spec":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `spec`")
        record.requests.append(first)
        spec = first.spec
        program = spec.args[0]

        def started():
            return pb.ExecResponse(started=pb.ExecStarted(exec_id=7, pid=42))

        def exited(code: int, signal: int = 0):
            record.finished.set()
            return pb.ExecResponse(exited=pb.ExecExited(exit_code=code, signal=signal))

        if program == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no program \"missing\" in PATH")
        if program == "not-running":
            context.set_trailing_metadata((("uvm-state", "STATE_TERMINATED"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused in state Terminated")
        if program == "denied":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "the policy forbids it")
        if program == "internal":
            context.abort(grpc.StatusCode.INTERNAL, "something broke")
        if program == "unsupported":
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no terminals here")

        if program == "cat":
            yield started()
            closed = False
            for req in request_iterator:
                record.requests.append(req)
                kind = req.WhichOneof("frame")
                if kind == "stdin":
                    if not spec.attach_stdin or closed:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stdin not open")
                    yield pb.ExecResponse(stdout=req.stdin)
                elif kind == "close_stdin":
                    if closed:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "close_stdin twice")
                    closed = True
                else:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind}")
            yield exited(0)
            return
        # The other programs read no stdin; drain it so the record shows what was sent.
        record.requests.extend(request_iterator)
        if program == "env":
            yield started()
            yield pb.ExecResponse(stdout="\n".join([*spec.env, spec.workdir]).encode())
            yield exited(0)
        elif program == "fail":
            yield started()
            yield pb.ExecResponse(stdout=b"out\n")
            yield pb.ExecResponse(stderr=b"oops\n")
            yield pb.ExecResponse(stderr=b"again\n")
            yield exited(int(spec.args[1]))
        elif program == "killed":
            yield started()
            yield exited(128 + 9, signal=9)
        elif program == "hang":
            yield started()
            record.ended.wait(30)  # until the call ends (the client's deadline or cancel)
        elif program == "output-first":
            yield pb.ExecResponse(stdout=b"too early")
            yield started()
            record.ended.wait(30)
        elif program == "no-exit":
            yield started()
            yield pb.ExecResponse(stdout=b"partial")
            record.finished.set()
        elif program == "after-exit":
            yield started()
            yield exited(0)
            yield pb.ExecResponse(stdout=b"late")
        else:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no program {program!r} in the fake")

    # ---- files -----------------------------------------------------------------------------

    def CopyIn(self, request_iterator, context):
        if not self.copy_supported:
            return super().CopyIn(request_iterator, context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("frame") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be `header`")
        header = first.header
        data = bytearray()
        for req in request_iterator:
            if req.WhichOneof("frame") != "data":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header")
            self.copy_in_chunks.append(len(req.data))
            data += req.data
            if len(data) > header.size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more bytes than announced")
        if len(data) != header.size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended short")
        self.files[header.path] = (header.mode, bytes(data))
        return pb.CopyInResponse(size=header.size)

    def CopyOut(self, request, context):
        if not self.copy_supported:
            return super().CopyOut(request, context)
        if request.path not in self.files:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path}")
        mode, data = self.files[request.path]
        announced = len(data) + 1 if request.path.endswith(".short") else len(data)
        yield pb.CopyOutResponse(header=pb.CopyOutHeader(mode=mode, size=announced))
        for off in range(0, len(data), 64 * 1024):
            yield pb.CopyOutResponse(data=data[off : off + 64 * 1024])


class FakeSupervisor:
    """The fake service served on ``<tmp>/api.sock``; ``stop()`` ends it and removes the tmp."""

    def __init__(self, service: FakeVmService) -> None:
        self.service = service
        # A short directory: a unix socket path has at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix="uvmfake", dir="/tmp")
        self.socket = os.path.join(self.dir, "api.sock")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        pb_grpc.add_VmServiceServicer_to_server(service, self.server)
        if not self.server.add_insecure_port(f"unix:{self.socket}"):
            raise RuntimeError(f"cannot serve on {self.socket}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)
        shutil.rmtree(self.dir, ignore_errors=True)
