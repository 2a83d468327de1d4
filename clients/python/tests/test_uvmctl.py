"""Vm.create / remove and the context manager, through a stand-in uvmctl script (no VM)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fake_server import VM_ID
from uvmctl_client import InvalidArgument, UvmctlError, Vm, find_uvmctl
from uvmctl_client import _uvmctl

FAKE_UVMCTL = """\
#!{python}
# A stand-in uvmctl: logs its argv, answers `create --json` as the contract says.
import json, os, sys
with open(os.environ["FAKE_UVMCTL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
cmd = sys.argv[1]
if cmd == "create":
    if "FAKE_UVMCTL_CREATE_FAILS" in os.environ:
        sys.stderr.write("uvmctl: error: name \\"taken\\" is already in use\\n")
        sys.exit(1)
    out = os.environ.get("FAKE_UVMCTL_OUTPUT")
    if out is None:
        out = json.dumps({{"id": "{vm_id}", "name": "n", "state": "running",
                          "api_socket": os.environ["FAKE_UVMCTL_SOCKET"]}})
    print(out)
elif cmd == "rm":
    if "FAKE_UVMCTL_RM_FAILS" in os.environ:
        sys.stderr.write("uvmctl: error: no such VM\\n")
        sys.exit(1)
else:
    sys.exit(2)
"""


@pytest.fixture
def uvmctl(tmp_path, fake, monkeypatch):
    """The stand-in as $UVMCTL; returns a function reading the argvs it was called with."""
    script = tmp_path / "uvmctl"
    script.write_text(FAKE_UVMCTL.format(python=sys.executable, vm_id=VM_ID))
    script.chmod(0o755)
    log = tmp_path / "log"
    monkeypatch.setenv("UVMCTL", str(script))
    monkeypatch.setenv("FAKE_UVMCTL_LOG", str(log))
    monkeypatch.setenv("FAKE_UVMCTL_SOCKET", fake.socket)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return calls


def test_create_passes_the_options_and_connects(uvmctl):
    vm = Vm.create(name="n", memory_mib=512, cpus=2, root="/tmp/r")
    try:
        assert (vm.id, vm.name, vm.root) == (VM_ID, "n", "/tmp/r")
        assert vm.info["state"] == "running"
        assert vm.exec(["cat"], stdin=b"hi").stdout == b"hi"
    finally:
        vm.remove()
    assert uvmctl() == [
        ["create", "--root", "/tmp/r", "--name", "n", "--memory", "512", "--cpus", "2", "--start",
         "--json"],
        ["rm", "-f", "--root", "/tmp/r", VM_ID],
    ]


def test_a_policy_is_passed_as_an_absolute_path(uvmctl, tmp_path, monkeypatch):
    (tmp_path / "p.rego").write_text("package uvmctl.policy\n")
    monkeypatch.chdir(tmp_path)
    Vm.create(start=False, policy="p.rego").remove(force=False)
    assert uvmctl()[0] == [
        "create", "--memory", "256", "--cpus", "1", "--policy", str(tmp_path / "p.rego"), "--json"
    ]


def test_defaults_pass_no_root_no_name_and_no_start_when_asked(uvmctl):
    Vm.create(start=False).remove(force=False)
    assert uvmctl() == [
        ["create", "--memory", "256", "--cpus", "1", "--json"],
        ["rm", VM_ID],
    ]


def test_the_context_manager_removes_on_error_and_remove_is_idempotent(uvmctl):
    with pytest.raises(RuntimeError, match="boom"):
        with Vm.create() as vm:
            raise RuntimeError("boom")
    vm.remove()
    assert [c[0] for c in uvmctl()] == ["create", "rm"]


def test_a_failed_removal_does_not_hide_the_blocks_error(uvmctl, monkeypatch):
    with pytest.raises(RuntimeError) as info:
        with Vm.create():
            monkeypatch.setenv("FAKE_UVMCTL_RM_FAILS", "1")
            raise RuntimeError("boom")
    assert any("no such VM" in note for note in info.value.__notes__)


def test_a_failed_removal_after_a_clean_block_raises(uvmctl, monkeypatch):
    with pytest.raises(UvmctlError, match="no such VM") as info:
        with Vm.create():
            monkeypatch.setenv("FAKE_UVMCTL_RM_FAILS", "1")
    assert info.value.returncode == 1 and info.value.argv[1:3] == ["rm", "-f"]


def test_a_failed_create_carries_uvmctls_stderr(uvmctl, monkeypatch):
    monkeypatch.setenv("FAKE_UVMCTL_CREATE_FAILS", "1")
    with pytest.raises(UvmctlError, match='name "taken" is already in use') as info:
        Vm.create(name="taken")
    assert info.value.returncode == 1
    assert "already in use" in info.value.stderr


def test_unreadable_create_output_removes_the_vm_it_names(uvmctl, monkeypatch):
    monkeypatch.setenv("FAKE_UVMCTL_OUTPUT", json.dumps({"id": "abc", "api_socket": "rel.sock"}))
    with pytest.raises(UvmctlError, match="absolute `api_socket`"):
        Vm.create(root="/tmp/r")
    assert uvmctl()[-1] == ["rm", "-f", "--root", "/tmp/r", "abc"]


def test_create_output_that_is_not_json_is_an_error(uvmctl, monkeypatch):
    monkeypatch.setenv("FAKE_UVMCTL_OUTPUT", "4f2a")
    with pytest.raises(UvmctlError, match="not a JSON object"):
        Vm.create()
    assert [c[0] for c in uvmctl()] == ["create"]


@pytest.mark.parametrize("memory, cpus", [(0, 1), (256, 0), (256, True), ("256", 1)])
def test_bad_sizes_are_refused_without_running_uvmctl(uvmctl, memory, cpus):
    with pytest.raises(InvalidArgument):
        Vm.create(memory_mib=memory, cpus=cpus)
    assert uvmctl() == []


def test_find_uvmctl_order(tmp_path, monkeypatch):
    monkeypatch.setenv("UVMCTL", str(tmp_path / "missing"))
    with pytest.raises(UvmctlError, match="not an executable file"):
        find_uvmctl()
    monkeypatch.delenv("UVMCTL")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(_uvmctl, "_repo_root", lambda: tmp_path)
    with pytest.raises(UvmctlError, match="target/release/uvmctl.*target/debug/uvmctl.*PATH"):
        find_uvmctl()
    for where in ("bin", "target/debug", "target/release"):
        binary = tmp_path / where / "uvmctl"
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        assert find_uvmctl() == str(binary)
    monkeypatch.setenv("UVMCTL", str(tmp_path / "bin" / "uvmctl"))
    assert find_uvmctl() == str(tmp_path / "bin" / "uvmctl")


def test_the_repo_is_found_from_an_in_tree_install():
    root = _uvmctl._repo_root()
    assert root is not None and (root / "crates" / "uvm-api" / "proto").is_dir()
    assert Path(__file__).resolve().is_relative_to(root)
    assert os.access(root, os.R_OK)
