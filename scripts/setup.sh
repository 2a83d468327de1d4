#!/usr/bin/env bash
# Installs what uvmctl needs on a fresh Debian 12 (bookworm) machine:
#   - qemu-system-x86 (>= 10) and qemu-utils (qemu-img: the qcow2 disk test) from
#     bookworm-backports: bookworm's own 7.2 conflicts with the backported qemu-utils these
#     machines carry;
#   - busybox-static (guest userland), xz-utils and cpio (inspecting images by hand), e2fsprogs,
#     xfsprogs and dosfstools (the disk tests make ext4, xfs and vfat images);
#   - Debian's guest kernel, downloaded (not installed) and unpacked into $CACHE/kernel/debian;
#   - linux-source-6.1 and the kernel build tools (for scripts/build-kernel.sh);
#   - vhost-device-vsock 0.3.0 (vsock for QEMU where /dev/vhost-vsock is missing);
#   - virtiofsd 1.14.0 (virtio-fs shares), built against libseccomp-dev and libcap-ng-dev;
#   - cargo-nextest and cargo-deny;
#   - the Rust toolchain rust-toolchain.toml pins, made known to rustup under its name.
# Idempotent: a second run only checks and takes seconds. Needs root (or sudo) for apt.
# Works with no stdin and CI=true.
#
#   scripts/setup.sh             everything above
#   scripts/setup.sh toolchain   only the pinned toolchain (what every cargo command here needs)
#   scripts/setup.sh lint-tools  the toolchain and cargo-deny (what `make lint` needs)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${UVMCTL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/uvmctl}"
VHOST_VSOCK_VERSION="0.3.0"
VIRTIOFSD_VERSION="1.14.0"
# The newest cargo-deny when this was written; it needs Rust >= 1.88.
CARGO_DENY_VERSION="0.20.2"
QEMU_MIN_MAJOR=10
BACKPORTS_FILE=/etc/apt/sources.list.d/uvmctl-backports.sources

export DEBIAN_FRONTEND=noninteractive
# cargo install puts binaries here; make them visible to the checks below.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

say() { printf '[setup] %s\n' "$*"; }
die() {
    printf '[setup] error: %s\n' "$*" >&2
    exit 1
}

SUDO=()
# Checked when apt is first needed: the toolchain and the cargo tools need no root.
CAN_APT=1
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        SUDO=(sudo -n)
    else
        CAN_APT=0
    fi
fi

# apt-get update at most once per run, and only when something must be fetched.
APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt_quiet update
        APT_UPDATED=1
    fi
}

APT_LOG="$CACHE/setup-apt.log"
# Runs an apt-get command with its (long, dpkg-verbose) output in $APT_LOG, shown on failure.
apt_quiet() {
    [ "$CAN_APT" -eq 1 ] || die "not root and no sudo: cannot install Debian packages"
    mkdir -p "$CACHE"
    if ! "${SUDO[@]}" apt-get "$@" </dev/null >"$APT_LOG" 2>&1; then
        tail -n 30 "$APT_LOG" >&2
        die "apt-get $* failed (full log: $APT_LOG)"
    fi
}

