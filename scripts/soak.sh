#!/usr/bin/env bash
# Soak test for spliced (issue 4, "Soak").
#
# For SOAK_SECS seconds (default 120, split between the modes) a load
# generator churns connections through spliced: every relay draws a pattern
# (echo, request/response, upload, download) and a behaviour (normal,
# early half-close, reset mid-transfer, slow reader) and every byte is
# checked. Alongside, batches of idle relays outlive the idle timeout and
# must be closed by it. Afterwards:
#   - no byte corrupted, no unexpected reset/EOF/timeout at any client;
#   - every relay the clients opened was closed by spliced (log lines), with
#     an expected reason, within the FIN/idle deadlines after the load ended;
#   - spliced's sockets are back to the baseline exactly, its pipes within
#     what the idle pool may keep, its RSS within SOAK_RSS_SLACK_KB.
# Last line: "soak: N passed, M failed".
#
# Env: SOAK_SECS, SOAK_MODES="splice copy", SOAK_CONC (default 64), KEEP=1.

# shellcheck disable=SC2034 # read by faults-lib.sh
FL_NAME=soak
# shellcheck source=scripts/faults-lib.sh
source "$(dirname "$0")/faults-lib.sh"

SOAK_SECS=${SOAK_SECS:-120}
MODES=${SOAK_MODES:-splice copy}
CONC=${SOAK_CONC:-64}
WORKERS=2
IDLE=6       # --idle-timeout, seconds
FIN=4        # --fin-timeout, seconds
IDLE_BATCH=16
RSS_SLACK_KB=${SOAK_RSS_SLACK_KB:-16384}
POOL_SLACK=$((2 * 64 * WORKERS))

need jq jq || { echo "soak.sh needs jq" >&2; echo "soak: 0 passed, 1 failed"; exit 1; }
build_tools >"$FL_DIR/build.log" 2>&1 || { tail -20 "$FL_DIR/build.log"; echo "soak: 0 passed, 1 failed"; exit 1; }

nmodes=$(wc -w <<<"$MODES")
PER_MODE=$((SOAK_SECS / nmodes))
[ "$PER_MODE" -lt 10 ] && PER_MODE=10
log "soak ${SOAK_SECS}s: ${PER_MODE}s per mode ($MODES), $CONC concurrent relays, work dir $FL_DIR"

sum_json() { # FIELD FILES... : sum of a field over loadgen summaries
    local k=$1
    shift
    cat "$@" 2>/dev/null | jq -s "map(.$k // 0) | add // 0"
}

