#!/usr/bin/env bash
# Fault injection for spliced.
#
# spliced runs in the root namespace; upstreams run in network namespaces this
# script creates, behind veth pairs on 10.200.X.0/30 (only addresses created
# here are ever used). Every scenario starts its own spliced (port 0), drives
# it with examples/loadgen.rs (every byte checked), injects one fault and then
# checks: what the clients saw and when, the close reasons spliced logged,
# and that its sockets/fds went back to the baseline.
#
# Needs root (namespaces, veth, tc). netem scenarios are skipped, with the
# reason printed, where the kernel has no sch_netem.
#
# Env: FAULT_MODES="splice copy" (modes to run), FAULTS_ONLY=regex (scenario
# names to run), SPLICED_BIN, LOADGEN, KEEP=1 (keep the work dir; it is also
# kept when a scenario failed).
#
# Last line: "faults: N passed, M failed, K skipped"; exit 1 if M > 0.

# No errexit: a failing step is recorded as a failed check and the run goes on.
set -uo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
lib_init faults keep-failed

MODES=${FAULT_MODES:-splice copy}
ONLY=${FAULTS_ONLY:-.}
IDLE=2   # seconds, --idle-timeout of most scenarios
FIN=2    # seconds, --fin-timeout
CONN_TO_MS=500
WORKERS=2
POOL_SLACK=$((2 * 64 * WORKERS)) # idle pipes a worker may keep (2 fds each)

if [ "$(id -u)" != 0 ]; then
    echo "faults.sh needs root (network namespaces, veth, tc)" >&2
    echo "faults: 0 passed, 1 failed, 0 skipped"
    exit 1
fi
for t in ip:iproute2 tc:iproute2 jq:jq; do
    lib_need "${t%%:*}" "${t#*:}" || {
        echo "faults.sh needs ${t%%:*}" >&2
        echo "faults: 0 passed, 1 failed, 0 skipped"
        exit 1
    }
done
lib_build loadgen >"$LIB_TMP/build.log" 2>&1 || {
    tail -20 "$LIB_TMP/build.log"
    echo "build failed" >&2
    echo "faults: 0 passed, 1 failed, 0 skipped"
    exit 1
}
lib_log "work dir $LIB_TMP"

want() { [[ $1 =~ $ONLY ]]; }

# progress_ok ERRFILE ESTABLISHED MIN_VERIFIED: loadgen's last progress line.
progress_ok() {
    local line est ver
    line=$(grep '^progress' "$1" | tail -1)
    est=$(grep -o 'established=[0-9]*' <<<"$line" | cut -d= -f2)
    ver=$(grep -o 'verified=[0-9]*' <<<"$line" | cut -d= -f2)
    [ -n "$est" ] && [ "$est" -ge "$2" ] && [ "${ver:-0}" -ge "$3" ]
}

# only_reasons REASON... : 1 if every close line of this scenario's spliced
# has one of these reasons, else 0 (for lib_chk).
only_reasons() { echo "$(($(lib_closes "$SPLICED_LOG") == $(lib_closes "$SPLICED_LOG" "$@")))"; }

# stop_spliced: SIGTERM to this scenario's spliced; it must exit 0 within 10 s
# (no relay left).
stop_spliced() {
    if lib_stop_pid "$SPLICED_PID" 10; then
        lib_chk "$((LIB_STOP_STATUS == 0))" "spliced exited $LIB_STOP_STATUS after SIGTERM"
    else
        lib_chk 0 "spliced still running 10s after SIGTERM"
    fi
}

# run_clients NAME ARGS... : loadgen clients in the foreground -> $LIB_TMP/NAME.json
run_clients() {
    local name=$1
    shift
    "$LOADGEN" clients --progress 0.2 "$@" >"$LIB_TMP/$name.json" 2>"$LIB_TMP/$name.err"
}

summary_of() { jq -c '{ok,rst_sent,errors,corrupt,reset,eof_early,timeout,connect_failed,bytes_verified,elapsed_ms}' "$1" 2>/dev/null; }

# ------------------------------------------------------------ network ------
# Only namespaces, veths and routes made here are touched (recorded in
# FL_NETNS / FL_LINKS / FL_ROUTES), and they are removed at exit.
FL_TAG=$(($$ % 100000))
FL_SUBNET=0
FL_NETNS=()
FL_LINKS=()
FL_ROUTES=()