apt_install() {
    apt_update
    say "apt-get install $*"
    apt_quiet install -y --no-install-recommends "$@"
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

codename() {
    local c=""
    if [ -r /etc/os-release ]; then
        # shellcheck disable=SC1091
        c="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    fi
    echo "${c:-bookworm}"
}

# Prints "<uri> <signed-by>" for the main Debian archive in the machine's apt sources
# (the entry that serves the release suite itself, not -security).
debian_mirror() {
    local suite="$1" f
    # deb822 files: stanzas separated by blank lines.
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        [ "$f" = "$BACKPORTS_FILE" ] && continue
        awk -v suite="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " ")
                    print u[1], (signed == "" ? "-" : signed)
                    found = 1
                    exit
                }
                types = ""; suites = ""; uris = ""; signed = ""
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            {
                key = $1; sub(/:$/, "", key); val = $0; sub(/^[^:]*:[[:space:]]*/, "", val)
                if (key == "Types") types = val
                else if (key == "Suites") suites = val
                else if (key == "URIs") uris = val
                else if (key == "Signed-By") signed = val
            }
            END { if (!found) flush() }
        ' "$f" | head -n1 | grep . && return 0
    done
    # One-line format: deb [options] URI suite component...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v suite="$suite" '
            $1 == "deb" {
                i = 2; signed = "-"
                if ($i ~ /^\[/) {
                    while (i <= NF) {
                        if ($i ~ /signed-by=/) { s = $i; sub(/.*signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
                        if ($i ~ /\]$/) { i++; break }
                        i++
                    }
                }
                if ($(i + 1) == suite) { print $i, signed; exit }
            }
        ' "$f" | head -n1 | grep . && return 0
    done
    return 1
}

# ---------------------------------------------------------------- QEMU
qemu_major() {
    command -v qemu-system-x86_64 >/dev/null || {
        echo 0
        return
    }
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p' | head -n1
}

setup_qemu() {
    local major
    major="$(qemu_major)"
    if [ "${major:-0}" -ge "$QEMU_MIN_MAJOR" ] && command -v qemu-img >/dev/null; then
        say "qemu-system-x86_64 $major.x and qemu-img present"
        return
    fi
    local code mirror uri signed
    code="$(codename)"
    mirror="$(debian_mirror "$code")" || die "cannot find the Debian mirror for '$code' in the apt sources"
    uri="${mirror%% *}"
    signed="${mirror#* }"
    [ "$signed" = "-" ] && signed=/usr/share/keyrings/debian-archive-keyring.gpg
    local want
    want="$(printf 'Types: deb\nURIs: %s\nSuites: %s-backports\nComponents: main\nSigned-By: %s\n' \
        "$uri" "$code" "$signed")"
    if [ ! -f "$BACKPORTS_FILE" ] || [ "$(cat "$BACKPORTS_FILE")" != "$want" ]; then
        say "writing $BACKPORTS_FILE ($code-backports)"
        printf '%s\n' "$want" | "${SUDO[@]}" tee "$BACKPORTS_FILE" >/dev/null
        APT_UPDATED=0
    fi
    apt_update
    say "apt-get install -t $code-backports qemu-system-x86 qemu-utils"
    apt_quiet install -y --no-install-recommends -t "$code-backports" qemu-system-x86 qemu-utils
    major="$(qemu_major)"
    [ "${major:-0}" -ge "$QEMU_MIN_MAJOR" ] || die "qemu-system-x86_64 is still older than $QEMU_MIN_MAJOR"
}

# ---------------------------------------------------------------- Debian packages
setup_debs() {
    local missing=() p
    # iproute2: the network tests and the benchmark make their own namespaces and veths.
    for p in busybox-static xz-utils cpio e2fsprogs xfsprogs dosfstools iproute2; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    else
        say "busybox-static, xz-utils, cpio, e2fsprogs, xfsprogs, dosfstools, iproute2 present"
    fi
}

# ---------------------------------------------------------------- guest kernel
setup_kernel() {
    local root="$CACHE/kernel/debian"
    if ! compgen -G "$root/boot/vmlinuz-*" >/dev/null; then
        apt_update
        local pkg
        # linux-image-amd64 is a metapackage; its Depends names the concrete image package.
        pkg="$(apt-cache depends linux-image-amd64 |
            sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)"
        [ -n "$pkg" ] || die "cannot resolve the package behind linux-image-amd64"
        local debs="$CACHE/kernel/debs"
        mkdir -p "$debs"
        say "downloading $pkg"
        # Downloads run as root here; let apt do so without the _apt sandbox warning.
        (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg" </dev/null)
        local found=("$debs/${pkg}"_*.deb)
        local deb="${found[-1]}"
        [ -f "$deb" ] || die "apt-get download left no $pkg .deb in $debs"
        say "unpacking $(basename "$deb")"
        local tmp="$CACHE/kernel/.debian.tmp.$$"
        rm -rf "$tmp"
        mkdir -p "$tmp"
        dpkg -x "$deb" "$tmp"
        rm -rf "$root"
        mv "$tmp" "$root"
        rm -f "$deb"
    fi
    # The package does not ship modules.dep (its postinst runs depmod on install), and
    # uvm-image resolves module dependencies from it: generate it inside the unpacked tree.
    local dir ver
    for dir in "$root"/lib/modules/*/; do
        [ -d "$dir" ] || continue
        ver="$(basename "$dir")"
        [ -f "$dir/modules.dep" ] && continue
        command -v depmod >/dev/null || [ -x /sbin/depmod ] || apt_install kmod
        say "depmod $ver"
        PATH="$PATH:/sbin:/usr/sbin" depmod -b "$root" "$ver"
    done
    compgen -G "$root/lib/modules/*/modules.dep" >/dev/null || die "no modules.dep under $root/lib/modules"
    say "kernel present: $(basename "$(compgen -G "$root/boot/vmlinuz-*" | head -n1)")"
}

# ---------------------------------------------------------------- Rust toolchain
# rust-toolchain.toml pins a version; rustup refuses to build with anything else and cannot
# download it here. A machine's one toolchain is usually installed as `stable`: when an
# installed toolchain is the pinned version, make it known under the pinned name too. rustup's
# own `toolchain link` refuses names of official releases, so this is a symlink in rustup's
# toolchain directory, which rustup then lists and uses as that release.
setup_toolchain() {
    local want tc version sysroot host
    want="$(sed -n 's/^channel *= *"\(.*\)"$/\1/p' "$REPO/rust-toolchain.toml")"
    [ -n "$want" ] || die "no channel in $REPO/rust-toolchain.toml"
    if ! command -v rustup >/dev/null; then
        # Without rustup, rust-toolchain.toml is not read: the rustc on PATH must be the one.
        version="$(rustc --version 2>/dev/null | awk '{print $2}')"
        [ "$version" = "$want" ] || die "rustc is ${version:-missing}, rust-toolchain.toml pins $want"
        say "rustc $want present"
        return
    fi
    if rustup toolchain list | grep -q "^$want-"; then
        say "Rust toolchain $want present"
        return
    fi
    for tc in $(rustup toolchain list | awk '{print $1}'); do
        version="$(rustup run "$tc" rustc --version 2>/dev/null | awk '{print $2}')"
        if [ "$version" = "$want" ]; then
            sysroot="$(rustup run "$tc" rustc --print sysroot)"
            host="$(rustup run "$tc" rustc -vV | sed -n 's/^host: //p')"
            say "linking the installed toolchain $tc as $want-$host (rust-toolchain.toml)"
            ln -s "$sysroot" "${RUSTUP_HOME:-$HOME/.rustup}/toolchains/$want-$host"
            rustup toolchain list | grep -q "^$want-" || die "rustup does not list $want after linking it"
            return
        fi
    done
    die "no installed Rust toolchain is $want (rust-toolchain.toml): rustup toolchain install $want"
}

# ---------------------------------------------------------------- cargo tools
setup_vhost_vsock() {
    if command -v vhost-device-vsock >/dev/null &&
        vhost-device-vsock --version 2>/dev/null | grep -qw "$VHOST_VSOCK_VERSION"; then
        say "vhost-device-vsock $VHOST_VSOCK_VERSION present"
        return
    fi
    # It builds from crates.io with pure-Rust dependencies; only a C toolchain is needed
    # (for build scripts), which build-essential covers.
    command -v cc >/dev/null || apt_install build-essential
    say "cargo install vhost-device-vsock $VHOST_VSOCK_VERSION (takes a few minutes)"
    cargo install --locked --quiet vhost-device-vsock --version "$VHOST_VSOCK_VERSION" </dev/null
}

# virtiofsd (the Rust one) serves each virtio-fs share; without it shares fall back to 9p. It
# links libseccomp (its syscall filter) and libcap-ng (dropping capabilities), found through
# pkg-config. cargo install puts it in ~/.cargo/bin, where uvm-qemu's find_binary looks.
setup_virtiofsd() {
    if command -v virtiofsd >/dev/null &&
        virtiofsd --version 2>/dev/null | grep -qw "$VIRTIOFSD_VERSION"; then
        say "virtiofsd $VIRTIOFSD_VERSION present"
        return
    fi
    local missing=() p
    for p in libseccomp-dev libcap-ng-dev pkg-config; do
        pkg_installed "$p" || missing+=("$p")
    done
    command -v cc >/dev/null || missing+=(build-essential)
    [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
    say "cargo install virtiofsd $VIRTIOFSD_VERSION (takes a few minutes)"
    cargo install --locked --quiet virtiofsd --version "$VIRTIOFSD_VERSION" </dev/null
}

setup_nextest() {
    if cargo nextest --version >/dev/null 2>&1; then
        say "cargo-nextest present"
        return
    fi
    say "cargo install cargo-nextest (takes a few minutes)"
    cargo install --locked --quiet cargo-nextest </dev/null
}

setup_cargo_deny() {
    if cargo deny --version 2>/dev/null | grep -qw "$CARGO_DENY_VERSION"; then
        say "cargo-deny $CARGO_DENY_VERSION present"
        return
    fi
    command -v cc >/dev/null || apt_install build-essential
    say "cargo install cargo-deny $CARGO_DENY_VERSION (takes a few minutes)"
    cargo install --locked --quiet cargo-deny --version "$CARGO_DENY_VERSION" </dev/null
}

# ---------------------------------------------------------------- kernel sources
# scripts/build-kernel.sh builds our own guest kernel (kernel/uvm.config) from Debian's kernel
# source package; these are the source tarball and what `make vmlinux` needs.
setup_kernel_source() {
    local missing=() p
    for p in linux-source-6.1 bc bison flex libelf-dev libssl-dev make gcc xz-utils patch; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    else
        say "linux-source-6.1 and the kernel build dependencies present"
    fi
    compgen -G "/usr/src/linux-source-6.1.tar.*" >/dev/null || die "no /usr/src/linux-source-6.1.tar.* after installing linux-source-6.1"
}

main() {
    local start=$SECONDS
    case "${1:-all}" in
    toolchain)
        setup_toolchain
        return
        ;;
    lint-tools)
        setup_toolchain
        setup_cargo_deny
        return
        ;;
    all) ;;
    *) die "unknown argument '$1' (toolchain, lint-tools, or none for everything)" ;;
    esac
    setup_toolchain
    setup_qemu
    setup_debs
    [ -x /bin/busybox ] || die "/bin/busybox missing after installing busybox-static"
    setup_kernel
    setup_kernel_source
    setup_vhost_vsock
    setup_virtiofsd
    setup_nextest
    setup_cargo_deny
    say "done in $((SECONDS - start)) s"
}

main "$@"
