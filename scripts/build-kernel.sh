#!/usr/bin/env bash
# Builds uvmctl's own guest kernel: `make allnoconfig` + kernel/uvm.config on Debian's
# linux-source-6.1 (installed by scripts/setup.sh) with kernel/patches/*.patch applied, all
# drivers built in, no modules.
#
#   scripts/build-kernel.sh              build (or find) the kernel, point `current` at it
#   scripts/build-kernel.sh --print-key  print the cache key and exit
#   scripts/build-kernel.sh --check      exit 0 if the kernel for the key is built, 1 if not
#
# Layout under $CACHE/kernel/ours/ (CACHE as in scripts/setup.sh):
#   src-<source version>-<patches>/  the unpacked, patched source tree (shared by every key
#                               with the same source and patches)
#   build-<key>/                the out-of-tree build (O=); kept for incremental rebuilds
#   <key>/vmlinux               the ELF kernel (symbols stripped; PVH note kept), put in place
#   <key>/config, System.map    with it, by one rename of the whole directory
#   current -> <key>            what uvm-image boots (ImageSpec::from_env)
# key = sha256 of "linux-source-6.1 <source version>\n", each patch's name and bytes, then the
# fragment's bytes; the source version is the installed package's (dpkg) or, for another
# tarball, its size and mtime.
# Same key: "up to date" in a fraction of a second, nothing rebuilt.
#
# Environment: UVMCTL_CACHE (cache root), UVM_KERNEL_CONFIG (another fragment),
# UVM_KERNEL_PATCHES (another directory of patches),
# UVM_KERNEL_SOURCE (another linux-source tarball), JOBS (make -j, default nproc).
set -euo pipefail

CACHE="${UVMCTL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uvmctl}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FRAGMENT="${UVM_KERNEL_CONFIG:-$REPO/kernel/uvm.config}"
PATCHES_DIR="${UVM_KERNEL_PATCHES:-$REPO/kernel/patches}"
SOURCE_PKG=linux-source-6.1
TARBALL="${UVM_KERNEL_SOURCE:-/usr/src/$SOURCE_PKG.tar.xz}"
OURS="$CACHE/kernel/ours"
JOBS="${JOBS:-$(nproc)}"

say() { printf '[build-kernel] %s\n' "$*"; }
die() {
    printf '[build-kernel] error: %s\n' "$*" >&2
    exit 1
}

[ -r "$FRAGMENT" ] || die "no config fragment at $FRAGMENT"
[ -r "$TARBALL" ] || die "no kernel source at $TARBALL; run scripts/setup.sh (it installs $SOURCE_PKG)"

# The source version: the package's when the tarball is the package's, else size + mtime
# (hashing a 130 MB tarball would cost the fast path most of a second).
source_version() {
    local v=""
    if [ -z "${UVM_KERNEL_SOURCE:-}" ]; then
        v="$(dpkg-query -W -f='${Version}' "$SOURCE_PKG" 2>/dev/null || true)"
    fi
    [ -n "$v" ] || v="$(stat -c 'size=%s mtime=%Y' "$TARBALL")"
    printf '%s\n' "$v"
}

VERSION="$(source_version)"
PATCHES=()
if [ -d "$PATCHES_DIR" ]; then
    while IFS= read -r -d '' p; do PATCHES+=("$p"); done < <(find "$PATCHES_DIR" -maxdepth 1 -name '*.patch' -print0 | sort -z)
fi
# Each patch's name and bytes, in order: hashed alone to name the patched source tree, and as
# part of the key.
patch_stream() {
    local p
    for p in "${PATCHES[@]}"; do
        printf 'patch %s\n' "$(basename "$p")"
        cat "$p"
    done
}
PATCH_SET="$(patch_stream | sha256sum | cut -c1-12)"
KEY="$({
    printf '%s %s\n' "$SOURCE_PKG" "$VERSION"
    patch_stream
    cat "$FRAGMENT"
} | sha256sum | cut -d' ' -f1)"
OUT="$OURS/$KEY"

# Points `current` at the key's directory, atomically (rename of a fresh symlink).
point_current() {
    local tmp="$OURS/.current.$$"
    ln -sfn "$KEY" "$tmp"
    mv -Tf "$tmp" "$OURS/current"
}

case "${1:-}" in
--print-key)
    printf '%s\n' "$KEY"
    exit 0
    ;;
--check)
    if [ -f "$OUT/vmlinux" ]; then exit 0; else exit 1; fi
    ;;
"") ;;
*) die "unknown argument '$1' (expected --print-key or --check)" ;;
esac

if [ -f "$OUT/vmlinux" ]; then
    point_current
    say "up to date: $OUT/vmlinux"
    exit 0
fi

mkdir -p "$OURS"
# One build at a time (two would share the source tree and race on the build directory).
exec 9>"$OURS/.lock"
if ! flock -n 9; then
    say "another build-kernel.sh is running; waiting for it"
    flock 9
