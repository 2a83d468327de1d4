#!/usr/bin/env bash
# The Python client's tests (clients/python): sets up target/python-venv with the pinned packages of
# clients/python/requirements.txt (idempotent: reinstalls only when the pins change), generates the
# uvm.v1 modules from crates/uvm-api/proto, and runs pytest. Arguments go to pytest.
#
#   bash scripts/test-python.sh                     every test; the real-VM ones need uvmctl
#                                                   (UVMCTL, else target/{release,debug}/uvmctl,
#                                                   else PATH), the agent and the VM set-up
#   bash scripts/test-python.sh -m "not real_vm"    only those that need no VM
#
# PYTHON picks the interpreter the venv is made from (default: python3.11, else python3; 3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
client="$repo/clients/python"
venv="$repo/target/python-venv"

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if command -v python3.11 >/dev/null; then python=python3.11; else python=python3; fi
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "test-python.sh: $python is $("$python" --version 2>&1); the client needs Python 3.11+" >&2
    exit 1
fi

# The stamp names what the venv was built from; a change of interpreter or pins rebuilds it.
want="$("$python" -c 'import sys; print(sys.version)') $(sha256sum "$client/requirements.txt" "$client/pyproject.toml" | sha256sum | cut -d' ' -f1)"
stamp="$venv/.uvmctl-installed"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "test-python.sh: setting up $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)
    "${pip[@]}" install --quiet --no-deps -r "$client/requirements.txt"
    "${pip[@]}" install --quiet --no-deps --no-build-isolation -e "$client"
    "${pip[@]}" check
    echo "$want" >"$stamp"
fi

bash "$client/generate.sh" "$venv/bin/python"
cd "$client"
exec "$venv/bin/python" -m pytest "$@"
