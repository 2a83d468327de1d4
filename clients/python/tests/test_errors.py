"""gRPC statuses become the typed errors, over a real (fake-served) call."""

from __future__ import annotations

import grpc
import pytest

from fake_server import FakeSupervisor, FakeVmService
from uvmctl_client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unsupported,
    UvmError,
    Vm,
    pb,
)


@pytest.mark.parametrize(
    "program, cls, code",
    [
        ("missing", NotFound, grpc.StatusCode.NOT_FOUND),
        ("denied", PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        ("unsupported", Unsupported, grpc.StatusCode.UNIMPLEMENTED),
        ("internal", UvmError, grpc.StatusCode.INTERNAL),
    ],
)
def test_exec_refusals_map_to_their_class(fake_vm, program, cls, code):
    with pytest.raises(cls) as info:
        fake_vm.exec([program])
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.details and info.value.details in str(info.value)


def test_failed_precondition_carries_the_state_from_the_trailer(fake_vm):
    with pytest.raises(FailedPrecondition) as info:
        fake_vm.exec(["not-running"])
    assert info.value.state == "STATE_TERMINATED"
    assert pb.State.Value(info.value.state) == pb.STATE_TERMINATED
    assert "Terminated" in info.value.details


def test_failed_precondition_of_a_unary_call_with_and_without_the_trailer(fake, fake_vm):
    fake.service.start_refusal = "terminated"
    with pytest.raises(FailedPrecondition) as info:
        fake_vm.start()
    assert info.value.state == "STATE_TERMINATED"
    fake.service.start_refusal = "no-trailer"
    with pytest.raises(FailedPrecondition) as info:
        fake_vm.start()
    assert info.value.state is None
    assert info.value.details == "the guest is not connected"
    fake.service.start_refusal = None
    assert fake_vm.start().status.state == pb.STATE_RUNNING


def test_a_wrong_vm_id_is_not_found(fake):
    vm = Vm("someoneelse", fake.socket)
    try:
        with pytest.raises(NotFound, match="not someoneelse"):
            vm.inspect()
    finally:
        vm.close()


def test_inspect_and_stats_return_the_messages(fake_vm):
    info = fake_vm.inspect()
    assert info.id == fake_vm.id and info.status.state == pb.STATE_RUNNING
    assert info.config.memory_mib == 256
    stats = fake_vm.stats()
    assert stats.host.rss_bytes == 123 << 20
    assert stats.host.cpu_time.ToMilliseconds() == 1500
    assert stats.guest.mem_total_bytes == 256 << 20


def test_resource_updates_send_what_was_asked_and_refusals_are_typed(fake, fake_vm):
    assert fake_vm.update_memory(384) == 384
    with pytest.raises(InvalidArgument, match="above the maximum"):
        fake_vm.update_memory(1024)
    fake_vm.update_cpus(2)
    assert fake.service.cpus == 2
    fake_vm.update_cpu_limits(limit_percent=50)
    assert fake.service.cpu_limits == (5000, None)
    fake_vm.update_cpu_limits(weight=200)
    assert fake.service.cpu_limits == (None, 200)


def test_a_policy_fragment_is_sent_whole_and_its_refusals_are_typed(fake, fake_vm):
    fragment = 'package fragment.ls\nexec if input.program == "ls"\n'
    fake_vm.add_policy_fragment(fragment)
    assert fake.service.fragments == [fragment]
    with pytest.raises(InvalidArgument, match="does not compile"):
        fake_vm.add_policy_fragment("exec if {")
    with pytest.raises(PermissionDenied, match="load_fragment"):
        fake_vm.add_policy_fragment("package other\nexec := true\n")
    assert fake.service.fragments == [fragment]


def test_copies_unimplemented_by_the_server_are_unsupported(tmp_path):
    sup = FakeSupervisor(FakeVmService(copy_supported=False))
    vm = Vm("0123456789abcdef", sup.socket)
    try:
        src = tmp_path / "f"
        src.write_bytes(b"data")
        with pytest.raises(Unsupported):
            vm.copy_in(src, "/tmp/f")
        dest = tmp_path / "out"
        with pytest.raises(Unsupported):
            vm.copy_out("/tmp/f", dest)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f"], "no file, no temporary"
    finally:
        vm.close()
        sup.stop()


def test_a_vm_with_no_server_is_an_error_not_a_hang(tmp_path):
    vm = Vm("x", str(tmp_path / "absent.sock"))
    try:
        with pytest.raises(UvmError) as info:
            vm.inspect(timeout=5)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        vm.close()


def test_a_relative_socket_is_refused():
    with pytest.raises(InvalidArgument):
        Vm("x", "api.sock")
