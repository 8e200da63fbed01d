# shellcheck shell=bash
# shellcheck disable=SC2034 # UP_PID, UP_ADDR, NETEM_ERR, ... are for the callers
# Helpers shared by scripts/faults.sh, scripts/scale.sh and scripts/soak.sh.
#
# Everything here polls with a deadline instead of sleeping a fixed time, only
# touches processes, namespaces, veths and routes it created itself (recorded
# in FL_PIDS / FL_NETNS / FL_LINKS / FL_ROUTES) and removes them on exit.

set -uo pipefail

FL_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FL_NAME=${FL_NAME:-faults}
FL_DIR=${FL_DIR:-$(mktemp -d "/tmp/spliced-$FL_NAME.XXXXXX")}
FL_RESULTS=$FL_DIR/results.tsv
FL_PIDS=()
FL_NETNS=()
FL_LINKS=()
FL_ROUTES=()
FL_PASS=0
FL_FAIL=0
FL_SKIP=0
: >"$FL_RESULTS"
export NO_COLOR=1

SPLICED=${SPLICED:-$FL_ROOT/target/release/spliced}
LOADGEN_TARGET=${CARGO_TARGET_DIR:-$FL_ROOT/target}
LOADGEN=${LOADGEN:-$LOADGEN_TARGET/release/examples/loadgen}

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

now_ms() { date +%s%3N; }

# ------------------------------------------------------------ results ------

# pass NAME DETAIL / fail NAME DETAIL / skip NAME REASON
pass() {
    FL_PASS=$((FL_PASS + 1))
    printf 'PASS  %-44s %s\n' "$1" "${2:-}"
    printf '%s\tPASS\t%s\n' "$1" "${2:-}" >>"$FL_RESULTS"
}
fail() {
    FL_FAIL=$((FL_FAIL + 1))
    printf 'FAIL  %-44s %s\n' "$1" "${2:-}"
    printf '%s\tFAIL\t%s\n' "$1" "${2:-}" >>"$FL_RESULTS"
}
skip() {
    FL_SKIP=$((FL_SKIP + 1))
    printf 'SKIP  %-44s %s\n' "$1" "${2:-}"
    printf '%s\tSKIP\t%s\n' "$1" "${2:-}" >>"$FL_RESULTS"
}

# check NAME COND_DESCRIPTION... : collects failures of one scenario.
# Usage: chk_reset; chk "$((a == b))" "a=$a b=$b"; ...; chk_done NAME "figures"
FL_CHK_ERRS=()
chk_reset() { FL_CHK_ERRS=(); }
chk() { [ "$1" = 1 ] || FL_CHK_ERRS+=("$2"); }
chk_done() {
    if [ "${#FL_CHK_ERRS[@]}" -eq 0 ]; then
        pass "$1" "$2"
    else
        local IFS=';'
        fail "$1" "$2 -- ${FL_CHK_ERRS[*]}"
    fi
}

# need CMD PACKAGE : install PACKAGE (Debian) when CMD is missing.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        log "installing $2 (for $1)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 ||
            { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; }
    fi
    command -v "$1" >/dev/null 2>&1
}

# ------------------------------------------------------------ builds -------

build_tools() {
    if [ ! -x "$SPLICED" ] || [ -n "${FL_REBUILD:-}" ]; then
        log "building spliced (cargo build --release)"
        (cd "$FL_ROOT" && env -u CARGO_TARGET_DIR cargo build --release) || return 1
    fi
    log "building loadgen (cargo build --release --example loadgen)"
    (cd "$FL_ROOT" && CARGO_TARGET_DIR=$LOADGEN_TARGET cargo build --release --example loadgen) || return 1
    [ -x "$SPLICED" ] && [ -x "$LOADGEN" ]
}

# ------------------------------------------------------------ polling ------

# wait_until TIMEOUT_SECS CMD... : polls CMD every 50 ms; 0 when it succeeded.
wait_until() {
    local timeout=$1
    shift
    local end=$(($(now_ms) + ${timeout%.*} * 1000))
    while :; do
        "$@" && return 0
        [ "$(now_ms)" -ge "$end" ] && return 1
        sleep 0.05
    done
}

alive() { kill -0 "$1" 2>/dev/null; }
dead() { ! kill -0 "$1" 2>/dev/null; }

# A log file with ANSI colour codes removed (tracing may colour its output).
plain() { sed 's/\x1b\[[0-9;]*m//g' "$1"; }

