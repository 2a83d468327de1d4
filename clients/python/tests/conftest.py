"""Fixtures: a fake supervisor for the unit tests, real VMs (through uvmctl) for the real_vm ones."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest

from fake_server import VM_ID, FakeSupervisor, FakeVmService
from uvmctl_client import UvmctlError, Vm, find_uvmctl


@pytest.fixture
def fake() -> Iterator[FakeSupervisor]:
    sup = FakeSupervisor(FakeVmService())
    try:
        yield sup
    finally:
        sup.stop()


@pytest.fixture
def fake_vm(fake: FakeSupervisor) -> Iterator[Vm]:
    """A Vm attached to the fake supervisor (no uvmctl involved)."""
    vm = Vm(VM_ID, fake.socket)
    try:
        yield vm
    finally:
        vm.close()


# ---- real VMs ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def uvmctl_bin() -> str:
    """The uvmctl binary; its absence fails the real-VM tests loudly instead of skipping them."""
    try:
        return find_uvmctl()
    except UvmctlError as e:
        pytest.fail(
            f"{e}. The real_vm tests need uvmctl; deselect them with -m 'not real_vm'.",
            pytrace=False,
        )


def make_root() -> str:
    """A fresh uvmctl root (mode 0700, short enough for a unix socket path under it)."""
    return tempfile.mkdtemp(prefix="uvmpy", dir="/tmp")


def assert_root_empty(root: str) -> None:
    """Nothing of any VM is left: the root keeps only its (empty) directory of name claims."""
    left = sorted(os.listdir(root))
    names = os.path.join(root, "names")
    if "names" in left and os.path.isdir(names) and not os.listdir(names):
        left.remove("names")
    assert not left, f"the VM left {left} in its root {root}"


def remove_empty_root(root: str) -> None:
    """Removes `root` if nothing but its empty name-claim directory is in it: what a failed removal
    left stays there to be looked at."""
    for path in (os.path.join(root, "names"), root):
        try:
            os.rmdir(path)
        except OSError:
            pass


@pytest.fixture(scope="module")
def real_vm(uvmctl_bin: str) -> Iterator[Vm]:
    """One running VM shared by a module's tests, removed at the end even when they fail; its root
    must then be empty."""
    root = make_root()
    try:
        with Vm.create(memory_mib=256, cpus=1, start=True, root=root, uvmctl=uvmctl_bin) as vm:
            yield vm
        assert_root_empty(root)
    finally:
        remove_empty_root(root)
