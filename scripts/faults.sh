#!/usr/bin/env bash
# Fault injection for spliced (issue 4, "Faults").
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
# names to run), SPLICED, LOADGEN, KEEP=1 (keep the work dir).
#
# Last line: "faults: N passed, M failed, K skipped"; exit 1 if M > 0.

# shellcheck disable=SC2034 # read by faults-lib.sh
FL_NAME=faults
# shellcheck source=scripts/faults-lib.sh
source "$(dirname "$0")/faults-lib.sh"

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
    need "${t%%:*}" "${t#*:}" || {
        echo "faults.sh needs ${t%%:*}" >&2
        echo "faults: 0 passed, 1 failed, 0 skipped"
        exit 1
    }
done
build_tools >"$FL_DIR/build.log" 2>&1 || {
    tail -20 "$FL_DIR/build.log"
    echo "build failed" >&2
    echo "faults: 0 passed, 1 failed, 0 skipped"
    exit 1
}
log "work dir $FL_DIR"

want() { [[ $1 =~ $ONLY ]]; }


# progress_ok ERRFILE ESTABLISHED MIN_VERIFIED: loadgen's last progress line.
progress_ok() {
    local line est ver
    line=$(grep '^progress' "$1" | tail -1)
    est=$(grep -o 'established=[0-9]*' <<<"$line" | cut -d= -f2)
    ver=$(grep -o 'verified=[0-9]*' <<<"$line" | cut -d= -f2)
    [ -n "$est" ] && [ "$est" -ge "$2" ] && [ "${ver:-0}" -ge "$3" ]
}

# reasons_only LOG "r1 r2 ...": every close line has one of these reasons.
reasons_only() {
    local total ok=0 r
    total=$(count_closed "$1")
    for r in $2; do ok=$((ok + $(count_closed "$1" "$r"))); done
    [ "$total" -eq "$ok" ]
}

# spliced_stop NAME: SIGTERM, expect exit 0 within 10 s (no relay left).
spliced_stop() {
    local rc
    kill -TERM "$SP_PID" 2>/dev/null
    if wait_until 10 dead "$SP_PID"; then
        wait "$SP_PID" 2>/dev/null
        rc=$?
        chk "$((rc == 0))" "spliced exited $rc after SIGTERM"
    else
        chk 0 "spliced still running 10s after SIGTERM"
        kill -KILL "$SP_PID" 2>/dev/null
    fi
}

# run_clients NAME ARGS... : loadgen clients in the foreground -> $FL_DIR/NAME.json
run_clients() {
    local name=$1
    shift
    "$LOADGEN" clients --progress 0.2 "$@" >"$FL_DIR/$name.json" 2>"$FL_DIR/$name.err"
}

summary_of() { jq -c '{ok,rst_sent,errors,corrupt,reset,eof_early,timeout,connect_failed,bytes_verified,elapsed_ms}' "$1" 2>/dev/null; }

# ------------------------------------------------------------------------
# Namespaces: U holds the upstreams, D is a dead end (its link is down, so
# SYNs to it vanish), C is created per client-vanish run.
make_ns NS_U VETH_U IP_UR IP_U || { echo "faults: 0 passed, 1 failed, 0 skipped"; exit 1; }
make_ns NS_D VETH_D IP_DR IP_D || { echo "faults: 0 passed, 1 failed, 0 skipped"; exit 1; }
ip netns exec "$NS_D" ip link set eth1 down
# A permanent neighbour entry: no ARP, so a connect to $IP_D is never refused
# or failed fast (EHOSTUNREACH); its SYNs are silently dropped by the dead link.
ip neigh replace "$IP_D" lladdr 02:00:00:00:00:01 dev "$VETH_D" nud permanent
log "upstream ns $NS_U ($IP_UR <-> $IP_U), dead-end ns $NS_D ($IP_D, link down)"

HAVE_NETEM=1
if ! netem_available; then
    HAVE_NETEM=0
    log "netem unavailable: ${NETEM_ERR:-tc qdisc add ... netem failed}"
fi

common_args() { echo "--mode $1 --workers $WORKERS --idle-timeout ${IDLE}s --fin-timeout ${FIN}s --connect-timeout ${CONN_TO_MS}ms"; }