net_cleanup() {
    local p ns l r
    for ns in "${FL_NETNS[@]}"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    for l in "${FL_LINKS[@]}"; do
        ip link del "$l" 2>/dev/null
    done
    for r in "${FL_ROUTES[@]}"; do
        ip route del blackhole "$r" metric 4000 2>/dev/null
    done
    return 0
}
lib_on_exit net_cleanup

# make_ns NS_VAR VETH_VAR ROOT_IP_VAR NS_IP_VAR : a namespace with lo up and a
# veth pair to the root namespace on a fresh 10.200.X.0/30 (never used by
# anything else here). A blackhole route with a high metric stays behind the
# connected route, so traffic for the pair's addresses can never leave through
# the default route, even after the veth is gone.
make_ns() {
    local _x _ns _veth _rip _nip _addrs _routes
    _addrs=$(ip -4 addr)
    _routes=$(ip -4 route)
    for _x in $(seq $((10 + FL_SUBNET)) 250); do
        if ! grep -q "10\.200\.$_x\." <<<"$_addrs" && ! grep -q "10\.200\.$_x\." <<<"$_routes"; then
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

# netem_available: probes on a throwaway veth pair of our own; NETEM_ERR says
# why not.
netem_available() {
    local a="spf${FL_TAG}pa" b="spf${FL_TAG}pb" ok=1
    ip link add "$a" type veth peer name "$b" 2>/dev/null || return 1
    NETEM_ERR=$(tc qdisc add dev "$a" root netem delay 1ms 2>&1) && ok=0
    ip link del "$a" 2>/dev/null
    return $ok
}

# ------------------------------------------------------------------------
# Namespaces: U holds the upstreams, D is a dead end (its link is down, so
# SYNs to it vanish), C is created per client-vanish run.
make_ns NS_U VETH_U IP_UR IP_U || { echo "faults: 0 passed, 1 failed, 0 skipped"; exit 1; }
make_ns NS_D VETH_D IP_DR IP_D || { echo "faults: 0 passed, 1 failed, 0 skipped"; exit 1; }
ip netns exec "$NS_D" ip link set eth1 down
# A permanent neighbour entry: no ARP, so a connect to $IP_D is never refused
# or failed fast (EHOSTUNREACH); its SYNs are silently dropped by the dead link.
ip neigh replace "$IP_D" lladdr 02:00:00:00:00:01 dev "$VETH_D" nud permanent
lib_log "upstream ns $NS_U ($IP_UR <-> $IP_U), dead-end ns $NS_D ($IP_D, link down)"

HAVE_NETEM=1
if ! netem_available; then
    HAVE_NETEM=0
    lib_log "netem unavailable: ${NETEM_ERR:-tc qdisc add ... netem failed}"
fi

common_args() { echo "--mode $1 --workers $WORKERS --idle-timeout ${IDLE}s --fin-timeout ${FIN}s --connect-timeout ${CONN_TO_MS}ms"; }

# ---------------------------------------------------------------- 0 -----
# The checkers themselves: a corrupting upstream must be caught.
sc_selftest() {
    local mode=$1 n=8 name="selftest-corrupt-$1"
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 --corrupt-at 5000 || { lib_fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SPLICED_ADDR" -n $n --bytes 20000 --deadline 20
    local f=$LIB_TMP/$name.json
    lib_chk "$(($(lib_json "$f" corrupt) == n))" "corrupt=$(lib_json "$f" corrupt), want $n (checker missed a flipped byte)"
    stop_spliced
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "$(summary_of "$f")"
}

# ---------------------------------------------------------------- 1 -----
# Bulk + request/response traffic through the veth, all behaviours mixed,
# optionally under a netem qdisc on both ends of the veth.
netem_off() {
    tc qdisc del dev "$VETH_U" root 2>/dev/null
    ip netns exec "$NS_U" tc qdisc del dev eth1 root 2>/dev/null
    return 0
}

sc_traffic() {
    local mode=$1 label=$2 netem=${3:-} name n=32 base f fr
    name="traffic-$label-$mode"
    want "$name" || return 0
    if [ -n "$netem" ] && [ "$HAVE_NETEM" = 0 ]; then
        lib_skip "$name" "kernel lacks sch_netem ('tc qdisc add ... netem $netem': ${NETEM_ERR:-unknown qdisc})"
        return
    fi
    lib_chk_reset
    if [ -n "$netem" ]; then
        # shellcheck disable=SC2086
        tc qdisc add dev "$VETH_U" root netem $netem &&
            ip netns exec "$NS_U" tc qdisc add dev eth1 root netem $netem ||
            { lib_fail "$name" "tc qdisc add netem $netem failed"; return; }
    fi
    loadgen_upstream "$name-up" "$NS_U" --listen "$IP_U:0" || { lib_fail "$name" "upstream"; netem_off; return; }
    # A long idle timeout: slow readers may drain kernel buffers for seconds
    # while no byte moves through spliced, and that would (rightly) be idle.
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout 20s --fin-timeout ${FIN}s || { lib_fail "$name" "spliced did not start"; netem_off; return; }
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    local t0
    t0=$(lib_now_ms)
    run_clients "$name" --target "$SPLICED_ADDR" -n $n -c $n --pattern mixed --bytes 2000000 --bytes-min 1 \
        --mix normal=5,early-fin=2,reset=1,slow=2 --slow-chunk 16384 --seed 11 --deadline 120 --conn-deadline 90
    f=$LIB_TMP/$name.json
    run_clients "$name-rr" --target "$SPLICED_ADDR" -n 16 --pattern rr --rr-size 256 --bytes $((256 * 200)) --seed 12 --deadline 120
    fr=$LIB_TMP/$name-rr.json
    local ok rst rok
    ok=$(lib_json "$f" ok); rst=$(lib_json "$f" rst_sent); rok=$(lib_json "$fr" ok)
    lib_chk "$(($(lib_json "$f" errors) == 0))" "bulk errors=$(lib_json "$f" errors) $(jq -c .details "$f")"
    lib_chk "$((ok + rst == n))" "bulk ok+rst_sent=$((ok + rst)) of $n"
    lib_chk "$((rok == 16))" "rr ok=$rok of 16 $(jq -c .details "$fr")"
    lib_chk "$(($(lib_json "$f" bytes_verified) > 0))" "nothing verified"
    if [[ $netem == *delay* ]]; then
        # Both ends delay 20 ms: a round trip cannot be faster than ~40 ms.
        lib_chk "$(($(lib_json "$fr" rr_p50_us) >= 38000))" "rr p50 $(lib_json "$fr" rr_p50_us)us < 38ms: netem not in effect?"
    fi
    # Every relay closed, within the FIN/idle deadline after the clients ended.
    if ! lib_wait_until $((FIN + 3)) lib_closes_at_least "$SPLICED_LOG" $((n + 16)); then
        lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes for $((n + 16)) relays"
    fi
    lib_chk "$(only_reasons eof client-reset)" "unexpected reasons: $(lib_close_reasons "$SPLICED_LOG")"
    lib_wait_until 5 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds) vs base $base"
    stop_spliced
    lib_stop_pid "$UP_PID" 10 KILL
    netem_off
    lib_chk_done "$name" "bulk $(summary_of "$f") rr_p50=$(lib_json "$fr" rr_p50_us)us rr_p99=$(lib_json "$fr" rr_p99_us)us closes: $(lib_close_reasons "$SPLICED_LOG") in $(($(lib_now_ms) - t0))ms"
}

# u_link_up: the upstream namespace's link back up. While it was down the
# neighbour entries of both ends went INCOMPLETE/FAILED, re-probed only once a
# second: flushed, so that the next scenario's first SYNs are not held for up
# to a second (longer than its connect timeout).
u_link_up() {
    ip netns exec "$NS_U" ip link set eth1 up
    ip neigh flush dev "$VETH_U" 2>/dev/null
    ip netns exec "$NS_U" ip neigh flush dev eth1 2>/dev/null
    return 0
}

# Long windowed transfers that are mid-way when a fault hits.
start_long_clients() {
    local name=$1 target=$2 n=$3 netns=${4:-}
    local args=(clients --target "$target" -n "$n" --pattern echo --bytes 200000000 --window 65536
        --rate 2000000 --deadline 60 --progress 0.1 --seed 21)
    if [ -n "$netns" ]; then
        lib_bg "$name" ip netns exec "$netns" "$LOADGEN" "${args[@]}"
    else
        lib_bg "$name" "$LOADGEN" "${args[@]}"
    fi
    LG_PID=$LIB_BG_PID
    lib_wait_until 20 progress_ok "$LIB_TMP/$name.err" "$n" $((n * 65536))
}

# ---------------------------------------------------------------- 2 -----
# The upstream's link goes down mid-transfer: nothing moves any more, so the
# idle timeout must end every relay; no byte may be corrupted.
sc_linkdown() {
    local mode=$1 n=32 name="link-down-midtransfer-$1" base t0 f
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-up" "$NS_U" --listen "$IP_U:0" || { lib_fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    if ! start_long_clients "$name-cl" "$SPLICED_ADDR" $n; then
        lib_fail "$name" "transfers did not get going: $(grep '^progress' "$LIB_TMP/$name-cl.err" | tail -1)"
        u_link_up
        return
    fi
    t0=$(lib_now_ms)
    ip netns exec "$NS_U" ip link set eth1 down
    local deadline=$((IDLE + 3))
    if ! lib_wait_until "$deadline" lib_pid_gone "$LG_PID"; then
        lib_chk 0 "clients still open ${deadline}s after the link went down"
    fi
    f=$LIB_TMP/$name-cl.out
    lib_chk "$(($(lib_json "$f" corrupt) == 0))" "corrupt=$(lib_json "$f" corrupt) $(jq -c .details "$f")"
    lib_chk "$(($(lib_json "$f" ok) == 0))" "ok=$(lib_json "$f" ok): transfers cannot have completed"
    lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "ended by reset/eof: $(($(lib_json "$f" reset) + $(lib_json "$f" eof_early))) of $n"
    local first last
    first=$(($(lib_json "$f" first_bad_ms) - t0)); last=$(($(lib_json "$f" last_bad_ms) - t0))
    lib_chk "$((first >= IDLE * 1000 - 300))" "first relay ended ${first}ms after link down, before the ${IDLE}s idle timeout"
    lib_chk "$((last <= IDLE * 1000 + 2500))" "last relay ended ${last}ms after link down (idle timeout ${IDLE}s)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes of $n"
    lib_chk "$(only_reasons idle fin-timeout upstream-reset)" "reasons: $(lib_close_reasons "$SPLICED_LOG")"
    lib_wait_until 5 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds) vs base $base"
    local after
    after=$(lib_fd_count "$SPLICED_PID" kinds)
    stop_spliced
    u_link_up
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "clients ended ${first}..${last}ms after link down; verified $(lib_json "$f" bytes_verified)B; closes: $(lib_close_reasons "$SPLICED_LOG"); fds sock/pipe/other base $base after $after"
}

