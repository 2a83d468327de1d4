# Two entry points do everything on a fresh machine:
#   make run    set up, build, boot a utility VM, run `uname -a` in it, tear it down
#   make test   set up, build, run every test (unit, property, real-VM; Rust, then the Python client)
# Two more for the edit loop; they need neither the VM set-up nor the agent, and boot no VM:
#   make lint   rustfmt, clippy, rustdoc and cargo-deny, warnings as errors (CI runs it first)
#   make check  make lint, then every test except the real-VM ones (Rust and Python)

CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(TARGET)/agent/uvm-agent
CMD ?= uname -a
# The tests that boot QEMU and need the set-up and the agent are all named `real_vm_*`; those
# that need the host itself as root (its cgroups) `real_host_*`.
NO_VM := not test(/^real_(vm|host)_/)

.PHONY: setup toolchain lint-tools agent build run test lint check

# The toolchain rust-toolchain.toml pins, known to rustup by that name (seconds; setup does it too).
toolchain:
	bash scripts/setup.sh toolchain

# The toolchain and cargo-deny (minutes the first time, seconds after).
lint-tools:
	bash scripts/setup.sh lint-tools

# Machine set-up (idempotent, seconds when done), then our guest kernel (minutes the first time,
# under a second when up to date).
setup:
	bash scripts/setup.sh
	bash scripts/build-kernel.sh

# The in-guest agent is PID 1 of the VM: a static binary.
agent: toolchain
	CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
		$(CARGO) build --profile agent -p uvm-agent --target $(TARGET)

build: agent
	$(CARGO) build --release -p uvmctl

run: setup build
	target/release/uvmctl run -- $(CMD)

# The Python client's tests run against the debug uvmctl the Rust tests just built (not a
# release build that `make run` may have left behind).
test: setup agent
	$(CARGO) nextest run --workspace --profile ci --locked
	$(CARGO) test --workspace --doc --locked
	$(CARGO) build -p uvmctl --locked
	UVMCTL=$(CURDIR)/target/debug/uvmctl bash scripts/test-python.sh

# cargo-deny reports duplicate crate versions as warnings; run it without --hide-inclusion-graph to
# see what pulls a crate in.
lint: lint-tools
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --locked
	$(CARGO) deny --locked check --hide-inclusion-graph licenses bans sources

check: lint
	$(CARGO) nextest run --workspace --locked -E '$(NO_VM)'
	$(CARGO) test --workspace --doc --locked
	bash scripts/test-python.sh -m "not real_vm"