# count_closed LOG [REASON] : "relay closed" lines (with that reason).
count_closed() {
    if [ -n "${2:-}" ]; then
        plain "$1" | grep 'relay closed' | grep -cE "reason=\"?$2(\"| |\$)" || true
    else
        plain "$1" | grep -c 'relay closed' || true
    fi
}
# reasons LOG : "reason=count ..." summary of the close lines.
reasons() {
    plain "$1" | grep 'relay closed' | grep -oE 'reason="?[a-z-]+' | tr -d '"' | sort | uniq -c |
        awk '{printf "%s%s=%s", (NR>1?" ":""), substr($2,8), $1}'
}
closed_at_least() { [ "$(count_closed "$1")" -ge "$2" ]; }

fd_count() { ls "/proc/$1/fd" 2>/dev/null | wc -l; }
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null; }
hwm_kb() { awk '/^VmHWM:/{print $2}' "/proc/$1/status" 2>/dev/null; }
fd_at_most() { [ "$(fd_count "$1")" -le "$2" ]; }

# jget FILE KEY : a field of a loadgen JSON summary (empty if missing).
jget() {
    local v
    v=$(jq -r ".$2 // empty" "$1" 2>/dev/null)
    echo "${v:--1}"
}

# --------------------------------------------------------- processes -------

# bg_run NAME CMD... : start CMD in the background, stdout/stderr to
# $FL_DIR/NAME.{out,err}; sets BG_PID.
bg_run() {
    local name=$1
    shift
    "$@" >"$FL_DIR/$name.out" 2>"$FL_DIR/$name.err" &
    BG_PID=$!
    FL_PIDS+=("$BG_PID")
    # Its exit status is never needed (loadgen reports in JSON); disowning
    # keeps bash from announcing the kills the scenarios do on purpose.
    disown "$BG_PID" 2>/dev/null
}

# start_upstream NAME [NETNS] ARGS... : loadgen upstream; sets UP_PID, UP_ADDR.
start_upstream() {
    local name=$1 ns=$2
    shift 2
    if [ -n "$ns" ]; then
        bg_run "$name" ip netns exec "$ns" "$LOADGEN" upstream "$@"
    else
        bg_run "$name" "$LOADGEN" upstream "$@"
    fi
    UP_PID=$BG_PID
    if ! wait_until 10 grep -qs 'listening on' "$FL_DIR/$name.err"; then
        log "upstream $name did not start: $(cat "$FL_DIR/$name.err")"
        return 1
    fi
    UP_ADDR=$(grep -m1 -o 'listening on [0-9.:]*' "$FL_DIR/$name.err" | awk '{print $3}')
}

# start_spliced NAME ARGS... : spliced run ARGS; sets SP_PID, SP_ADDR, SP_LOG.
# SP_AS=user runs it as that user (runuser).
start_spliced() {
    local name=$1
    shift
    SP_LOG=$FL_DIR/$name.log
    # SP_ENV="VAR=value ..." adds environment for diagnosis runs only.
    local extra_env=()
    [ -n "${SP_ENV:-}" ] && read -r -a extra_env <<<"$SP_ENV"
    if [ -n "${SP_AS:-}" ]; then
        runuser -u "$SP_AS" -- env RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 "${extra_env[@]}" \
            "$SPLICED" run "$@" >"$FL_DIR/$name.out" 2>"$SP_LOG" &
    else
        env RUST_LOG="${RUST_LOG:-info}" "${extra_env[@]}" "$SPLICED" run "$@" >"$FL_DIR/$name.out" 2>"$SP_LOG" &
    fi
    SP_PID=$!
    FL_PIDS+=("$SP_PID")
    if ! wait_until 10 grep -qs 'listening on' "$SP_LOG"; then
        log "spliced $name did not start: $(tail -5 "$SP_LOG")"
        return 1
    fi
    # runuser forks: find the spliced process itself.
    if [ -n "${SP_AS:-}" ]; then
        local child
        child=$(pgrep -P "$SP_PID" -x spliced | head -1)
        [ -n "$child" ] && SP_PID=$child && FL_PIDS+=("$SP_PID")
    fi
    SP_ADDR=$(plain "$SP_LOG" | grep -m1 -o 'listening on [0-9.]*:[0-9]*' | awk '{print $3}')
    [ -n "$SP_ADDR" ]
}