# ---------------------------------------------------------------- 3 -----
# The upstream is SIGKILLed mid-transfer. With SO_LINGER 0 its kernel resets
# every connection: the clients must see a reset promptly. Without it the
# kernel sends FIN (or RST for unread data): clients must see the stream end
# early, never a wrong byte.
sc_kill() {
    local mode=$1 linger=$2 n=32 name base t0 f
    name="upstream-sigkill-$([ "$linger" = 1 ] && echo rst || echo fin)-$mode"
    want "$name" || return 0
    lib_chk_reset
    local extra=()
    [ "$linger" = 1 ] && extra=(--linger0)
    loadgen_upstream "$name-up" "$NS_U" --listen "$IP_U:0" "${extra[@]}" || { lib_fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    if ! start_long_clients "$name-cl" "$SPLICED_ADDR" $n; then
        lib_fail "$name" "transfers did not get going: $(grep '^progress' "$LIB_TMP/$name-cl.err" | tail -1)"
        return
    fi
    t0=$(lib_now_ms)
    # ip netns exec execs the upstream: UP_PID is the upstream itself.
    kill -KILL "$UP_PID"
    local limit_ms
    if [ "$linger" = 1 ]; then limit_ms=1000; else limit_ms=$((FIN * 1000 + 2000)); fi
    lib_wait_until $((limit_ms / 1000 + 3)) lib_pid_gone "$LG_PID" || lib_chk 0 "clients still open $((limit_ms / 1000 + 3))s after the kill"
    f=$LIB_TMP/$name-cl.out
    local last
    last=$(($(lib_json "$f" last_bad_ms) - t0))
    lib_chk "$(($(lib_json "$f" corrupt) == 0))" "corrupt=$(lib_json "$f" corrupt) $(jq -c .details "$f")"
    if [ "$linger" = 1 ]; then
        lib_chk "$(($(lib_json "$f" reset) == n))" "reset=$(lib_json "$f" reset) of $n (others: eof_early=$(lib_json "$f" eof_early) ok=$(lib_json "$f" ok))"
    else
        lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "ended early: $(($(lib_json "$f" reset) + $(lib_json "$f" eof_early))) of $n"
    fi
    lib_chk "$((last <= limit_ms))" "last client ended ${last}ms after the kill (limit ${limit_ms}ms)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes of $n"
    if [ "$linger" = 1 ]; then
        lib_chk "$(($(lib_closes "$SPLICED_LOG" upstream-reset) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want upstream-reset=$n)"
    else
        lib_chk "$(only_reasons upstream-reset eof fin-timeout)" "reasons: $(lib_close_reasons "$SPLICED_LOG")"
    fi
    lib_wait_until 5 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds) vs base $base"
    stop_spliced
    lib_chk_done "$name" "clients: reset=$(lib_json "$f" reset) eof_early=$(lib_json "$f" eof_early) last ${last}ms after kill; closes: $(lib_close_reasons "$SPLICED_LOG")"
}

