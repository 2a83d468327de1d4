"""CopyIn / CopyOut framing against the fake supervisor's in-memory files."""

from __future__ import annotations

import os

import pytest

from uvmctl_client import CHUNK_BYTES, InvalidArgument, NotFound, UvmError


def test_copy_in_then_out_is_byte_exact_and_keeps_the_mode(fake, fake_vm, tmp_path):
    data = os.urandom(3 * CHUNK_BYTES + 17)
    src = tmp_path / "src"
    src.write_bytes(data)
    os.chmod(src, 0o750)
    assert fake_vm.copy_in(src, "/work/f") == len(data)
    assert fake.service.files["/work/f"] == (0o750, data)
    assert max(fake.service.copy_in_chunks) == CHUNK_BYTES

    dest = tmp_path / "dest"
    assert fake_vm.copy_out("/work/f", dest) == len(data)
    assert dest.read_bytes() == data
    assert os.stat(dest).st_mode & 0o7777 == 0o750


def test_copy_in_with_an_explicit_mode_and_an_empty_file(fake, fake_vm, tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    assert fake_vm.copy_in(src, "/e", mode=0o600) == 0
    assert fake.service.files["/e"] == (0o600, b"")


def test_copy_out_into_a_directory_uses_the_guest_name(fake, fake_vm, tmp_path):
    fake.service.files["/etc/hostname"] = (0o644, b"uvm\n")
    fake_vm.copy_out("/etc/hostname", tmp_path)
    assert (tmp_path / "hostname").read_bytes() == b"uvm\n"


def test_copy_out_of_a_missing_file_is_not_found_and_leaves_nothing(fake_vm, tmp_path):
    with pytest.raises(NotFound):
        fake_vm.copy_out("/nope", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_copy_out_short_of_its_header_is_an_error_and_leaves_nothing(fake, fake_vm, tmp_path):
    fake.service.files["/f.short"] = (0o644, b"abc")
    with pytest.raises(UvmError, match="3 bytes of the 4 announced"):
        fake_vm.copy_out("/f.short", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_copy_in_refuses_a_bad_mode_and_a_directory(fake, fake_vm, tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(InvalidArgument):
        fake_vm.copy_in(src, "/f", mode=0o17777)
    with pytest.raises(InvalidArgument):
        fake_vm.copy_in(tmp_path, "/d")
    assert fake.service.files == {}