# ---------------------------------------------------------------- 0 -----
# The checkers themselves: a corrupting upstream must be caught.
sc_selftest() {
    local mode=$1 n=8 name="selftest-corrupt-$1"
    want "$name" || return 0
    chk_reset
    start_upstream "$name-up" "" --listen 127.0.0.1:0 --corrupt-at 5000 || { fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SP_ADDR" -n $n --bytes 20000 --deadline 20
    local f=$FL_DIR/$name.json
    chk "$(($(jget "$f" corrupt) == n))" "corrupt=$(jget "$f" corrupt), want $n (checker missed a flipped byte)"
    spliced_stop
    stop_pid "$UP_PID" KILL
    chk_done "$name" "$(summary_of "$f")"
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
        skip "$name" "kernel lacks sch_netem ('tc qdisc add ... netem $netem': ${NETEM_ERR:-unknown qdisc})"
        return
    fi
    chk_reset
    if [ -n "$netem" ]; then
        # shellcheck disable=SC2086
        tc qdisc add dev "$VETH_U" root netem $netem &&
            ip netns exec "$NS_U" tc qdisc add dev eth1 root netem $netem ||
            { fail "$name" "tc qdisc add netem $netem failed"; return; }
    fi
    start_upstream "$name-up" "$NS_U" --listen "$IP_U:0" || { fail "$name" "upstream"; netem_off; return; }
    # A long idle timeout: slow readers may drain kernel buffers for seconds
    # while no byte moves through spliced, and that would (rightly) be idle.
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout 20s --fin-timeout ${FIN}s || { fail "$name" "spliced did not start"; netem_off; return; }
    base=$(fd_kinds "$SP_PID")
    local t0
    t0=$(now_ms)
    run_clients "$name" --target "$SP_ADDR" -n $n -c $n --pattern mixed --bytes 2000000 --bytes-min 1 \
        --mix normal=5,early-fin=2,reset=1,slow=2 --slow-chunk 16384 --seed 11 --deadline 120 --conn-deadline 90
    f=$FL_DIR/$name.json
    run_clients "$name-rr" --target "$SP_ADDR" -n 16 --pattern rr --rr-size 256 --bytes $((256 * 200)) --seed 12 --deadline 120
    fr=$FL_DIR/$name-rr.json
    local ok rst rok
    ok=$(jget "$f" ok); rst=$(jget "$f" rst_sent); rok=$(jget "$fr" ok)
    chk "$(($(jget "$f" errors) == 0))" "bulk errors=$(jget "$f" errors) $(jq -c .details "$f")"
    chk "$((ok + rst == n))" "bulk ok+rst_sent=$((ok + rst)) of $n"
    chk "$((rok == 16))" "rr ok=$rok of 16 $(jq -c .details "$fr")"
    chk "$(($(jget "$f" bytes_verified) > 0))" "nothing verified"
    if [[ $netem == *delay* ]]; then
        # Both ends delay 20 ms: a round trip cannot be faster than ~40 ms.
        chk "$(($(jget "$fr" rr_p50_us) >= 38000))" "rr p50 $(jget "$fr" rr_p50_us)us < 38ms: netem not in effect?"
    fi
    # Every relay closed, within the FIN/idle deadline after the clients ended.
    if ! wait_until $((FIN + 3)) closed_at_least "$SP_LOG" $((n + 16)); then
        chk 0 "spliced logged $(count_closed "$SP_LOG") closes for $((n + 16)) relays"
    fi
    chk "$(reasons_only "$SP_LOG" "eof client-reset" && echo 1 || echo 0)" "unexpected reasons: $(reasons "$SP_LOG")"
    wait_until 5 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID") vs base $base"
    spliced_stop
    stop_pid "$UP_PID" KILL
    netem_off
    chk_done "$name" "bulk $(summary_of "$f") rr_p50=$(jget "$fr" rr_p50_us)us rr_p99=$(jget "$fr" rr_p99_us)us closes: $(reasons "$SP_LOG") in $(($(now_ms) - t0))ms"
}

# Long windowed transfers that are mid-way when a fault hits.
start_long_clients() {
    local name=$1 target=$2 n=$3 netns=${4:-}
    local args=(clients --target "$target" -n "$n" --pattern echo --bytes 200000000 --window 65536
        --rate 2000000 --deadline 60 --progress 0.1 --seed 21)
    if [ -n "$netns" ]; then
        bg_run "$name" ip netns exec "$netns" "$LOADGEN" "${args[@]}"
    else
        bg_run "$name" "$LOADGEN" "${args[@]}"
    fi
    LG_PID=$BG_PID
    wait_until 20 progress_ok "$FL_DIR/$name.err" "$n" $((n * 65536))
}

# ---------------------------------------------------------------- 2 -----
# The upstream's link goes down mid-transfer: nothing moves any more, so the
# idle timeout must end every relay; no byte may be corrupted.
sc_linkdown() {
    local mode=$1 n=32 name="link-down-midtransfer-$1" base t0 f
    want "$name" || return 0
    chk_reset
    start_upstream "$name-up" "$NS_U" --listen "$IP_U:0" || { fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    base=$(fd_kinds "$SP_PID")
    if ! start_long_clients "$name-cl" "$SP_ADDR" $n; then
        fail "$name" "transfers did not get going: $(grep '^progress' "$FL_DIR/$name-cl.err" | tail -1)"
        ip netns exec "$NS_U" ip link set eth1 up
        return
    fi
    t0=$(now_ms)
    ip netns exec "$NS_U" ip link set eth1 down
    local deadline=$((IDLE + 3))
    if ! wait_until "$deadline" dead "$LG_PID"; then
        chk 0 "clients still open ${deadline}s after the link went down"
    fi
    wait "$LG_PID" 2>/dev/null
    f=$FL_DIR/$name-cl.out
    chk "$(($(jget "$f" corrupt) == 0))" "corrupt=$(jget "$f" corrupt) $(jq -c .details "$f")"
    chk "$(($(jget "$f" ok) == 0))" "ok=$(jget "$f" ok): transfers cannot have completed"
    chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "ended by reset/eof: $(($(jget "$f" reset) + $(jget "$f" eof_early))) of $n"
    local first last
    first=$(($(jget "$f" first_bad_ms) - t0)); last=$(($(jget "$f" last_bad_ms) - t0))
    chk "$((first >= IDLE * 1000 - 300))" "first relay ended ${first}ms after link down, before the ${IDLE}s idle timeout"
    chk "$((last <= IDLE * 1000 + 2500))" "last relay ended ${last}ms after link down (idle timeout ${IDLE}s)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "spliced logged $(count_closed "$SP_LOG") closes of $n"
    chk "$(reasons_only "$SP_LOG" "idle fin-timeout upstream-reset" && echo 1 || echo 0)" "reasons: $(reasons "$SP_LOG")"
    wait_until 5 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID") vs base $base"
    local after
    after=$(fd_kinds "$SP_PID")
    spliced_stop
    ip netns exec "$NS_U" ip link set eth1 up
    stop_pid "$UP_PID" KILL
    chk_done "$name" "clients ended ${first}..${last}ms after link down; verified $(jget "$f" bytes_verified)B; closes: $(reasons "$SP_LOG"); fds sock/pipe/other base $base after $after"
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
    chk_reset
    local extra=()
    [ "$linger" = 1 ] && extra=(--linger0)
    start_upstream "$name-up" "$NS_U" --listen "$IP_U:0" "${extra[@]}" || { fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    base=$(fd_kinds "$SP_PID")
    if ! start_long_clients "$name-cl" "$SP_ADDR" $n; then
        fail "$name" "transfers did not get going: $(grep '^progress' "$FL_DIR/$name-cl.err" | tail -1)"
        return
    fi
    t0=$(now_ms)
    # ip netns exec execs the upstream: UP_PID is the upstream itself.
    kill -KILL "$UP_PID"
    local limit_ms
    if [ "$linger" = 1 ]; then limit_ms=1000; else limit_ms=$((FIN * 1000 + 2000)); fi
    wait_until $((limit_ms / 1000 + 3)) dead "$LG_PID" || chk 0 "clients still open $((limit_ms / 1000 + 3))s after the kill"
    wait "$LG_PID" 2>/dev/null
    f=$FL_DIR/$name-cl.out
    local last
    last=$(($(jget "$f" last_bad_ms) - t0))
    chk "$(($(jget "$f" corrupt) == 0))" "corrupt=$(jget "$f" corrupt) $(jq -c .details "$f")"
    if [ "$linger" = 1 ]; then
        chk "$(($(jget "$f" reset) == n))" "reset=$(jget "$f" reset) of $n (others: eof_early=$(jget "$f" eof_early) ok=$(jget "$f" ok))"
    else
        chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "ended early: $(($(jget "$f" reset) + $(jget "$f" eof_early))) of $n"
    fi
    chk "$((last <= limit_ms))" "last client ended ${last}ms after the kill (limit ${limit_ms}ms)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "spliced logged $(count_closed "$SP_LOG") closes of $n"
    if [ "$linger" = 1 ]; then
        chk "$(($(count_closed "$SP_LOG" upstream-reset) == n))" "reasons: $(reasons "$SP_LOG") (want upstream-reset=$n)"
    else
        chk "$(reasons_only "$SP_LOG" "upstream-reset eof fin-timeout" && echo 1 || echo 0)" "reasons: $(reasons "$SP_LOG")"
    fi
    wait_until 5 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID") vs base $base"
    spliced_stop
    chk_done "$name" "clients: reset=$(jget "$f" reset) eof_early=$(jget "$f" eof_early) last ${last}ms after kill; closes: $(reasons "$SP_LOG")"
}

# ---------------------------------------------------------------- 4 -----
# The first upstream swallows SYNs: the connect timeout must fire and the
# next upstream be tried. "drop": an address in the dead-end namespace whose
# link is down; "backlog": a loopback listener whose accept queue is full.
sc_connect_next() {
    local mode=$1 how=$2 n=16 name="connect-timeout-next-$2-$1" dead f
    want "$name" || return 0
    chk_reset
    start_upstream "$name-live" "" --listen 127.0.0.1:0 || { fail "$name" "upstream"; return; }
    local live=$UP_ADDR live_pid=$UP_PID dead_pid=
    if [ "$how" = drop ]; then
        dead=$IP_D:9
    else
        start_upstream "$name-dead" "" --listen 127.0.0.1:0 --mode noaccept || { fail "$name" "noaccept upstream"; return; }
        dead=$UP_ADDR
        dead_pid=$UP_PID
    fi
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$dead" --upstream "$live" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SP_ADDR" -n $n -c 4 --bytes 65536 --deadline 30
    f=$FL_DIR/$name.json
    chk "$(($(jget "$f" ok) == n))" "ok=$(jget "$f" ok) of $n $(jq -c .details "$f")"
    local emax
    emax=$(jget "$f" est_ms_max)
    chk "$((emax >= CONN_TO_MS - 50))" "slowest relay up after ${emax}ms: the dead upstream was never tried?"
    chk "$((emax <= CONN_TO_MS + 1500))" "slowest relay up after ${emax}ms (connect timeout ${CONN_TO_MS}ms)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "spliced logged $(count_closed "$SP_LOG") closes of $n"
    chk "$(($(count_closed "$SP_LOG" eof) == n))" "reasons: $(reasons "$SP_LOG") (want eof=$n)"
    spliced_stop
    stop_pid "$live_pid" KILL
    [ -n "$dead_pid" ] && stop_pid "$dead_pid" KILL
    chk_done "$name" "ok=$(jget "$f" ok)/$n established in $(jget "$f" est_ms_min)..${emax}ms; closes: $(reasons "$SP_LOG")"
}

# Every upstream swallows SYNs: relays must end as connect-failed, promptly.
sc_connect_all_dead() {
    local mode=$1 n=8 name="connect-timeout-all-dead-$1" f
    want "$name" || return 0
    chk_reset
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$IP_D:9" --upstream "$IP_D:10" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    run_clients "$name" --target "$SP_ADDR" -n $n --bytes 1000 --deadline 20
    f=$FL_DIR/$name.json
    local el=$(($(jget "$f" last_end_ms) - $(jget "$f" start_ms)))
    chk "$(($(jget "$f" ok) == 0))" "ok=$(jget "$f" ok) with no reachable upstream?"
    chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "ended: reset=$(jget "$f" reset) eof_early=$(jget "$f" eof_early) timeout=$(jget "$f" timeout)"
    chk "$((el >= 2 * CONN_TO_MS - 100 && el <= 2 * CONN_TO_MS + 1500))" "clients ended ${el}ms after start (2 upstreams x ${CONN_TO_MS}ms)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "spliced logged $(count_closed "$SP_LOG") closes of $n"
    chk "$(($(count_closed "$SP_LOG" connect-failed) == n))" "reasons: $(reasons "$SP_LOG") (want connect-failed=$n)"
    spliced_stop
    chk_done "$name" "clients ended within ${el}ms; closes: $(reasons "$SP_LOG")"
}

# ---------------------------------------------------------------- 5 -----
# A client vanishes without FIN or RST: its namespace loses its link, the
# client is killed and the namespace deleted. spliced must free the relays
# through its idle/FIN timeout and its fds must return to the baseline.
sc_client_vanish() {
    # shellcheck disable=SC2034 # veth and nip are filled by make_ns
    local mode=$1 n=32 name="client-vanishes-$1" ns veth rip nip base t0
    want "$name" || return 0
    chk_reset
    make_ns ns veth rip nip || { fail "$name" "namespace"; return; }
    start_upstream "$name-up" "" --listen 127.0.0.1:0 || { fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    start_spliced "$name" --listen "$rip:0" --upstream "$UP_ADDR" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    base=$(fd_kinds "$SP_PID")
    if ! start_long_clients "$name-cl" "$SP_ADDR" $n "$ns"; then
        fail "$name" "transfers did not get going: $(grep '^progress' "$FL_DIR/$name-cl.err" | tail -1)"
        return
    fi
    local peak
    peak=$(fd_kinds "$SP_PID")
    # Cut the wire first so nothing the dying client sends gets through.
    ip netns exec "$ns" ip link set eth1 down
    kill -KILL "$LG_PID"
    wait "$LG_PID" 2>/dev/null
    del_ns "$ns"
    t0=$(now_ms)
    local deadline=$((IDLE + 3))
    wait_until "$deadline" closed_at_least "$SP_LOG" $n || chk 0 "spliced logged $(count_closed "$SP_LOG") closes of $n within ${deadline}s"
    local took=$(($(now_ms) - t0))
    chk "$(reasons_only "$SP_LOG" "idle fin-timeout" && echo 1 || echo 0)" "reasons: $(reasons "$SP_LOG") (want idle/fin-timeout only)"
    chk "$((took >= IDLE * 1000 - 500))" "relays closed ${took}ms after the client vanished, before the idle timeout"
    wait_until 5 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID") vs base $base"
    local after
    after=$(fd_kinds "$SP_PID")
    spliced_stop
    stop_pid "$UP_PID" KILL
    chk_done "$name" "all $n closed ${took}ms after vanishing: $(reasons "$SP_LOG"); fds sock/pipe/other base $base peak $peak after $after"
}

# ---------------------------------------------------------------- 6 -----
# Deadlines on their own: an idle relay is closed by the idle timeout; a
# half-closed relay whose upstream never answers nor closes by the FIN timeout.
sc_idle() {
    local mode=$1 n=16 name="idle-timeout-$1" f t0
    want "$name" || return 0
    chk_reset
    start_upstream "$name-up" "" --listen 127.0.0.1:0 || { fail "$name" "upstream"; return; }
    # shellcheck disable=SC2046
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" $(common_args "$mode") || { fail "$name" "spliced did not start"; return; }
    bg_run "$name-cl" "$LOADGEN" clients --target "$SP_ADDR" -n $n --bytes 1000 --barrier --hold 30 --deadline 40 --progress 0.2
    local pid=$BG_PID
    wait_until 10 grep -q ESTABLISHED "$FL_DIR/$name-cl.err" || chk 0 "relays never established"
    t0=$(now_ms)
    wait_until $((IDLE + 4)) dead "$pid" || chk 0 "clients still open $((IDLE + 4))s after going idle"
    wait "$pid" 2>/dev/null
    f=$FL_DIR/$name-cl.out
    local first last
    first=$(($(jget "$f" first_bad_ms) - t0)); last=$(($(jget "$f" last_bad_ms) - t0))
    chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "ended by the proxy: $(($(jget "$f" reset) + $(jget "$f" eof_early))) of $n"
    chk "$((first >= IDLE * 1000 - 300 && last <= IDLE * 1000 + 2000))" "ended ${first}..${last}ms after going idle (idle timeout ${IDLE}s)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "closes $(count_closed "$SP_LOG") of $n"
    chk "$(($(count_closed "$SP_LOG" idle) == n))" "reasons: $(reasons "$SP_LOG") (want idle=$n)"
    spliced_stop
    stop_pid "$UP_PID" KILL
    chk_done "$name" "clients ended ${first}..${last}ms after going idle; closes: $(reasons "$SP_LOG")"
}

sc_fin() {
    local mode=$1 n=16 name="fin-timeout-$1" f fin=1 idle=5
    want "$name" || return 0
    chk_reset
    start_upstream "$name-up" "" --listen 127.0.0.1:0 --mode blackhole || { fail "$name" "upstream"; return; }
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout ${idle}s --fin-timeout ${fin}s || { fail "$name" "spliced did not start"; return; }
    # Uploads half-close after their last byte and wait for an answer that
    # never comes: the FIN timeout (1 s), not the idle timeout (5 s), applies.
    run_clients "$name" --target "$SP_ADDR" -n $n --pattern upload --bytes 65536 --deadline 20
    f=$FL_DIR/$name.json
    local el=$(($(jget "$f" last_end_ms) - $(jget "$f" start_ms)))
    chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "ended by the proxy: reset=$(jget "$f" reset) eof_early=$(jget "$f" eof_early) timeout=$(jget "$f" timeout)"
    chk "$((el >= fin * 1000 - 200 && el <= fin * 1000 + 2000))" "clients ended ${el}ms after start (fin timeout ${fin}s, idle ${idle}s)"
    wait_until 3 closed_at_least "$SP_LOG" $n || chk 0 "closes $(count_closed "$SP_LOG") of $n"
    chk "$(($(count_closed "$SP_LOG" fin-timeout) == n))" "reasons: $(reasons "$SP_LOG") (want fin-timeout=$n)"
    spliced_stop
    stop_pid "$UP_PID" KILL
    chk_done "$name" "clients ended within ${el}ms; closes: $(reasons "$SP_LOG")"
}

# ---------------------------------------------------------------- 7 -----
# SIGTERM with live relays: no new connection is accepted, live relays may
# finish until the drain timeout, then are closed as `shutdown`; exit 0.
sc_drain() {
    local mode=$1 n=16 name="sigterm-drain-$1" t0 f drain=1
    want "$name" || return 0
    chk_reset
    start_upstream "$name-up" "" --listen 127.0.0.1:0 || { fail "$name" "upstream"; return; }
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout 30s --fin-timeout 30s --drain-timeout ${drain}s || { fail "$name" "spliced did not start"; return; }
    if ! start_long_clients "$name-cl" "$SP_ADDR" $n; then
        fail "$name" "transfers did not get going"
        return
    fi
    t0=$(now_ms)
    kill -TERM "$SP_PID"
    # New connections must not be served once draining.
    wait_until 2 grep -qs 'stopping' "$SP_LOG" || chk 0 "no 'stopping' log line after SIGTERM"
    "$LOADGEN" clients --target "$SP_ADDR" -n 1 --bytes 100 --deadline 3 --progress 0 >"$FL_DIR/$name-late.json" 2>/dev/null
    chk "$(($(jget "$FL_DIR/$name-late.json" ok) == 0))" "a connection made after SIGTERM was served"
    local rc=-1
    if wait_until $((drain + 5)) dead "$SP_PID"; then
        wait "$SP_PID" 2>/dev/null
        rc=$?
    else
        chk 0 "spliced still running $((drain + 5))s after SIGTERM (drain timeout ${drain}s)"
    fi
    local took=$(($(now_ms) - t0))
    chk "$((rc == 0))" "exit status $rc"
    chk "$((took >= drain * 1000 - 200))" "exited ${took}ms after SIGTERM, before the ${drain}s drain timeout"
    wait_until 5 dead "$LG_PID"
    f=$FL_DIR/$name-cl.out
    chk "$(($(jget "$f" corrupt) == 0))" "corrupt=$(jget "$f" corrupt)"
    chk "$(($(jget "$f" reset) + $(jget "$f" eof_early) == n))" "live clients ended: reset=$(jget "$f" reset) eof_early=$(jget "$f" eof_early) of $n"
    chk "$(($(count_closed "$SP_LOG" shutdown) == n))" "reasons: $(reasons "$SP_LOG") (want shutdown=$n)"
    stop_pid "$UP_PID" KILL
    chk_done "$name" "exit $rc ${took}ms after SIGTERM (drain ${drain}s); late connection served: $(jget "$FL_DIR/$name-late.json" ok); closes: $(reasons "$SP_LOG")"
}

# ------------------------------------------------------------------------
T_START=$(now_ms)
sc_selftest splice
for mode in $MODES; do
    log "=== mode $mode"
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
log "done in $((($(now_ms) - T_START) / 1000))s; logs in $FL_DIR"
[ -n "${KEEP:-}" ] || [ "$FL_FAIL" -gt 0 ] || rm -rf "$FL_DIR"
echo "faults: $FL_PASS passed, $FL_FAIL failed, $FL_SKIP skipped"
[ "$FL_FAIL" -eq 0 ]