# ---------------------------------------------------------------- 4 -----
# The first upstream swallows SYNs: the connect timeout must fire and the
# next upstream be tried. "drop": an address in the dead-end namespace whose
# link is down; "backlog": a loopback listener whose accept queue is full.
sc_connect_next() {
    local mode=$1 how=$2 n=16 name="connect-timeout-next-$2-$1" dead f
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-live" "" --listen 127.0.0.1:0 || { lib_fail "$name" "upstream"; return; }
    local live=$UP_ADDR live_pid=$UP_PID dead_pid=
    if [ "$how" = drop ]; then
        dead=$IP_D:9
    else
        loadgen_upstream "$name-dead" "" --listen 127.0.0.1:0 --mode noaccept || { lib_fail "$name" "noaccept upstream"; return; }
        dead=$UP_ADDR
        dead_pid=$UP_PID
    fi
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$dead" --upstream "$live" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SPLICED_ADDR" -n $n -c 4 --bytes 65536 --deadline 30
    f=$LIB_TMP/$name.json
    lib_chk "$(($(lib_json "$f" ok) == n))" "ok=$(lib_json "$f" ok) of $n $(jq -c .details "$f")"
    local emax
    emax=$(lib_json "$f" est_ms_max)
    lib_chk "$((emax >= CONN_TO_MS - 50))" "slowest relay up after ${emax}ms: the dead upstream was never tried?"
    lib_chk "$((emax <= CONN_TO_MS + 1500))" "slowest relay up after ${emax}ms (connect timeout ${CONN_TO_MS}ms)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes of $n"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" eof) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want eof=$n)"
    stop_spliced
    lib_stop_pid "$live_pid" 10 KILL
    [ -n "$dead_pid" ] && lib_stop_pid "$dead_pid" 10 KILL
    lib_chk_done "$name" "ok=$(lib_json "$f" ok)/$n established in $(lib_json "$f" est_ms_min)..${emax}ms; closes: $(lib_close_reasons "$SPLICED_LOG")"
}

