"""Finding and running the ``uvmctl`` binary."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import UvmctlError

#: The environment variable that names the uvmctl binary to use.
UVMCTL_ENV = "UVMCTL"


def _repo_root() -> Path | None:
    """The uvmctl repository this package is checked out in, if it is (an editable install)."""
    # src/uvmctl_client/_uvmctl.py -> clients/python/src/uvmctl_client -> the repo is 4 up.
    candidate = Path(__file__).resolve().parents[4]
    if (candidate / "Cargo.toml").is_file() and (candidate / "clients" / "python").is_dir():
        return candidate
    return None


def find_uvmctl() -> str:
    """The uvmctl binary: ``$UVMCTL``, else the repo's ``target/release/uvmctl`` or
    ``target/debug/uvmctl`` (in that order), else ``uvmctl`` on ``PATH``.

    Raises :class:`UvmctlError` naming every place looked at when none is found.
    """
    looked: list[str] = []
    env = os.environ.get(UVMCTL_ENV)
    if env:
        if os.access(env, os.X_OK) and Path(env).is_file():
            return env
        raise UvmctlError(f"${UVMCTL_ENV} is {env!r}, which is not an executable file", [env])
    looked.append(f"${UVMCTL_ENV} (unset)")
    repo = _repo_root()
    if repo is not None:
        for profile in ("release", "debug"):
            path = repo / "target" / profile / "uvmctl"
            if os.access(path, os.X_OK) and path.is_file():
                return str(path)
            looked.append(str(path))
    found = shutil.which("uvmctl")
    if found:
        return found
    looked.append("uvmctl on PATH")
    raise UvmctlError(
        "uvmctl not found; looked at: " + ", ".join(looked) + " (build it with `make build` or "
        f"set ${UVMCTL_ENV})",
        ["uvmctl"],
    )


def run_uvmctl(args: Sequence[str], uvmctl: str | None = None, timeout: float | None = None) -> str:
    """Runs ``uvmctl ARGS`` with no stdin; returns its stdout. A nonzero exit, a timeout or a
    missing binary is a :class:`UvmctlError` carrying the command's stderr."""
    argv = [uvmctl or find_uvmctl(), *args]
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise UvmctlError(f"cannot run {argv[0]!r}: {e.strerror}", argv) from e
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        raise UvmctlError(
            f"`{' '.join(argv)}` did not finish within {timeout} s", argv, None, stderr or ""
        ) from e
    if proc.returncode != 0:
        raise UvmctlError(
            f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}",
            argv,
            proc.returncode,
            proc.stderr,
        )
    return proc.stdout
