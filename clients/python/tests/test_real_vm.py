"""The client against a real VM, created through `uvmctl create --json` (needs the supervisor, the
VM set-up and the agent; fails, never skips, without uvmctl: deselect with -m 'not real_vm')."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import threading

import pytest

from conftest import assert_root_empty, make_root, remove_empty_root
from uvmctl_client import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    UvmError,
    Vm,
    pb,
)

pytestmark = pytest.mark.real_vm


def test_exec_uname(real_vm):
    result = real_vm.exec(["uname", "-a"])
    assert result.exit_code == 0, result
    assert result.stdout.startswith(b"Linux "), result
    assert result.stderr == b""


def test_stdin_round_trip_of_1_mib_is_byte_exact(real_vm):
    data = os.urandom(1 << 20)
    result = real_vm.exec(["cat"], stdin=data, timeout=120)
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout) == len(data)
    assert result.stdout == data


def test_nonzero_exit_code_env_and_cwd(real_vm):
    result = real_vm.exec(
        ["sh", "-c", 'echo "$FOO|$(pwd)"; echo oops >&2; exit 7'], env={"FOO": "bar"}, cwd="/tmp"
    )
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"bar|/tmp\n", b"oops\n")


def test_a_missing_program_is_not_found(real_vm):
    with pytest.raises(NotFound):
        real_vm.exec(["/nonexistent/program"])


def test_stats_and_inspect(real_vm):
    stats = real_vm.stats()
    assert stats.host.rss_bytes > 0
    assert 0 < stats.guest.mem_available_bytes <= stats.guest.mem_total_bytes
    info = real_vm.inspect()
    assert info.id == real_vm.id
    assert info.status.state == pb.STATE_RUNNING
    assert info.config.memory_mib == 256 and info.config.cpus == 1


def test_copy_in_and_out_round_trip(real_vm, tmp_path):
    data = os.urandom(3 << 20)
    src = tmp_path / "src"
    src.write_bytes(data)
    assert real_vm.copy_in(src, "/tmp/copied", mode=0o640) == len(data)
    check = real_vm.exec(["sh", "-c", "wc -c </tmp/copied; stat -c %a /tmp/copied"])
    assert check.stdout.split() == [str(len(data)).encode(), b"640"], check
    dest = tmp_path / "dest"
    assert real_vm.copy_out("/tmp/copied", dest) == len(data)
    assert dest.read_bytes() == data
    assert os.stat(dest).st_mode & 0o7777 == 0o640


def test_a_disk_and_a_share_are_added_listed_busy_and_removed(real_vm, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.fail("real-VM test prerequisite missing: mkfs.ext4 (package e2fsprogs)")
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello").write_text("from the image\n")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)], check=True)
    with pytest.raises(InvalidArgument):
        real_vm.add_disk(tmp_path / "nosuch.img", "/data")
    with pytest.raises(NotFound):
        real_vm.remove_disk("/nothing")

    added = real_vm.add_disk(image, "/data", read_only=True)
    assert added.disk.state == pb.DISK_STATE_ATTACHED
    assert real_vm.exec(["cat", "/data/hello"]).stdout == b"from the image\n"
    shared = tmp_path / "shared"
    shared.mkdir()
    share = real_vm.add_share(shared, "/shared")
    assert share.share.state == pb.SHARE_STATE_ADDED
    assert real_vm.exec(["sh", "-c", "echo guest > /shared/g"]).exit_code == 0
    assert (shared / "g").read_text() == "guest\n"
    devices = real_vm.devices()
    assert [d.mounts[0].mount.guest_path for d in devices.disks] == ["/data"]
    assert [s.mounts[0].state for s in devices.shares] == [pb.MOUNT_STATE_MOUNTED]
    assert real_vm.inspect().devices == devices

    # Busy while a process works in it; removable once it has ended.
    release = threading.Event()

    def holder_requests():
        spec = pb.ExecSpec(args=["sh", "-c", "echo ready; read x; exit 0"], workdir="/data")
        spec.attach_stdin = True
        yield pb.ExecRequest(spec=spec)
        release.wait()
        yield pb.ExecRequest(close_stdin=pb.CloseStdin())

    holder = real_vm._stub.Exec(holder_requests(), metadata=real_vm._metadata)
    frames = iter(holder)
    assert next(frames).WhichOneof("frame") == "started"
    assert next(frames).stdout == b"ready\n"
    with pytest.raises(Unavailable):
        real_vm.remove_disk("/data")
    release.set()
    assert [f.exited.exit_code for f in frames if f.WhichOneof("frame") == "exited"] == [0]
    real_vm.remove_disk("/data")
    real_vm.remove_share("/shared")
    assert real_vm.devices() == pb.Devices()


def _wait_exited(pidfds: dict[int, int], seconds: float) -> list[int]:
    """Waits (on pidfds, no polling) until each process exited or ``seconds`` passed; returns the
    pids still alive."""
    poller = select.poll()
    for fd in pidfds.values():
        poller.register(fd, select.POLLIN)
    alive = dict(pidfds)
    deadline_ms = int(seconds * 1000)
    while alive:
        ready = poller.poll(deadline_ms)
        if not ready:
            break
        for fd, _ in ready:
            poller.unregister(fd)
            alive = {p: f for p, f in alive.items() if f != fd}
    return sorted(alive)


def test_remove_leaves_nothing_in_the_root(uvmctl_bin):
    root = make_root()
    try:
        vm = Vm.create(root=root, uvmctl=uvmctl_bin)
        with vm:
            assert vm.exec(["true"]).exit_code == 0
            assert os.path.dirname(vm.api_socket).startswith(root)
            assert os.path.exists(vm.api_socket)
            pids = [p.pid for p in vm.inspect().processes]
            assert pids, "inspect names the VM's host processes"
            # Opened before the removal, so each refers to that process even if its pid is reused.
            pidfds = {pid: os.pidfd_open(pid) for pid in pids}
        try:
            alive = _wait_exited(pidfds, 10)
        finally:
            for fd in pidfds.values():
                os.close(fd)
        assert not alive, f"processes of the removed VM still run: {alive}"
        assert_root_empty(root)
        with pytest.raises(UvmError):
            Vm(vm.id, vm.api_socket).inspect(timeout=5)
    finally:
        remove_empty_root(root)


SANDBOX = os.path.join(os.path.dirname(__file__), "../../../examples/policies/sandbox.rego")


def test_a_sandbox_policy_denies_sh_and_a_fragment_adds_ls(uvmctl_bin, tmp_path):
    root = make_root()
    policy = tmp_path / "policy.rego"
    with open(SANDBOX) as f:
        policy.write_text(f.read() + '\nload_fragment if startswith(input.package, "fragment.")\n')
    try:
        with Vm.create(root=root, uvmctl=uvmctl_bin, policy=policy) as vm:
            assert vm.exec(["echo", "hi"]).stdout == b"hi\n"
            with pytest.raises(PermissionDenied, match="uvmctl.policy.exec"):
                vm.exec(["sh", "-c", "true"])
            vm.add_policy_fragment(
                'package fragment.ls\nexec if {\n\tinput.program == "ls"\n\tinput.dir == "/bin"\n}\n'
            )
            assert b"proc" in vm.exec(["ls", "/"]).stdout
            assert vm.inspect().policy.fragments == 1
        assert_root_empty(root)
    finally:
        remove_empty_root(root)


def test_user_mode_networking_publishes_a_guest_port_and_shows_its_nic(uvmctl_bin):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = make_root()
    try:
        with Vm.create(root=root, uvmctl=uvmctl_bin, net="user", publish=[f"{port}:8080"]) as vm:
            script = "mkdir -p /w && echo from-python > /w/index.html && httpd -p 8080 -h /w"
            assert vm.exec(["sh", "-c", script]).exit_code == 0
            body = b""
            deadline = time.monotonic() + 20
            while b"from-python" not in body and time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
                        body = b"".join(iter(lambda: c.recv(4096), b""))
                except OSError:
                    time.sleep(0.2)
            assert b"from-python" in body, body
            network = vm.network()
            assert network.state == pb.NETWORK_STATE_CONFIGURED
            assert [n.id for n in network.nics] == ["nic0"]
            assert network.nics[0].addresses == ["10.0.2.15/24"]
            with pytest.raises(NotFound, match="nic9"):
                vm.remove_nic("nic9")
            with pytest.raises(InvalidArgument):
                vm.add_nics("/proc/self/ns/mnt")
        assert_root_empty(root)
    finally:
        remove_empty_root(root)


def test_a_bad_network_mode_is_refused_before_uvmctl_runs(uvmctl_bin):
    with pytest.raises(InvalidArgument, match="net must be"):
        Vm.create(uvmctl=uvmctl_bin, net="bridge")