# Every upstream swallows SYNs: relays must end as connect-failed, promptly.
sc_connect_all_dead() {
    local mode=$1 n=8 name="connect-timeout-all-dead-$1" f
    want "$name" || return 0
    lib_chk_reset
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$IP_D:9" --upstream "$IP_D:10" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SPLICED_ADDR" -n $n --bytes 1000 --deadline 20
    f=$LIB_TMP/$name.json
    local el=$(($(lib_json "$f" last_end_ms) - $(lib_json "$f" start_ms)))
    lib_chk "$(($(lib_json "$f" ok) == 0))" "ok=$(lib_json "$f" ok) with no reachable upstream?"
    lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "ended: reset=$(lib_json "$f" reset) eof_early=$(lib_json "$f" eof_early) timeout=$(lib_json "$f" timeout)"
    lib_chk "$((el >= 2 * CONN_TO_MS - 100 && el <= 2 * CONN_TO_MS + 1500))" "clients ended ${el}ms after start (2 upstreams x ${CONN_TO_MS}ms)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes of $n"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" connect-failed) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want connect-failed=$n)"
    stop_spliced
    lib_chk_done "$name" "clients ended within ${el}ms; closes: $(lib_close_reasons "$SPLICED_LOG")"
}

# ---------------------------------------------------------------- 5 -----
# A client vanishes without FIN or RST: its namespace loses its link, the
# client is killed and the namespace deleted. spliced must free the relays
# through its idle/FIN timeout and its fds must return to the baseline.
sc_client_vanish() {
    # shellcheck disable=SC2034 # veth and nip are filled by make_ns
    local mode=$1 n=32 name="client-vanishes-$1" ns veth rip nip base t0
    want "$name" || return 0
    lib_chk_reset
    make_ns ns veth rip nip || { lib_fail "$name" "namespace"; return; }
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 || { lib_fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    spliced_start "$name" --listen "$rip:0" --upstream "$UP_ADDR" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    if ! start_long_clients "$name-cl" "$SPLICED_ADDR" $n "$ns"; then
        lib_fail "$name" "transfers did not get going: $(grep '^progress' "$LIB_TMP/$name-cl.err" | tail -1)"
        return
    fi
    local peak
    peak=$(lib_fd_count "$SPLICED_PID" kinds)
    # Cut the wire first so nothing the dying client sends gets through.
    ip netns exec "$ns" ip link set eth1 down
    lib_stop_pid "$LG_PID" 5 KILL
    del_ns "$ns"
    t0=$(lib_now_ms)
    local deadline=$((IDLE + 3))
    lib_wait_until "$deadline" lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "spliced logged $(lib_closes "$SPLICED_LOG") closes of $n within ${deadline}s"
    local took=$(($(lib_now_ms) - t0))
    lib_chk "$(only_reasons idle fin-timeout)" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want idle/fin-timeout only)"
    lib_chk "$((took >= IDLE * 1000 - 500))" "relays closed ${took}ms after the client vanished, before the idle timeout"
    lib_wait_until 5 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds) vs base $base"
    local after
    after=$(lib_fd_count "$SPLICED_PID" kinds)
    stop_spliced
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "all $n closed ${took}ms after vanishing: $(lib_close_reasons "$SPLICED_LOG"); fds sock/pipe/other base $base peak $peak after $after"
}

