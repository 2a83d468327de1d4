#!/usr/bin/env python3
"""Where a guest's boot spends its time, by sampling: boots our image under QEMU (TCG), asks
QEMU for the vCPU's instruction pointer as often as QMP answers (about every 0.5 ms), stops at
the agent's ready line (or after --seconds), and maps each sample to a kernel symbol with the
kernel's System.map.

    scripts/profile-boot.py --machine microvm
    scripts/profile-boot.py --machine q35 --append "initcall_debug" --top 60

It prints a flat profile (share of samples per symbol; "user" is the agent and its children,
"firmware" SeaBIOS/qboot, "idle" the idle loop) and a timeline: the top symbols of every 50 ms.
The vCPU stops for each sample, so the boot runs slower than unobserved: read shares, not times.
This is how the costs named in BENCHMARKS.md ("where the kernel's time went") were found.

The VM is the one `uvmctl run --accel tcg` starts with its default memory and CPUs (from
`uvmctl command-line`: same image, QEMU and kernel arguments), except that QEMU starts paused so
that sampling begins at the first instruction. Build uvmctl first (`make build`).
"""
import argparse
import bisect
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("UVMCTL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uvmctl")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_lines(uvmctl, machine, kernel, append, runtime_dir):
    """The vhost-device-vsock and QEMU command lines `uvmctl run` would use."""
    cmd = [uvmctl, "command-line", "--json", "--accel", "tcg", "--machine", machine,
           "--runtime-dir", runtime_dir, "--append", append]
    if kernel:
        cmd += ["--kernel", kernel]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE).stdout
    lines = json.loads(out)
    return lines["vhost_vsock"], lines["qemu"]


def wait_for(path, child):
    while not os.path.exists(path):
        if child.poll() is not None:
            sys.exit("%s exited (%d) before creating %s" % (child.args[0], child.returncode, path))
        time.sleep(0.001)


def symbols(system_map):
    syms = []
    for line in open(system_map):
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tTwW":
            syms.append((int(parts[0], 16), parts[2]))
    syms.sort()
    return [a for a, _ in syms], [n for _, n in syms]


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.file.readline()  # greeting
        self.call("qmp_capabilities")

    def call(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP closed")
            reply = json.loads(line)
            if "return" in reply or "error" in reply:
                return reply.get("return")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--machine", choices=["q35", "microvm"], default="q35")
    ap.add_argument("--kernel", choices=["ours", "debian"], help="as `uvmctl run --kernel`")
    ap.add_argument("--uvmctl", default=os.path.join(ROOT, "target/release/uvmctl"))
    ap.add_argument("--system-map", default=os.path.join(CACHE, "kernel/ours/current/System.map"))
    ap.add_argument("--append", default="", help="more kernel arguments")
    ap.add_argument("--seconds", type=float, default=3.0, help="stop sampling after this long")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    addrs, names = symbols(args.system_map)

    def name(pc):
        if pc < 0x100000:
            return "firmware"
        if pc < 0xffff800000000000:
            return "user"
        i = bisect.bisect_right(addrs, pc) - 1
        n = names[i] if i >= 0 else "?"
        return "idle" if n in ("default_idle", "native_safe_halt") else n

    with tempfile.TemporaryDirectory(prefix="uvm-profile-") as tmp:
        vhost, qemu = command_lines(args.uvmctl, args.machine, args.kernel, args.append, tmp)
        vsock_dev = os.path.join(tmp, "vhost.sock")
        vsock_uds = os.path.join(tmp, "vsock.sock")
        qmp_path = os.path.join(tmp, "qmp.sock")
        announce = socket.socket(socket.AF_UNIX)
        announce.bind(vsock_uds + "_1025")
        announce.listen(1)
        announce.setblocking(False)
        children = [subprocess.Popen(vhost)]
        try:
            wait_for(vsock_dev, children[0])
            # Paused until the first sample is due.
            children.append(subprocess.Popen(qemu + ["-S"], stderr=subprocess.DEVNULL))
            wait_for(qmp_path, children[1])
            qmp = Qmp(qmp_path)
            qmp.call("cont")
            t0 = time.monotonic()
            samples, ready_at = [], None
            while time.monotonic() - t0 < args.seconds:
                regs = qmp.call("human-monitor-command", **{"command-line": "info registers"}) or ""
                rip = next((t[4:] for t in regs.split() if t.startswith("RIP=")), None)
                if rip:
                    samples.append((time.monotonic() - t0, int(rip, 16)))
                if ready_at is None:
                    try:
                        announce.accept()
                        ready_at = time.monotonic() - t0
                        break
                    except BlockingIOError:
                        pass
        finally:
            for child in reversed(children):
                child.kill()
                child.wait()

    if not samples:
        sys.exit("no samples")
    counts = collections.Counter(name(pc) for _, pc in samples)
    print("%d samples over %.3f s; ready line %s" % (
        len(samples), samples[-1][0], "at %.3f s" % ready_at if ready_at else "not seen"))
    for sym, n in counts.most_common(args.top):
        print("%5.1f%%  %s" % (100.0 * n / len(samples), sym))
    print("\ntimeline (top symbols per 50 ms):")
    buckets = collections.defaultdict(collections.Counter)
    for t, pc in samples:
        buckets[int(t * 20)][name(pc)] += 1
    for b in sorted(buckets):
        print("%5d ms  %s" % (b * 50, ", ".join("%s:%d" % kv for kv in buckets[b].most_common(4))))


if __name__ == "__main__":
    main()