fi
if [ -f "$OUT/vmlinux" ]; then
    point_current
    say "up to date: $OUT/vmlinux (built meanwhile)"
    exit 0
fi

start=$SECONDS
say "key $KEY ($SOURCE_PKG $VERSION + $(basename "$FRAGMENT"))"
# Temporary trees of a build that failed or was killed (each over a GB): nobody else uses them,
# since we hold the lock. This run's own go on exit, whatever the outcome.
rm -rf "$OURS"/.src.* "$OURS"/.out-*
trap 'rm -rf "$OURS/.src.$$" "$OURS/.out-$KEY.$$"' EXIT

# ---------------------------------------------------------------- source tree
# Patched trees never mix: the directory is named by the source version and the patch set.
SRC_DIR="$OURS/src-$(printf '%s' "$VERSION" | tr -c 'A-Za-z0-9.+~_-' '_')-p$PATCH_SET"
if [ ! -f "$SRC_DIR/.unpacked" ]; then
    say "unpacking $TARBALL"
    tmp="$OURS/.src.$$"
    rm -rf "$tmp" "$SRC_DIR"
    mkdir -p "$tmp"
    tar -xf "$TARBALL" -C "$tmp" --strip-components=1
    if [ ! -f "$tmp/Makefile" ] || [ ! -d "$tmp/arch/x86" ]; then
        die "$TARBALL does not hold a kernel tree"
    fi
    for p in "${PATCHES[@]}"; do
        say "applying $(basename "$p")"
        patch -d "$tmp" -p1 --batch --forward --quiet <"$p" || die "$(basename "$p") does not apply to $TARBALL"
    done
    touch "$tmp/.unpacked"
    mv -T "$tmp" "$SRC_DIR"
    # Trees of other patch sets are dead weight (over a GB each).
    for dir in "$OURS"/src-*; do
        [ "$dir" = "$SRC_DIR" ] || rm -rf "$dir"
    done
fi

# ---------------------------------------------------------------- configuration
BUILD="$OURS/build-$KEY"
mkdir -p "$BUILD"
say "configuring: allnoconfig + $FRAGMENT"
make -s -C "$SRC_DIR" O="$BUILD" ARCH=x86_64 KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig
make -s -C "$SRC_DIR" O="$BUILD" ARCH=x86_64 olddefconfig

# Every option the fragment sets must have survived: Kconfig silently drops an option whose
# dependencies are not met (or that a rename made unknown), and we would boot a kernel
# without, say, its vsock driver.
missing=()
while IFS= read -r line; do
    case "$line" in
    CONFIG_*=*) ;;
    "# CONFIG_"*" is not set") ;;
    *) continue ;;
    esac
    grep -qxF -- "$line" "$BUILD/.config" || missing+=("$line")
done <"$FRAGMENT"
if [ "${#missing[@]}" -gt 0 ]; then
    printf '[build-kernel] error: not in %s after olddefconfig (unmet dependency or unknown option):\n' "$BUILD/.config" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi
say "configuration checked: every option of $(basename "$FRAGMENT") is in .config"

# ---------------------------------------------------------------- build
say "make -j$JOBS vmlinux (a few minutes)"
# KBUILD_BUILD_* pin what `uname -v` and /proc/version would take from the build machine and
# the clock, so that the same key gives the same bytes: the date is the source tarball's.
make -C "$SRC_DIR" O="$BUILD" ARCH=x86_64 -j"$JOBS" \
    KBUILD_BUILD_USER=uvmctl KBUILD_BUILD_HOST=uvmctl KBUILD_BUILD_VERSION=1 \
    KBUILD_BUILD_TIMESTAMP="$(date -u -R -d "@$(stat -c %Y "$TARBALL")")" \
    vmlinux

# ---------------------------------------------------------------- install
tmp="$OURS/.out-$KEY.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
# What arch/x86/boot/compressed does to make vmlinux.bin: drop symbols and .comment; the
# program headers and the PVH ELF note stay, so QEMU still boots it through PVH.
objcopy -R .comment -S "$BUILD/vmlinux" "$tmp/vmlinux"
cp "$BUILD/.config" "$tmp/config"
cp "$BUILD/System.map" "$tmp/System.map"
chmod 0644 "$tmp/vmlinux" "$tmp/config" "$tmp/System.map"
chmod 0755 "$tmp"
rm -rf "$OUT"
mv -T "$tmp" "$OUT"
point_current

# Build directories of other keys are dead weight (hundreds of MB each); this key's stays for
# a quick incremental rebuild.
for dir in "$OURS"/build-*; do
    [ "$dir" = "$BUILD" ] || rm -rf "$dir"
done

say "built $OUT/vmlinux ($(stat -c %s "$OUT/vmlinux") bytes) in $((SECONDS - start)) s"
