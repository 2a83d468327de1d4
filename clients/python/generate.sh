#!/usr/bin/env bash
# Generates the uvm.v1 Python modules from the repo's proto into src/uvmctl_client/_gen/
# (gitignored): _gen/uvm/v1/uvm_pb2.py, uvm_pb2.pyi and uvm_pb2_grpc.py.
#
# Usage: clients/python/generate.sh [PYTHON]
#   PYTHON  an interpreter with grpcio-tools installed (default: python3); scripts/test-python.sh
#           passes its venv's.
#
# protoc writes `from uvm.v1 import uvm_pb2` into uvm_pb2_grpc.py, an absolute import of a
# top-level `uvm` package; it is rewritten to a relative import so the generated code lives inside
# uvmctl_client and claims no top-level name. The output is built in a temporary directory and
# swapped in whole, so an interrupted run never leaves half a package.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${1:-python3}"
proto_root="$repo/crates/uvm-api/proto"
dest="$here/src/uvmctl_client/_gen"

tmp="$(mktemp -d "$here/src/uvmctl_client/.gen.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"

"$python" -m grpc_tools.protoc -I "$proto_root" \
    --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    uvm/v1/uvm.proto

grpc_mod="$tmp/uvm/v1/uvm_pb2_grpc.py"
absolute='from uvm.v1 import uvm_pb2 as'
if ! grep -q "^$absolute" "$grpc_mod"; then
    echo "generate.sh: $grpc_mod has no line starting with '$absolute'; protoc's output changed," \
        "update the rewrite" >&2
    exit 1
fi
sed -i "s/^$absolute/from . import uvm_pb2 as/" "$grpc_mod"

for pkg in "$tmp" "$tmp/uvm" "$tmp/uvm/v1"; do
    printf '"""Generated from crates/uvm-api/proto by clients/python/generate.sh; do not edit."""\n' \
        >"$pkg/__init__.py"
done

rm -rf "$dest"
mv "$tmp" "$dest"
trap - EXIT
echo "generated $dest/uvm/v1 from $proto_root/uvm/v1/uvm.proto"
