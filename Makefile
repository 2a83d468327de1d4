# Two entry points do everything on a fresh machine:
#   make run   set up, build, boot a utility VM, run `uname -a` in it, tear it down
#   make test  set up, build, run every test (unit, property, real-VM)

CARGO ?= cargo
TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(TARGET)/agent/uvm-agent
CMD ?= uname -a

.PHONY: setup toolchain agent build run test lint

# The toolchain rust-toolchain.toml pins, known to rustup by that name (seconds; setup does it too).
toolchain:
	bash scripts/setup.sh toolchain

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

test: setup agent
	$(CARGO) nextest run --workspace --profile ci --run-ignored all
	$(CARGO) test --workspace --doc

lint: toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
