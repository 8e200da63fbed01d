#!/usr/bin/env bash
# Where a proxy's CPU goes on small messages and new connections: runs one
# spliced worker as a `spliced bench --target`, records it with `perf record
# -g` during the connect and the rr workloads, and prints the share of
# user space, of each system call (children included) and of the softirq
# network receive work that loopback runs on the sender's CPU.
#
#   bash scripts/bench-profile.sh            # MODE=splice, the proxy on CPU 1
#   MODE=copy PROXY_CPU=0 bash scripts/bench-profile.sh
#
# Needs perf (Debian package linux-perf) and kernel.perf_event_paranoid <= 2
# for a process of one's own. Only loopback addresses are used.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

MODE=${MODE:-splice}
PROXY_CPU=${PROXY_CPU:-$(($(nproc) > 1 ? 1 : 0))}
LOAD_CPU=${LOAD_CPU:-0}
command -v perf >/dev/null || lib_apt_install linux-perf || {
    lib_log "perf is missing; run as root so apt-get can install linux-perf"
    exit 1
}
[[ -x $SPLICED_BIN ]] || lib_build || lib_die "cargo build --release failed"
lib_init profile
W="$LIB_TMP"

profile() { # workload
    local up port pid perf_pid
    up="$(lib_free_port)"
    port="$(lib_free_port)"
    RUST_LOG=warn taskset -c "$PROXY_CPU" "$SPLICED_BIN" run --listen "127.0.0.1:$port" \
        --upstream "127.0.0.1:$up" --workers 1 --mode "$MODE" >"$W/spliced-$1.log" 2>&1 &
    pid=$!
    lib_on_exit "lib_stop_pid $pid 2"
    lib_wait_port "$port" || lib_die "spliced did not listen on $port"
    perf record -q -F 4999 -g -p "$pid" -o "$W/$1.data" 2>"$W/perf-$1.err" &
    perf_pid=$!
    taskset -c "$LOAD_CPU" "$SPLICED_BIN" bench -w "$1" -e target --target "spliced-$MODE=127.0.0.1:$port" \
        --target-pid "$pid" --upstream "127.0.0.1:$up" | sed -n "/^$1/,/^\$/p"
    kill -INT "$perf_pid"
    wait "$perf_pid" || true
    lib_stop_pid "$pid" 2
    echo "where spliced-$MODE's CPU went during '$1' (perf samples, % of the proxy's):"
    perf report -i "$W/$1.data" --no-children --sort dso -g none 2>/dev/null |
        awk '/^ +[0-9.]+%/ {printf "  %-28s %s\n", $2, $1}'
    perf report -i "$W/$1.data" --children --sort sym -g none 2>/dev/null |
        awk '$4 ~ /^(__x64_sys_|net_rx_action$|finish_task_switch)/ && $1+0 >= 0.5 {
                 sub(/^__x64_sys_/, "", $4); printf "  %-28s %s\n", $4, $1 }'
    echo
}

profile connect
profile rr
