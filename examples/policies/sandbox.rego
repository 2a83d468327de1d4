# A code sandbox's policy: the host may run only `echo`, `cat` and `true` (by program name,
# with any arguments, environment and working directory, from the system's own directories),
# and mount shares only read-only and away from the guest's system directories, and end what
# it started (SIGTERM, SIGKILL). Everything else the agent decides is refused: every other
# program (`sh` included), disks, writable shares, copying files in or out, other signals,
# stack dumps. Fragments in packages under
# `fragment.` may add to it (say, one more command). The input document of each rule is in
# docs/policy.md.
package uvmctl.policy

import rego.v1

allowed_programs := {"echo", "cat", "true"}

# Where the guest's own programs live (busybox's applets). A program of an allowed name
# anywhere else (on a share, say) is not the guest's.
system_dirs := {"/bin", "/sbin", "/usr/bin", "/usr/sbin"}

default exec := false

exec if {
	input.program in allowed_programs
	in_system_dir(input.path)
}

in_system_dir(path) if {
	some dir in system_dirs
	path == concat("/", [dir, input.program])
}

# Ending a program the policy let start gives the host nothing new (it can stop the VM), and
# without it an exec whose caller went away could not be ended.
default signal := false

signal if input.signal in {9, 15}

default mount_share := false

mount_share if {
	input.read_only
	not over_system(input.guest_path)
}

# The guest's root and system directories, and anything under them, are not for shares:
# a share over /bin would replace the programs `exec` allows.
protected := {"/bin", "/sbin", "/usr", "/lib", "/etc", "/init", "/dev", "/proc", "/sys"}

over_system(path) if path == "/"

over_system(path) if {
	some dir in protected
	path == dir
}

over_system(path) if {
	some dir in protected
	startswith(path, concat("", [dir, "/"]))
}

# Unmounting what mount_share allowed gives nothing new to the host.
default unmount_share := false

unmount_share if not over_system(input.guest_path)

default load_fragment := false

load_fragment if startswith(input.package, "fragment.")
