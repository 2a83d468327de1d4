# Allows every request the agent decides, and any fragment: the behaviour of a VM without a
# policy, written out. A starting point to tighten, rule by rule. The input document of each
# rule is in docs/policy.md.
package uvmctl.policy

exec := true

signal := true

mount_disk := true

unmount_disk := true

mount_share := true

unmount_share := true

write_file := true

read_file := true

dump_stacks := true

load_fragment := true