# ---------------------------------------------------------------- 6 -----
# Deadlines on their own: an idle relay is closed by the idle timeout; a
# half-closed relay whose upstream never answers nor closes by the FIN timeout.
sc_idle() {
    local mode=$1 n=16 name="idle-timeout-$1" f t0
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 || { lib_fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { lib_fail "$name" "spliced did not start"; return; }
    lib_bg "$name-cl" "$LOADGEN" clients --target "$SPLICED_ADDR" -n $n --bytes 1000 --barrier --hold 30 --deadline 40 --progress 0.2
    local pid=$LIB_BG_PID
    lib_wait_log "$LIB_TMP/$name-cl.err" ESTABLISHED 10 || lib_chk 0 "relays never established"
    t0=$(lib_now_ms)
    lib_wait_until $((IDLE + 4)) lib_pid_gone "$pid" || lib_chk 0 "clients still open $((IDLE + 4))s after going idle"
    f=$LIB_TMP/$name-cl.out
    local first last
    first=$(($(lib_json "$f" first_bad_ms) - t0)); last=$(($(lib_json "$f" last_bad_ms) - t0))
    lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "ended by the proxy: $(($(lib_json "$f" reset) + $(lib_json "$f" eof_early))) of $n"
    lib_chk "$((first >= IDLE * 1000 - 300 && last <= IDLE * 1000 + 2000))" "ended ${first}..${last}ms after going idle (idle timeout ${IDLE}s)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "closes $(lib_closes "$SPLICED_LOG") of $n"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" idle) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want idle=$n)"
    stop_spliced
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "clients ended ${first}..${last}ms after going idle; closes: $(lib_close_reasons "$SPLICED_LOG")"
}

sc_fin() {
    local mode=$1 n=16 name="fin-timeout-$1" f fin=1 idle=5
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 --mode blackhole || { lib_fail "$name" "upstream"; return; }
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout ${idle}s --fin-timeout ${fin}s || { lib_fail "$name" "spliced did not start"; return; }
    # Uploads half-close after their last byte and wait for an answer that
    # never comes: the FIN timeout (1 s), not the idle timeout (5 s), applies.
    run_clients "$name" --target "$SPLICED_ADDR" -n $n --pattern upload --bytes 65536 --deadline 20
    f=$LIB_TMP/$name.json
    local el=$(($(lib_json "$f" last_end_ms) - $(lib_json "$f" start_ms)))
    lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "ended by the proxy: reset=$(lib_json "$f" reset) eof_early=$(lib_json "$f" eof_early) timeout=$(lib_json "$f" timeout)"
    lib_chk "$((el >= fin * 1000 - 200 && el <= fin * 1000 + 2000))" "clients ended ${el}ms after start (fin timeout ${fin}s, idle ${idle}s)"
    lib_wait_until 3 lib_closes_at_least "$SPLICED_LOG" $n || lib_chk 0 "closes $(lib_closes "$SPLICED_LOG") of $n"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" fin-timeout) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want fin-timeout=$n)"
    stop_spliced
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "clients ended within ${el}ms; closes: $(lib_close_reasons "$SPLICED_LOG")"
}