# stop_pid PID [SIGNAL] [TIMEOUT] : signal and wait for exit; 0 if it exited.
stop_pid() {
    local pid=$1 sig=${2:-TERM} t=${3:-10}
    kill -s "$sig" "$pid" 2>/dev/null || return 0
    wait_until "$t" dead "$pid" || {
        kill -KILL "$pid" 2>/dev/null
        return 1
    }
    wait "$pid" 2>/dev/null
    return 0
}

# ------------------------------------------------------------ network ------

FL_TAG=$(($$ % 100000))
FL_SUBNET=0

# make_ns NS_VAR VETH_VAR ROOT_IP_VAR NS_IP_VAR : a namespace with lo up and a
# veth pair to the root namespace on a fresh 10.200.X.0/30 (never used by
# anything else here). A blackhole route with a high metric stays behind the
# connected route, so traffic for the pair's addresses can never leave through
# the default route, even after the veth is gone.
make_ns() {
    local _x _ns _veth _rip _nip
    for _x in $(seq $((10 + FL_SUBNET)) 250); do
        if ! ip -4 addr | grep -q "10\.200\.$_x\." && ! ip -4 route | grep -q "10\.200\.$_x\."; then
            break
        fi
    done
    FL_SUBNET=$((_x - 9))
    _ns="spf$FL_TAG-$_x"
    _veth="spf${FL_TAG}r$_x"
    _veth=${_veth:0:15}
    _rip=10.200.$_x.1
    _nip=10.200.$_x.2
    ip route add blackhole "10.200.$_x.0/30" metric 4000 || return 1
    FL_ROUTES+=("10.200.$_x.0/30")
    ip netns add "$_ns" || return 1
    FL_NETNS+=("$_ns")
    ip link add "$_veth" type veth peer name eth1 netns "$_ns" || return 1
    FL_LINKS+=("$_veth")
    ip addr add "$_rip/30" dev "$_veth" &&
        ip link set "$_veth" up &&
        ip netns exec "$_ns" ip addr add "$_nip/30" dev eth1 &&
        ip netns exec "$_ns" ip link set eth1 up &&
        ip netns exec "$_ns" ip link set lo up || return 1
    printf -v "$1" '%s' "$_ns"
    printf -v "$2" '%s' "$_veth"
    printf -v "$3" '%s' "$_rip"
    printf -v "$4" '%s' "$_nip"
}

del_ns() {
    ip netns del "$1" 2>/dev/null
    return 0
}

netem_available() {
    # Probe on a throwaway veth pair of our own.
    local a="spf${FL_TAG}pa" b="spf${FL_TAG}pb" ok=1
    ip link add "$a" type veth peer name "$b" 2>/dev/null || return 1
    NETEM_ERR=$(tc qdisc add dev "$a" root netem delay 1ms 2>&1) && ok=0
    ip link del "$a" 2>/dev/null
    return $ok
}

# ------------------------------------------------------------ cleanup ------

fl_cleanup() {
    local p ns l r
    for p in "${FL_PIDS[@]}"; do
        kill -KILL "$p" 2>/dev/null
    done
    for ns in "${FL_NETNS[@]}"; do
        ip netns pids "$ns" 2>/dev/null | while read -r p; do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    for l in "${FL_LINKS[@]}"; do
        ip link del "$l" 2>/dev/null
    done
    for r in "${FL_ROUTES[@]}"; do
        ip route del blackhole "$r" metric 4000 2>/dev/null
    done
    wait 2>/dev/null
    return 0
}
trap fl_cleanup EXIT
trap 'exit 130' INT TERM

# fd_kinds PID -> "sockets pipes other"
fd_kinds() {
    ls -l "/proc/$1/fd" 2>/dev/null | awk 'NR>1{ if ($NF ~ /^socket:/) s++; else if ($NF ~ /^pipe:/) p++; else o++ }
        END { printf "%d %d %d\n", s, p, o }'
}

# fds_back PID "BASE_SOCK BASE_PIPE BASE_OTHER": sockets and other fds exactly
# back, pipes at most the base plus what the idle pools may keep (the caller
# sets POOL_SLACK, in fds).
fds_back() {
    local cur base
    read -r -a cur <<<"$(fd_kinds "$1")"
    read -r -a base <<<"$2"
    [ "${cur[0]}" -le "${base[0]}" ] && [ "${cur[2]}" -le "${base[2]}" ] &&
        [ "${cur[1]}" -le $((base[1] + ${POOL_SLACK:?set POOL_SLACK before fds_back})) ]
}
