"""One VM: created with ``uvmctl create --json``, used over its supervisor's ``uvm.v1`` API,
removed with ``uvmctl rm -f``."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

import grpc

from ._proto import pb, pb_grpc
from ._uvmctl import find_uvmctl, run_uvmctl
from .errors import InvalidArgument, UvmctlError, UvmError, from_rpc_error

#: The size of the stdin and file chunks this client sends (the proto asks for at most 1 MiB and
#: calls 64 KiB a good size).
CHUNK_BYTES = 64 * 1024

#: The API's message-size limit, both ways; gRPC's usual default (4 MiB) is lower.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: The metadata a client sends so that a supervisor serving another VM refuses (NOT_FOUND).
VM_ID_METADATA = "uvm-vm-id"

#: The channel options every connection to a VM needs. ``grpc.default_authority`` is not optional:
#: grpcio sends the socket path as ``:authority`` by default, which the supervisor's HTTP/2 stack
#: refuses with PROTOCOL_ERROR.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.default_authority", "localhost"),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)

_Resp = TypeVar("_Resp")


def connect(api_socket: str | os.PathLike[str]) -> grpc.Channel:
    """A gRPC channel to the VM API served on the unix socket ``api_socket``, with the options the
    contract requires (:data:`CHANNEL_OPTIONS`). The caller closes it."""
    path = os.fspath(api_socket)
    if not os.path.isabs(path):
        raise InvalidArgument(f"the API socket must be an absolute path, not {path!r}")
    return grpc.insecure_channel(f"unix:{path}", options=CHANNEL_OPTIONS)


@dataclass(frozen=True)
class ExecResult:
    """How a process run by :meth:`Vm.exec` ended and what it wrote.

    ``exit_code`` is as a shell's ``$?`` has it (128 + the signal number when a signal ended the
    process, ``signal`` then names it; 0 otherwise).
    """

    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int = 0
    pid: int = 0
    exec_id: int = 0


def _env_entries(env: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    if env is None:
        return []
    if isinstance(env, Mapping):
        entries = []
        for key, value in env.items():
            if not key or "=" in key:
                raise InvalidArgument(f"environment variable name {key!r} is empty or has '='")
            entries.append(f"{key}={value}")
        return entries
    if isinstance(env, (str, bytes)):
        raise TypeError("env is a mapping or a sequence of 'KEY=VALUE' strings, not one string")
    entries = list(env)
    for entry in entries:
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("="):
            raise InvalidArgument(f"environment entry {entry!r} is not 'KEY=VALUE'")
    return entries


def _exec_requests(spec: Any, stdin: bytes | bytearray | memoryview | None) -> Iterator[Any]:
    """The client side of one Exec stream: ``spec``, then stdin in chunks of at most
    :data:`CHUNK_BYTES`, then ``close_stdin``; then the iterator ends (half-close)."""
    yield pb.ExecRequest(spec=spec)
    if stdin is None:
        return
    view = memoryview(stdin).cast("B")
    for offset in range(0, len(view), CHUNK_BYTES):
        yield pb.ExecRequest(stdin=bytes(view[offset : offset + CHUNK_BYTES]))
    yield pb.ExecRequest(close_stdin=pb.CloseStdin())


class Vm:
    """One VM, reached through its supervisor's API socket.

    Make one with :meth:`create` (which runs ``uvmctl create --json``), or attach to an existing VM
    with ``Vm(id, api_socket)``. Used as a context manager, the VM is removed on exit, error or
    not::

        with Vm.create(name="sandbox") as vm:
            print(vm.exec(["uname", "-a"]).stdout.decode())

    Every API method takes ``timeout`` (seconds; ``None`` waits as long as it takes) and raises a
    :class:`~uvmctl_client.errors.UvmError` subclass for a failed call. A ``Vm`` may be used from
    several threads at once (several execs run concurrently, each on its own stream).
    """

    def __init__(
        self,
        id: str,  # noqa: A002 - the VM's id is called id everywhere in uvmctl
        api_socket: str | os.PathLike[str],
        *,
        name: str | None = None,
        root: str | os.PathLike[str] | None = None,
        uvmctl: str | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.api_socket = os.fspath(api_socket)
        self.name = name
        self.root = os.fspath(root) if root is not None else None
        #: What ``uvmctl create --json`` printed (empty when attached with ``Vm(...)``).
        self.info: dict[str, Any] = dict(info or {})
        self._uvmctl = uvmctl
        self._channel = connect(self.api_socket)
        self._stub = pb_grpc.VmServiceStub(self._channel)
        self._metadata = ((VM_ID_METADATA, id),) if id else ()
        self._removed = False

    def __repr__(self) -> str:
        return f"Vm(id={self.id!r}, api_socket={self.api_socket!r})"

    # ---- life ------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str | None = None,
        memory_mib: int = 256,
        cpus: int = 1,
        start: bool = True,
        root: str | os.PathLike[str] | None = None,
        *,
        policy: str | os.PathLike[str] | None = None,
        net: str = "none",
        netns: str | os.PathLike[str] | None = None,
        publish: list[str] | None = None,
        dns: list[str] | None = None,
        uvmctl: str | None = None,
        timeout: float | None = None,
    ) -> Vm:
        """Creates a VM with ``uvmctl create [--root R] [--name N] --memory MIB --cpus N
        [--policy FILE] [--net user] [--netns PATH] [--publish SPEC]... [--dns IP]... [--start]
        --json`` and connects to it.

        ``net="user"`` gives the guest user-mode networking (outbound connectivity, a resolver)
        with ``publish`` ports (``"[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]"``, on 127.0.0.1
        unless told otherwise); ``netns`` one NIC per interface of that network namespace (root).

        ``policy`` is a Rego file (``package uvmctl.policy``, see ``examples/policies/``) the
        guest enforces on every request from start on; one that does not compile fails the
        create before the VM boots, with the compiler's message.

        ``root`` defaults to uvmctl's own (``$UVMCTL_ROOT``, else ``/run/uvmctl`` or
        ``$XDG_RUNTIME_DIR/uvmctl``); ``uvmctl`` to :func:`~uvmctl_client.find_uvmctl`. With
        ``start`` the VM is RUNNING when this returns. Raises
        :class:`~uvmctl_client.errors.UvmctlError` when the command fails.
        """
        for what, value in (("memory_mib", memory_mib), ("cpus", cpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"{what} must be a positive integer, not {value!r}")
        binary = uvmctl or find_uvmctl()
        root_args = ["--root", os.fspath(root)] if root is not None else []
        args = ["create", *root_args]
        if name is not None:
            args += ["--name", name]
        args += ["--memory", str(memory_mib), "--cpus", str(cpus)]
        if policy is not None:
            args += ["--policy", os.path.abspath(os.fspath(policy))]
        if net not in ("none", "user"):
            raise InvalidArgument(f"net must be 'none' or 'user', not {net!r}")
        if net == "user":
            args += ["--net", "user"]
        if netns is not None:
            args += ["--netns", os.path.abspath(os.fspath(netns))]
        for spec in publish or []:
            args += ["--publish", spec]
        for server in dns or []:
            args += ["--dns", server]
        if start:
            args.append("--start")
        args.append("--json")
        out = run_uvmctl(args, binary, timeout)
        info: Any = None
        try:
            info = json.loads(out)
            vm_id, api_socket = info["id"], info["api_socket"]
            if not isinstance(vm_id, str) or not vm_id:
                raise TypeError("id")
            if not isinstance(api_socket, str) or not os.path.isabs(api_socket):
                raise TypeError("api_socket")
        except (ValueError, KeyError, TypeError) as e:
            err = UvmctlError(
                f"`uvmctl create --json` printed {out!r}, not a JSON object with a string `id` "
                f"and an absolute `api_socket` ({type(e).__name__}: {e})",
                [binary, *args],
            )
            # Leave nothing behind: a VM was created if an id came back.
            vm_id = info.get("id") if isinstance(info, dict) else None
            if isinstance(vm_id, str) and vm_id:
                try:
                    run_uvmctl(["rm", "-f", *root_args, vm_id], binary, timeout)
                except UvmctlError as rm_err:
                    err.add_note(f"and removing VM {vm_id} failed too: {rm_err}")
            raise err from e
        vm_name = info.get("name") if isinstance(info.get("name"), str) else name
        return cls(vm_id, api_socket, name=vm_name or None, root=root, uvmctl=binary, info=info)

    def remove(self, force: bool = True, timeout: float | None = None) -> None:
        """Removes the VM with ``uvmctl rm [-f] [--root R] ID`` (``force`` terminates a running VM
        first; without it uvmctl refuses one) and closes the connection. A second call does
        nothing."""
        if self._removed:
            return
        self.close()
        args = ["rm"]
        if force:
            args.append("-f")
        if self.root is not None:
            args += ["--root", self.root]
        args.append(self.id)
        run_uvmctl(args, self._uvmctl, timeout)
        self._removed = True

    def close(self) -> None:
        """Closes the connection to the API (the VM lives on). Idempotent."""
        self._channel.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.remove(force=True)
        except UvmError as err:
            if exc is None:
                raise
            # Do not hide the error that ended the block; say the VM may be left over.
            exc.add_note(f"removing VM {self.id} failed too: {err}")

    # ---- API ------------------------------------------------------------------------------

    def _unary(self, method: Callable[..., _Resp], request: Any, timeout: float | None) -> _Resp:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def start(self, timeout: float | None = None) -> pb.StartResponse:
        """Boots a CREATED VM (a no-op on a RUNNING one); returns once it is RUNNING."""
        return self._unary(self._stub.Start, pb.StartRequest(), timeout)

    def terminate(
        self, grace_period: float | None = None, timeout: float | None = None
    ) -> pb.TerminateResponse:
        """Ends the VM (it stays recorded until :meth:`remove`). ``grace_period`` is how long the
        guest gets to shut down cleanly, in seconds; ``None`` is the supervisor's default."""
        request = pb.TerminateRequest()
        if grace_period is not None:
            request.grace_period.FromNanoseconds(round(grace_period * 1e9))
        return self._unary(self._stub.Terminate, request, timeout)

    def inspect(self, timeout: float | None = None) -> pb.InspectResponse:
        """Everything known about the VM (state, config, guest, timings, processes), as the
        ``uvm.v1.InspectResponse`` message."""
        return self._unary(self._stub.Inspect, pb.InspectRequest(), timeout)

    def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        """Resource use as the host and the guest see it (``uvm.v1.StatsResponse``); RUNNING
        only."""
        return self._unary(self._stub.Stats, pb.StatsRequest(), timeout)

    def update_memory(self, mib: int, timeout: float | None = None) -> int:
        """Resizes the guest to ``mib`` MiB (above the boot size only for a VM created with a
        maximum); returns the size applied, in MiB (rounded up to the backend's granularity)."""
        answer = self._unary(
            self._stub.UpdateMemory, pb.UpdateMemoryRequest(memory_bytes=mib << 20), timeout
        )
        return answer.memory_bytes >> 20

    def update_cpus(self, cpus: int, timeout: float | None = None) -> None:
        """Hot-adds or hot-removes vCPUs so that the VM has ``cpus`` (up to its maximum)."""
        self._unary(self._stub.UpdateCpus, pb.UpdateCpusRequest(cpus=cpus), timeout)

    def update_cpu_limits(
        self,
        limit_percent: float | None = None,
        weight: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """Caps the VM at ``limit_percent`` of its vCPUs and/or sets its CPU weight (1-10000,
        default 100); ``None`` leaves a setting as it is."""
        request = pb.UpdateCpuLimitsRequest()
        if limit_percent is not None:
            request.limit_per_10000 = round(limit_percent * 100)
        if weight is not None:
            request.weight = weight
        self._unary(self._stub.UpdateCpuLimits, request, timeout)

    def add_policy_fragment(self, fragment: str, timeout: float | None = None) -> None:
        """Adds a Rego fragment (a module in a package of its own) to the security policy the
        VM was created with: its rules add, never replace. Raises
        :class:`~uvmctl_client.errors.InvalidArgument` for one that does not compile or a VM
        without a policy, :class:`~uvmctl_client.errors.PermissionDenied` when the policy's
        ``load_fragment`` rule refuses it, :class:`~uvmctl_client.errors.FailedPrecondition` when
        a different fragment has its package."""
        self._unary(
            self._stub.UpdatePolicyFragment,
            pb.UpdatePolicyFragmentRequest(fragment=fragment),
            timeout,
        )

    def exec(
        self,
        args: Sequence[str],
        stdin: bytes | bytearray | memoryview | None = None,
        env: Mapping[str, str] | Sequence[str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Runs ``args`` in the guest (``args[0]`` looked up in its PATH) and waits for it to end.

        ``stdin``: the bytes the process reads, then end-of-file; ``None`` gives it an empty
        stdin. ``env``: its whole environment, a mapping or ``KEY=VALUE`` strings (a default PATH
        is added when absent). ``cwd``: its working directory (default ``/``). ``timeout``: the
        call's deadline, after which the process is killed and
        :class:`~uvmctl_client.errors.DeadlineExceeded` raised.

        A process that exits nonzero is not an error: read ``exit_code``. One that cannot start
        is (``NotFound`` for an unknown program, ``FailedPrecondition`` for a VM that is not
        RUNNING or a missing ``cwd``, ``PermissionDenied``).
        """
        if isinstance(args, (str, bytes)):
            raise TypeError("args is a sequence of strings, e.g. ['sh', '-c', 'echo hi']")
        argv = list(args)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgument(f"args must be a non-empty sequence of strings, not {args!r}")
        spec = pb.ExecSpec(
            args=argv, env=_env_entries(env), workdir=cwd or "", attach_stdin=stdin is not None
        )
        call = self._stub.Exec(_exec_requests(spec, stdin), timeout=timeout, metadata=self._metadata)
        started: Any = None
        exited: Any = None
        out: list[bytes] = []
        err: list[bytes] = []
        done = False
        try:
            for resp in call:
                frame = resp.WhichOneof("frame")
                if exited is not None:
                    raise UvmError(f"Exec: the server sent {frame!r} after `exited`")
                if frame == "started":
                    if started is not None:
                        raise UvmError("Exec: the server sent `started` twice")
                    started = resp.started
                    continue
                if started is None:
                    raise UvmError(f"Exec: the server sent {frame!r} before `started`")
                if frame == "stdout":
                    out.append(resp.stdout)
                elif frame == "stderr":
                    err.append(resp.stderr)
                elif frame == "exited":
                    exited = resp.exited
                else:
                    raise UvmError(f"Exec: the server sent an unknown frame ({frame!r})")
            if exited is None:
                raise UvmError("Exec: the stream ended with OK but without `exited`")
            done = True
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            if not done:
                # Our own refusal, or an interrupt: cancelling kills the guest process.
                call.cancel()
        return ExecResult(
            exit_code=exited.exit_code,
            stdout=b"".join(out),
            stderr=b"".join(err),
            signal=exited.signal,
            pid=started.pid,
            exec_id=started.exec_id,
        )

    # ---- disks and shares --------------------------------------------------------------------

    def add_disk(
        self,
        host_path: str | os.PathLike[str],
        guest_path: str,
        *,
        read_only: bool = False,
        qcow2: bool = False,
        fs_type: str | None = None,
        partition: int = 0,
        timeout: float | None = None,
    ) -> pb.AddDiskResponse:
        """Attaches the disk image ``host_path`` (made absolute here: the supervisor's working
        directory is not ours) and mounts it at ``guest_path``; RUNNING only, q35 only (microvm
        takes disks at create). ``fs_type`` (``ext4``, ``xfs``, ``vfat``) is probed when
        ``None``; ``partition`` 0 is the whole disk. Returns the ``uvm.v1.AddDiskResponse`` (its
        slot and the disk's state). A bad host or guest path raises
        :class:`~uvmctl_client.errors.InvalidArgument`."""
        disk = pb.DiskConfig(
            host_path=os.path.abspath(os.fspath(host_path)),
            read_only=read_only,
            format=pb.DISK_FORMAT_QCOW2 if qcow2 else pb.DISK_FORMAT_RAW,
        )
        mount = pb.DiskMount(
            guest_path=guest_path,
            read_only=read_only,
            fs_type=fs_type or "",
            partition=partition,
        )
        return self._unary(self._stub.AddDisk, pb.AddDiskRequest(disk=disk, mount=mount), timeout)

    def remove_disk(self, guest_path: str, timeout: float | None = None) -> None:
        """Unmounts the disk at ``guest_path`` and detaches it. A mount in use in the guest raises
        :class:`~uvmctl_client.errors.Unavailable` and stays: retry once it is free."""
        self._unary(self._stub.RemoveDisk, pb.RemoveDiskRequest(guest_path=guest_path), timeout)

    def add_share(
        self,
        host_path: str | os.PathLike[str],
        guest_path: str,
        *,
        read_only: bool = False,
        timeout: float | None = None,
    ) -> pb.AddShareResponse:
        """Shares the host directory ``host_path`` (made absolute here) at ``guest_path``;
        RUNNING only. ``read_only`` is enforced on the host and in the guest. Returns the
        ``uvm.v1.AddShareResponse`` (its tag and the share's state)."""
        share = pb.ShareConfig(host_path=os.path.abspath(os.fspath(host_path)), read_only=read_only)
        mount = pb.ShareMount(guest_path=guest_path, read_only=read_only)
        return self._unary(
            self._stub.AddShare, pb.AddShareRequest(share=share, mount=mount), timeout
        )

    def remove_share(self, guest_path: str, timeout: float | None = None) -> None:
        """Unmounts the share at ``guest_path`` and stops sharing it; as :meth:`remove_disk`."""
        self._unary(self._stub.RemoveShare, pb.RemoveShareRequest(guest_path=guest_path), timeout)

    def add_nics(self, netns: str | os.PathLike[str], timeout: float | None = None) -> list[pb.Nic]:
        """Adds a NIC for every interface of the network namespace ``netns`` (made absolute
        here), each configured in the guest with that interface's MAC, addresses, routes and
        MTU; RUNNING only, q35 only. Returns the new ``uvm.v1.Nic``s. A path that is not a
        network namespace, or one without a usable interface, raises
        :class:`~uvmctl_client.errors.InvalidArgument`."""
        req = pb.AddNicRequest(netns=os.path.abspath(os.fspath(netns)))
        return list(self._unary(self._stub.AddNic, req, timeout).nics)

    def remove_nic(self, nic: str, timeout: float | None = None) -> None:
        """Deconfigures the NIC ``nic`` (``"nic0"``) in the guest and unplugs it; an unknown one
        raises :class:`~uvmctl_client.errors.NotFound`."""
        self._unary(self._stub.RemoveNic, pb.RemoveNicRequest(nic=nic), timeout)

    def network(self, timeout: float | None = None) -> pb.Network:
        """The VM's network state and NICs (``uvm.v1.Network``)."""
        return self._unary(self._stub.ListNics, pb.ListNicsRequest(), timeout).network

    def add_pci_device(self, address: str, timeout: float | None = None) -> pb.PciDevice:
        """Assigns the host PCI device at ``address`` (``"0000:03:00.0"``, VFIO); a host without
        an IOMMU raises :class:`~uvmctl_client.errors.Unsupported` before anything changes."""
        req = pb.AddPciDeviceRequest(address=address)
        return self._unary(self._stub.AddPciDevice, req, timeout).device

    def remove_pci_device(self, device_id: str, timeout: float | None = None) -> None:
        """Drops one assignment of the device ``device_id`` (``"pci0"``); the last takes it out."""
        self._unary(self._stub.RemovePciDevice, pb.RemovePciDeviceRequest(id=device_id), timeout)

    def devices(self, timeout: float | None = None) -> pb.Devices:
        """The VM's disks and shares with their states and mounts (``uvm.v1.Devices``)."""
        return self._unary(self._stub.ListDevices, pb.ListDevicesRequest(), timeout).devices

    def copy_in(
        self,
        local_path: str | os.PathLike[str],
        guest_path: str,
        mode: int | None = None,
        timeout: float | None = None,
    ) -> int:
        """Copies the regular file ``local_path`` to ``guest_path`` (absolute; replaced if there)
        with permission bits ``mode`` (default: the local file's). Returns the bytes written.

        The file appears in the guest only once complete. Raises
        :class:`~uvmctl_client.errors.Unsupported` when this supervisor or guest cannot copy.
        """
        if mode is not None and not 0 <= mode <= 0o7777:
            raise InvalidArgument(f"mode {mode:#o} has bits outside 0o7777")
        # Checked before opening too: opening a directory fails, a FIFO blocks.
        if not stat.S_ISREG(os.stat(local_path).st_mode):
            raise InvalidArgument(f"{os.fspath(local_path)!r} is not a regular file")
        with open(local_path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{os.fspath(local_path)!r} is not a regular file")
            size = st.st_size
            header = pb.CopyInHeader(
                path=guest_path, mode=stat.S_IMODE(st.st_mode) if mode is None else mode, size=size
            )
            shrank: list[int] = []

            def requests() -> Iterator[Any]:
                yield pb.CopyInRequest(header=header)
                remaining = size
                while remaining:
                    chunk = f.read(min(CHUNK_BYTES, remaining))
                    if not chunk:
                        # Ending short makes the server refuse, leaving nothing in the guest.
                        shrank.append(remaining)
                        return
                    remaining -= len(chunk)
                    yield pb.CopyInRequest(data=chunk)

            try:
                resp = self._stub.CopyIn(requests(), timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                mapped = from_rpc_error(e)
                if shrank:
                    mapped.add_note(f"{os.fspath(local_path)!r} shrank while it was read")
                raise mapped from e
        if shrank:
            raise UvmError(f"{os.fspath(local_path)!r} shrank while it was copied")
        if resp.size != size:
            raise UvmError(f"CopyIn: the server wrote {resp.size} bytes of {size}")
        return size

    def copy_out(
        self,
        guest_path: str,
        local_path: str | os.PathLike[str],
        timeout: float | None = None,
    ) -> int:
        """Copies the guest's regular file ``guest_path`` (absolute) to ``local_path`` (into it,
        under the guest file's name, when it is a directory), with the guest file's permission
        bits. Returns the bytes copied.

        ``local_path`` appears only once complete (a temporary file beside it is renamed); a
        failed copy leaves nothing. Raises :class:`~uvmctl_client.errors.Unsupported` when this
        supervisor or guest cannot copy.
        """
        dest = Path(local_path)
        if dest.is_dir():
            dest = dest / Path(guest_path).name
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        call = self._stub.CopyOut(
            pb.CopyOutRequest(path=guest_path), timeout=timeout, metadata=self._metadata
        )
        done = False
        try:
            with os.fdopen(fd, "wb") as f:
                header: Any = None
                written = 0
                for resp in call:
                    frame = resp.WhichOneof("frame")
                    if frame == "header":
                        if header is not None:
                            raise UvmError("CopyOut: the server sent a second header")
                        header = resp.header
                    elif frame == "data":
                        if header is None:
                            raise UvmError("CopyOut: the server sent data before the header")
                        written += len(resp.data)
                        if written > header.size:
                            raise UvmError(
                                f"CopyOut: the server sent more than the {header.size} bytes "
                                "it announced"
                            )
                        f.write(resp.data)
                    else:
                        raise UvmError(f"CopyOut: the server sent an unknown frame ({frame!r})")
                if header is None:
                    raise UvmError("CopyOut: the stream ended with OK but without a header")
                if written != header.size:
                    raise UvmError(
                        f"CopyOut: the server sent {written} bytes of the {header.size} announced"
                    )
                os.fchmod(f.fileno(), header.mode & 0o7777)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
            done = True
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        finally:
            if not done:
                call.cancel()
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
        return written