# ---------------------------------------------------------------- 7 -----
# SIGTERM with live relays: no new connection is accepted, live relays may
# finish until the drain timeout, then are closed as `shutdown`; exit 0.
sc_drain() {
    local mode=$1 n=16 name="sigterm-drain-$1" t0 f drain=1
    want "$name" || return 0
    lib_chk_reset
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 || { lib_fail "$name" "upstream"; return; }
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout 30s --fin-timeout 30s --drain-timeout ${drain}s || { lib_fail "$name" "spliced did not start"; return; }
    if ! start_long_clients "$name-cl" "$SPLICED_ADDR" $n; then
        lib_fail "$name" "transfers did not get going"
        return
    fi
    t0=$(lib_now_ms)
    kill -TERM "$SPLICED_PID"
    # New connections must not be served once draining.
    lib_wait_log "$SPLICED_LOG" stopping 2 || lib_chk 0 "no 'stopping' log line after SIGTERM"
    "$LOADGEN" clients --target "$SPLICED_ADDR" -n 1 --bytes 100 --deadline 3 --progress 0 >"$LIB_TMP/$name-late.json" 2>/dev/null
    lib_chk "$(($(lib_json "$LIB_TMP/$name-late.json" ok) == 0))" "a connection made after SIGTERM was served"
    local rc=-1
    # Already signalled: only wait (signal 0), SIGKILL after the limit.
    if lib_stop_pid "$SPLICED_PID" $((drain + 5)) 0; then
        rc=$LIB_STOP_STATUS
    else
        lib_chk 0 "spliced still running $((drain + 5))s after SIGTERM (drain timeout ${drain}s)"
    fi
    local took=$(($(lib_now_ms) - t0))
    lib_chk "$((rc == 0))" "exit status $rc"
    lib_chk "$((took >= drain * 1000 - 200))" "exited ${took}ms after SIGTERM, before the ${drain}s drain timeout"
    lib_wait_until 5 lib_pid_gone "$LG_PID"
    f=$LIB_TMP/$name-cl.out
    lib_chk "$(($(lib_json "$f" corrupt) == 0))" "corrupt=$(lib_json "$f" corrupt)"
    lib_chk "$(($(lib_json "$f" reset) + $(lib_json "$f" eof_early) == n))" "live clients ended: reset=$(lib_json "$f" reset) eof_early=$(lib_json "$f" eof_early) of $n"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" shutdown) == n))" "reasons: $(lib_close_reasons "$SPLICED_LOG") (want shutdown=$n)"
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "exit $rc ${took}ms after SIGTERM (drain ${drain}s); late connection served: $(lib_json "$LIB_TMP/$name-late.json" ok); closes: $(lib_close_reasons "$SPLICED_LOG")"
}

# ------------------------------------------------------------------------
T_START=$(lib_now_ms)
sc_selftest splice
for mode in $MODES; do
    lib_log "=== mode $mode"
    sc_traffic "$mode" veth
    sc_traffic "$mode" delay20ms "delay 20ms"
    sc_traffic "$mode" loss2pct "loss 2%"
    sc_traffic "$mode" reorder "delay 10ms reorder 25% 50%"
    sc_linkdown "$mode"
    sc_kill "$mode" 1
    sc_kill "$mode" 0
    sc_connect_next "$mode" drop
    sc_connect_next "$mode" backlog
    sc_connect_all_dead "$mode"
    sc_client_vanish "$mode"
    sc_idle "$mode"
    sc_fin "$mode"
    sc_drain "$mode"
done
lib_log "done in $((($(lib_now_ms) - T_START) / 1000))s"
echo "faults: $LIB_PASSED passed, $LIB_FAILED failed, $LIB_SKIPPED skipped"
[ "$LIB_FAILED" -eq 0 ]
