# A code sandbox's policy: the host may run only `echo`, `cat` and `true` (by program name,
# with any arguments, environment and working directory, from the system's own directories),
# mount shares only read-only and away from the guest's system directories, and end what it
# started (SIGTERM, SIGKILL). Everything else the agent decides is refused: every other
# program (`sh` included), disks, writable shares, copying files in or out, other signals,
# stack dumps. It takes no fragments: whoever holds the VM's API could otherwise lift it (see
# the end for how to take exactly the fragments you name). The input document of each rule is
# in docs/policy.md. Note that `cat` with any arguments prints any file the guest can read.
#
# The sets are written out in the rules rather than named: every decision evaluates its rule
# afresh, and a named rule costs an evaluation of its own (under TCG, in the guest, a large
# share of an exec's time; BENCHMARKS.md, "Security policy").
package uvmctl.policy

import rego.v1

default exec := false

# `dir` is the directory of the file the agent will run: a program of an allowed name anywhere
# else (on a share, say) is not the guest's.
exec if {
	input.program in {"echo", "cat", "true"}
	input.dir in {"/bin", "/sbin", "/usr/bin", "/usr/sbin"}
}

# Ending a program the policy let start gives the host nothing new (it can stop the VM), and
# without it an exec whose caller went away could not be ended.
default signal := false

signal if input.signal in {9, 15}

# A share over the root or a system directory would replace what `exec` allows (or the
# guest's own files): those, and everything under them, are refused.
default mount_share := false

mount_share if {
	input.read_only
	not over_system(input.guest_path)
}

over_system(path) if path == "/"

over_system(path) if strings.any_prefix_match(
	concat("", [path, "/"]),
	{"/bin/", "/sbin/", "/usr/", "/lib/", "/etc/", "/init/", "/dev/", "/proc/", "/sys/"},
)

# Unmounting what mount_share allowed gives nothing new to the host.
default unmount_share := false

unmount_share if not over_system(input.guest_path)

# No fragments. To take exactly the ones you name, list their digests (sha256sum FILE):
#   load_fragment if input.sha256 in {"<sha256 of the fragment's text>"}
default load_fragment := false