soak_mode() {
    local mode=$1 secs=$2 name="soak-$1"
    chk_reset
    start_upstream "$name-up" "" --listen 127.0.0.1:0 || { fail "$name" "upstream did not start"; return; }
    start_spliced "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout ${IDLE}s --fin-timeout ${FIN}s --connect-timeout 1s ||
        { fail "$name" "spliced did not start"; stop_pid "$UP_PID" KILL; return; }
    local churn=(clients --target "$SP_ADDR" -n 0 -c "$CONC" --pattern mixed --bytes 262144 --bytes-min 1
        --mix "normal=50,early-fin=20,reset=10,slow=20" --slow-chunk 4096 --conn-deadline 60 --progress 5)
    # Warm-up: the pools fill, the relay table grows; the baseline comes after.
    "$LOADGEN" "${churn[@]}" --duration 5 --deadline 90 --seed 99 >"$FL_DIR/$name-warm.json" 2>"$FL_DIR/$name-warm.err"
    wait_until $((FIN + IDLE + 3)) closed_at_least "$SP_LOG" "$(jget "$FL_DIR/$name-warm.json" tcp_connected)" ||
        chk 0 "warm-up relays not all closed: $(count_closed "$SP_LOG") of $(jget "$FL_DIR/$name-warm.json" tcp_connected)"
    local base rss0 t0
    base=$(fd_kinds "$SP_PID")
    rss0=$(rss_kb "$SP_PID")
    t0=$(now_ms)
    local samples=$FL_DIR/$name.samples
    (
        while kill -0 "$SP_PID" 2>/dev/null; do
            printf '%s %s %s\n' "$(($(now_ms) - t0))" "$(ls "/proc/$SP_PID/fd" 2>/dev/null | wc -l)" "$(rss_kb "$SP_PID")"
            sleep 1
        done
    ) >"$samples" 2>/dev/null &
    local sampler=$!
    FL_PIDS+=("$sampler")

    bg_run "$name-churn" "$LOADGEN" "${churn[@]}" --duration "$secs" --deadline $((secs + 90)) --seed 1
    local churn_pid=$BG_PID
    # Idle batches until the churn ends: each relay must be closed by the
    # idle timeout (the clients hold longer than it), not before.
    local b=0 idle_bad=0 idle_conns=0 el
    while alive "$churn_pid" && [ $(($(now_ms) - t0)) -lt $(((secs - IDLE - 3) * 1000)) ]; do
        b=$((b + 1))
        "$LOADGEN" clients --target "$SP_ADDR" -n $IDLE_BATCH --bytes 1000 --barrier --hold $((IDLE * 3)) \
            --deadline $((IDLE * 3 + 10)) --progress 0 --seed $((1000 + b)) \
            >"$FL_DIR/$name-idle$b.json" 2>"$FL_DIR/$name-idle$b.err"
        local f=$FL_DIR/$name-idle$b.json
        idle_conns=$((idle_conns + $(jget "$f" tcp_connected)))
        el=$(($(jget "$f" last_end_ms) - $(jget "$f" start_ms)))
        if [ $(($(jget "$f" reset) + $(jget "$f" eof_early))) -ne $IDLE_BATCH ] || [ "$(jget "$f" corrupt)" != 0 ] ||
            [ "$el" -lt $((IDLE * 1000 - 300)) ] || [ "$el" -gt $((IDLE * 1000 + 3000)) ]; then
            idle_bad=$((idle_bad + 1))
            log "idle batch $b: $(jq -c '{reset,eof_early,ok,timeout,corrupt}' "$f") ended after ${el}ms (idle ${IDLE}s)"
        fi
    done
    wait_until $((secs + 120)) dead "$churn_pid" || chk 0 "churn clients did not finish"
    local t_load_end
    t_load_end=$(now_ms)
    local f=$FL_DIR/$name-churn.out
    local conns ok rst errs
    conns=$(jget "$f" connections); ok=$(jget "$f" ok); rst=$(jget "$f" rst_sent); errs=$(jget "$f" errors)
    chk "$((conns > 0))" "no churn connection completed"
    chk "$((errs == 0))" "churn errors=$errs $(jq -c '{corrupt,reset,eof_early,timeout,connect_failed,error,details}' "$f")"
    chk "$((ok + rst == conns))" "ok+rst_sent=$((ok + rst)) of $conns"
    chk "$((idle_bad == 0))" "$idle_bad of $b idle batches not closed by the idle timeout in time"
    # Every relay opened (warm-up, churn, idle batches) must be closed.
    local opened
    opened=$(sum_json tcp_connected "$FL_DIR/$name-warm.json" "$f" "$FL_DIR"/"$name"-idle*.json)
    if ! wait_until $((FIN + IDLE + 3)) closed_at_least "$SP_LOG" "$opened"; then
        chk 0 "spliced closed $(count_closed "$SP_LOG") of $opened relays within $((FIN + IDLE + 3))s after the load"
    fi
    local t_closed=$(($(now_ms) - t_load_end))
    local closed
    closed=$(count_closed "$SP_LOG")
    chk "$((closed == opened))" "spliced logged $closed closes for $opened relays"
    local other
    other=$(plain "$SP_LOG" | grep 'relay closed' | grep -vcE 'reason="?(eof|client-reset|idle)("| |$)' || true)
    chk "$((other == 0))" "$other closes with an unexpected reason: $(reasons "$SP_LOG")"
    # No relay may outlive its client's 60 s limit plus the idle timeout.
    local maxdur
    maxdur=$(plain "$SP_LOG" | grep 'relay closed' | grep -o 'duration_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1)
    chk "$((${maxdur:-0} <= 60000 + IDLE * 1000))" "longest relay lived ${maxdur}ms"
    chk "$(($(count_closed "$SP_LOG" idle) >= idle_conns))" "idle closes $(count_closed "$SP_LOG" idle) < idle-batch relays $idle_conns"
    # Resources back where they started.
    wait_until 10 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID"), baseline $base"
    local rss1
    rss1=$(rss_kb "$SP_PID")
    chk "$((rss1 <= rss0 + RSS_SLACK_KB))" "RSS ${rss1}kB, baseline ${rss0}kB (+${RSS_SLACK_KB} allowed)"
    local after peak_fds peak_rss
    after=$(fd_kinds "$SP_PID")
    kill "$sampler" 2>/dev/null
    peak_fds=$(awk 'BEGIN{m=0} $2>m{m=$2} END{print m}' "$samples")
    peak_rss=$(awk 'BEGIN{m=0} $3>m{m=$3} END{print m}' "$samples")
    kill -TERM "$SP_PID"
    if wait_until 15 dead "$SP_PID"; then :; else chk 0 "spliced still running 15s after SIGTERM"; fi
    stop_pid "$UP_PID" KILL
    chk_done "$name" "${secs}s: $conns churn relays (ok=$ok rst_sent=$rst), $(jget "$f" bytes_verified) bytes verified, rr_ops=$(jget "$f" rr_ops); $b idle batches ($idle_conns relays); closes: $(reasons "$SP_LOG") (all $closed closed ${t_closed}ms after the load, longest relay ${maxdur}ms); fds sock/pipe/other $base -> $after (peak $peak_fds); RSS ${rss0} -> ${rss1} kB (peak ${peak_rss})"
}

T_START=$(now_ms)
for mode in $MODES; do
    log "=== mode $mode: ${PER_MODE}s"
    soak_mode "$mode" "$PER_MODE"
done
log "done in $((($(now_ms) - T_START) / 1000))s; logs in $FL_DIR"
[ -n "${KEEP:-}" ] || [ "$FL_FAIL" -gt 0 ] || rm -rf "$FL_DIR"
echo "soak: $FL_PASS passed, $FL_FAIL failed"
[ "$FL_FAIL" -eq 0 ]
