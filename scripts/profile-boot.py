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

Defaults: the newest image under ~/.cache/uvmctl/images, our kernel's System.map, the clock
arguments uvm-qemu gives a TCG guest and the fast-boot arguments of its base command line.
"""
import argparse
import bisect
import collections
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("UVMCTL_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uvmctl")


def newest_image():
    dirs = [d for d in glob.glob(os.path.join(CACHE, "images", "*"))
            if os.path.isfile(os.path.join(d, "vmlinux")) and os.path.isfile(os.path.join(d, "initramfs.cpio"))]
    if not dirs:
        sys.exit("no image under %s/images: run `make run` once" % CACHE)
    return max(dirs, key=os.path.getmtime)


def host_tsc_khz():
    """The host TSC frequency as the guest needs it; /proc/cpuinfo's figure is close enough
    for profiling (uvm-qemu measures it properly)."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    sys.exit("no cpu MHz in /proc/cpuinfo")


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
    ap.add_argument("--image", help="image directory (vmlinux, initramfs.cpio)")
    ap.add_argument("--system-map", default=os.path.join(CACHE, "kernel/ours/current/System.map"))
    ap.add_argument("--append", default="", help="more kernel arguments")
    ap.add_argument("--seconds", type=float, default=3.0, help="stop sampling after this long")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()

    image = args.image or newest_image()
    vhost = shutil.which("vhost-device-vsock") or os.path.expanduser("~/.cargo/bin/vhost-device-vsock")
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
        vsock_dev = os.path.join(tmp, "vhost.sock")
        vsock_uds = os.path.join(tmp, "vsock.sock")
        qmp_path = os.path.join(tmp, "qmp.sock")
        announce = socket.socket(socket.AF_UNIX)
        announce.bind(vsock_uds + "_1025")
        announce.listen(1)
        announce.setblocking(False)
        children = [subprocess.Popen([vhost, "--vm", "guest-cid=3,socket=%s,uds-path=%s" % (vsock_dev, vsock_uds)])]
        try:
            while not os.path.exists(vsock_dev):
                time.sleep(0.001)
            bus = "pci" if args.machine == "q35" else "device"
            machine = (["-M", "q35,accel=tcg"] if args.machine == "q35" else
                       ["-bios", "/usr/share/qemu/qboot.rom",
                        "-M", "microvm,accel=tcg,x-option-roms=off,isa-serial=on,rtc=on"])
            append = ("console=ttyS0 quiet panic=-1 noreplace-smp no_timer_check reserved_poison=off "
                      "tsc_early_khz=%d tsc=reliable lapic_timer_khz=1000000 %s" % (host_tsc_khz(), args.append))
            qemu = machine + [
                "-cpu", "max", "-smp", "1", "-m", "256",
                "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
                "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-kernel", os.path.join(image, "vmlinux"), "-initrd", os.path.join(image, "initramfs.cpio"),
                "-append", append, "-serial", "file:" + os.path.join(tmp, "console.log"),
                "-chardev", "socket,id=vsock,path=" + vsock_dev, "-device", "vhost-user-vsock-%s,chardev=vsock" % bus,
                "-qmp", "unix:%s,server=on,wait=on" % qmp_path, "-S"]
            children.append(subprocess.Popen(["qemu-system-x86_64"] + qemu, stderr=subprocess.DEVNULL))
            while not os.path.exists(qmp_path):
                time.sleep(0.001)
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
