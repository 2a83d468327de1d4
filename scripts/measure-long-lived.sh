#!/usr/bin/env bash
# Hand measurements of the long-lived workflow, until they are rows of `uvmctl bench`:
#   - `create --start` against `run -- true` (a one-shot boot, exec and teardown), alternated,
#     medians and their ratio from the same run;
#   - the supervisor's resident memory (VmRSS) with its VM running;
#   - `uvmctl ps` with N VMs (default 8) created and running;
#   - `uvmctl exec ID -- true` (a CLI process, a gRPC stream, the guest exec).
# Uses target/release/uvmctl (build it with `cargo build --release -p uvmctl`) and a private root
# it removes at the end, whatever happens. Prints one line per figure.
set -euo pipefail
cd "$(dirname "$0")/.."
UVMCTL="${UVMCTL:-$PWD/target/release/uvmctl}"
N="${N:-8}"
PAIRS="${PAIRS:-8}"
[ -x "$UVMCTL" ] || { echo "measure: $UVMCTL missing (cargo build --release -p uvmctl)" >&2; exit 1; }
root="$(mktemp -d /tmp/uvmctl-measure.XXXXXX)"
cleanup() {
    for id in $("$UVMCTL" --root "$root" ps -a --json 2>/dev/null | python3 -c \
        'import json,sys; [print(v["id"]) for v in json.load(sys.stdin)]' 2>/dev/null); do
        "$UVMCTL" --root "$root" rm -f "$id" >/dev/null 2>&1 || true
    done
    rm -rf "$root"
}
trap cleanup EXIT
u() { "$UVMCTL" --root "$root" "$@"; }
# Microseconds of wall clock from bash itself: spawning a timer process would be measured too.
now_us() { echo "${EPOCHREALTIME/./}"; }
median() { python3 -c 'import statistics,sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.1f}")' "$@"; }
time_ms() {
    local t0 t1
    t0=$(now_us); "$@" >/dev/null; t1=$(now_us)
    echo "$(( (t1 - t0) / 1000 )).$(( (t1 - t0) % 1000 / 100 ))"
}

create_ms=() run_ms=()
for _ in $(seq "$PAIRS"); do
    run_ms+=("$(time_ms "$UVMCTL" run -- true)")
    t0=$(now_us); id=$(u create --start); t1=$(now_us)
    create_ms+=("$(( (t1 - t0) / 1000 ))")
    u rm -f "$id" >/dev/null
done
c=$(median "${create_ms[@]}") r=$(median "${run_ms[@]}")
echo "create --start p50 ${c} ms; run -- true p50 ${r} ms; ratio $(python3 -c "print(f'{$c / $r:.2f}')") ($PAIRS pairs, alternated)"

ids=()
for _ in $(seq "$N"); do ids+=("$(u create --start)"); done
sup=$(u inspect --json "${ids[0]}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pids"]["supervisor"])')
echo "supervisor VmRSS $(awk '/^VmRSS/ {print $2, $3}' "/proc/$sup/status") (pid $sup, its VM running)"
ps_ms=()
for _ in $(seq 20); do ps_ms+=("$(time_ms "$UVMCTL" --root "$root" ps)"); done
echo "ps with $N VMs p50 $(median "${ps_ms[@]}") ms (20 runs)"
exec_ms=()
for _ in $(seq 20); do exec_ms+=("$(time_ms "$UVMCTL" --root "$root" exec "${ids[0]}" -- true)"); done
echo "uvmctl exec -- true p50 $(median "${exec_ms[@]}") ms (20 runs, CLI process included)"
