"""Exec framing and results against the fake supervisor."""

from __future__ import annotations

import os

import pytest

from uvmctl_client import CHUNK_BYTES, DeadlineExceeded, ExecResult, InvalidArgument, UvmError


def frames(record):
    return [r.WhichOneof("frame") for r in record.requests]


def test_stdin_is_sent_in_chunks_then_closed_and_echoed_byte_exact(fake, fake_vm):
    data = os.urandom(CHUNK_BYTES * 16 + 123)  # 17 chunks, the last one short
    result = fake_vm.exec(["cat"], stdin=data)
    assert result == ExecResult(exit_code=0, stdout=data, stderr=b"", signal=0, pid=42, exec_id=7)
    (record,) = fake.service.execs
    assert frames(record) == ["spec"] + ["stdin"] * 17 + ["close_stdin"]
    sizes = [len(r.stdin) for r in record.requests[1:-1]]
    assert max(sizes) == CHUNK_BYTES and sum(sizes) == len(data)
    assert record.requests[0].spec.attach_stdin


def test_empty_stdin_is_attached_and_closed_at_once(fake, fake_vm):
    assert fake_vm.exec(["cat"], stdin=b"").stdout == b""
    assert frames(fake.service.execs[0]) == ["spec", "close_stdin"]


def test_without_stdin_only_the_spec_is_sent_and_stdin_not_attached(fake, fake_vm):
    fake_vm.exec(["fail", "0"])
    (record,) = fake.service.execs
    assert frames(record) == ["spec"]
    assert not record.requests[0].spec.attach_stdin


def test_spec_carries_args_env_workdir_and_the_vm_id(fake, fake_vm):
    result = fake_vm.exec(["env"], env={"A": "1", "B": "x=y"}, cwd="/tmp")
    assert result.stdout == b"A=1\nB=x=y\n/tmp"
    result = fake_vm.exec(["env"], env=["C=3"])
    assert result.stdout == b"C=3\n"
    spec = fake.service.execs[0].requests[0].spec
    assert list(spec.args) == ["env"] and spec.workdir == "/tmp" and not spec.terminal
    assert fake.service.execs[0].metadata["uvm-vm-id"] == fake_vm.id


def test_nonzero_exit_is_a_result_not_an_error_and_streams_stay_apart(fake_vm):
    result = fake_vm.exec(["fail", "3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"oops\nagain\n")


def test_a_signal_death_reports_128_plus_and_the_signal(fake_vm):
    result = fake_vm.exec(["killed"])
    assert (result.exit_code, result.signal) == (137, 9)


@pytest.mark.parametrize(
    "args, env, error",
    [
        ([], None, InvalidArgument),
        (["ok", 3], None, InvalidArgument),
        ("uname -a", None, TypeError),
        (["x"], {"A=B": "1"}, InvalidArgument),
        (["x"], ["NOEQUALS"], InvalidArgument),
        (["x"], "A=1", TypeError),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_sent(fake, fake_vm, args, env, error):
    with pytest.raises(error):
        fake_vm.exec(args, env=env)
    assert fake.service.execs == []


def test_a_deadline_is_deadline_exceeded_and_ends_the_call(fake, fake_vm):
    with pytest.raises(DeadlineExceeded) as info:
        fake_vm.exec(["hang"], timeout=0.5)
    assert info.value.code is not None and info.value.code.name == "DEADLINE_EXCEEDED"
    (record,) = fake.service.execs
    assert record.ended.wait(10), "the server saw the call end"
    assert not record.finished.is_set()


@pytest.mark.parametrize(
    "program, message",
    [
        ("output-first", "before `started`"),
        ("no-exit", "without `exited`"),
        ("after-exit", "after `exited`"),
    ],
)
def test_a_stream_out_of_order_is_an_error_and_the_call_is_cancelled(fake, fake_vm, program, message):
    with pytest.raises(UvmError, match=message) as info:
        fake_vm.exec([program])
    assert info.value.code is None, "our refusal, not a server status"
    (record,) = fake.service.execs
    assert record.ended.wait(10)


def test_several_execs_at_once_each_get_their_own_stream(fake_vm):
    from concurrent.futures import ThreadPoolExecutor

    inputs = [os.urandom(200_000 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: fake_vm.exec(["cat"], stdin=d), inputs))
    assert [r.stdout for r in results] == inputs
