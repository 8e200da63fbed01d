#!/usr/bin/env bash
# Soak test for spliced.
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
# Env: SOAK_SECS, SOAK_MODES="splice copy", SOAK_CONC (default 64), KEEP=1
# (keep the work dir; it is also kept when a check failed).

# No errexit: a failing step is recorded as a failed check and the run goes on.
set -uo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
lib_init soak keep-failed

SOAK_SECS=${SOAK_SECS:-120}
MODES=${SOAK_MODES:-splice copy}
CONC=${SOAK_CONC:-64}
WORKERS=2
IDLE=6       # --idle-timeout, seconds
FIN=4        # --fin-timeout, seconds
IDLE_BATCH=16
RSS_SLACK_KB=${SOAK_RSS_SLACK_KB:-16384}
POOL_SLACK=$((2 * 64 * WORKERS))

lib_need jq jq || { echo "soak.sh needs jq" >&2; echo "soak: 0 passed, 1 failed"; exit 1; }
lib_build loadgen >"$LIB_TMP/build.log" 2>&1 || { tail -20 "$LIB_TMP/build.log"; echo "soak: 0 passed, 1 failed"; exit 1; }

nmodes=$(wc -w <<<"$MODES")
PER_MODE=$((SOAK_SECS / nmodes))
[ "$PER_MODE" -lt 10 ] && PER_MODE=10
lib_log "soak ${SOAK_SECS}s: ${PER_MODE}s per mode ($MODES), $CONC concurrent relays, work dir $LIB_TMP"

sum_json() { # FIELD FILES... : sum of a field over loadgen summaries
    local k=$1
    shift
    cat "$@" 2>/dev/null | jq -s "map(.$k // 0) | add // 0"
}

soak_mode() {
    local mode=$1 secs=$2 name="soak-$1"
    lib_chk_reset
    loadgen_upstream "$name-up" "" --listen 127.0.0.1:0 || { lib_fail "$name" "upstream did not start"; return; }
    spliced_start "$name" --listen 127.0.0.1:0 --upstream "$UP_ADDR" --mode "$mode" --workers $WORKERS \
        --idle-timeout ${IDLE}s --fin-timeout ${FIN}s --connect-timeout 1s ||
        { lib_fail "$name" "spliced did not start"; lib_stop_pid "$UP_PID" 10 KILL; return; }
    local churn=(clients --target "$SPLICED_ADDR" -n 0 -c "$CONC" --pattern mixed --bytes 262144 --bytes-min 1
        --mix "normal=50,early-fin=20,reset=10,slow=20" --slow-chunk 4096 --conn-deadline 60 --progress 5)
    # Warm-up: the pools fill, the relay table grows; the baseline comes after.
    "$LOADGEN" "${churn[@]}" --duration 5 --deadline 90 --seed 99 >"$LIB_TMP/$name-warm.json" 2>"$LIB_TMP/$name-warm.err"
    lib_wait_until $((FIN + IDLE + 3)) lib_closes_at_least "$SPLICED_LOG" "$(lib_json "$LIB_TMP/$name-warm.json" tcp_connected)" ||
        lib_chk 0 "warm-up relays not all closed: $(lib_closes "$SPLICED_LOG") of $(lib_json "$LIB_TMP/$name-warm.json" tcp_connected)"
    local base rss0 t0
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    rss0=$(lib_mem_kb "$SPLICED_PID")
    t0=$(lib_now_ms)
    local samples=$LIB_TMP/$name.samples
    lib_sampler_start "$SPLICED_PID" "$samples" 1

    lib_bg "$name-churn" "$LOADGEN" "${churn[@]}" --duration "$secs" --deadline $((secs + 90)) --seed 1
    local churn_pid=$LIB_BG_PID
    # Idle batches until the churn ends: each relay must be closed by the
    # idle timeout (the clients hold longer than it), not before.
    local b=0 idle_bad=0 idle_conns=0 el
    while lib_pid_alive "$churn_pid" && [ $(($(lib_now_ms) - t0)) -lt $(((secs - IDLE - 3) * 1000)) ]; do
        b=$((b + 1))
        "$LOADGEN" clients --target "$SPLICED_ADDR" -n $IDLE_BATCH --bytes 1000 --barrier --hold $((IDLE * 3)) \
            --deadline $((IDLE * 3 + 10)) --progress 0 --seed $((1000 + b)) \
            >"$LIB_TMP/$name-idle$b.json" 2>"$LIB_TMP/$name-idle$b.err"
        local f=$LIB_TMP/$name-idle$b.json
        idle_conns=$((idle_conns + $(lib_json "$f" tcp_connected)))
        el=$(($(lib_json "$f" last_end_ms) - $(lib_json "$f" start_ms)))
        if [ $(($(lib_json "$f" reset) + $(lib_json "$f" eof_early))) -ne $IDLE_BATCH ] || [ "$(lib_json "$f" corrupt)" != 0 ] ||
            [ "$el" -lt $((IDLE * 1000 - 300)) ] || [ "$el" -gt $((IDLE * 1000 + 3000)) ]; then
            idle_bad=$((idle_bad + 1))
            lib_log "idle batch $b: $(jq -c '{reset,eof_early,ok,timeout,corrupt}' "$f") ended after ${el}ms (idle ${IDLE}s)"
        fi
    done
    lib_wait_until $((secs + 120)) lib_pid_gone "$churn_pid" || lib_chk 0 "churn clients did not finish"
    local t_load_end
    t_load_end=$(lib_now_ms)
    local f=$LIB_TMP/$name-churn.out
    local conns ok rst errs
    conns=$(lib_json "$f" connections); ok=$(lib_json "$f" ok); rst=$(lib_json "$f" rst_sent); errs=$(lib_json "$f" errors)
    lib_chk "$((conns > 0))" "no churn connection completed"
    lib_chk "$((errs == 0))" "churn errors=$errs $(jq -c '{corrupt,reset,eof_early,timeout,connect_failed,error,details}' "$f")"
    lib_chk "$((ok + rst == conns))" "ok+rst_sent=$((ok + rst)) of $conns"
    lib_chk "$((idle_bad == 0))" "$idle_bad of $b idle batches not closed by the idle timeout in time"
    # Every relay opened (warm-up, churn, idle batches) must be closed.
    local opened
    opened=$(sum_json tcp_connected "$LIB_TMP/$name-warm.json" "$f" "$LIB_TMP"/"$name"-idle*.json)
    if ! lib_wait_until $((FIN + IDLE + 3)) lib_closes_at_least "$SPLICED_LOG" "$opened"; then
        lib_chk 0 "spliced closed $(lib_closes "$SPLICED_LOG") of $opened relays within $((FIN + IDLE + 3))s after the load"
    fi
    local t_closed=$(($(lib_now_ms) - t_load_end))
    local closed
    closed=$(lib_closes "$SPLICED_LOG")
    lib_chk "$((closed == opened))" "spliced logged $closed closes for $opened relays"
    local other
    other=$((closed - $(lib_closes "$SPLICED_LOG" eof client-reset idle)))
    lib_chk "$((other == 0))" "$other closes with an unexpected reason: $(lib_close_reasons "$SPLICED_LOG")"
    # No relay may outlive its client's 60 s limit plus the idle timeout.
    local maxdur
    maxdur=$(lib_clean_log "$SPLICED_LOG" | grep 'relay closed' | grep -o 'duration_ms=[0-9]*' | cut -d= -f2 | sort -n | tail -1)
    lib_chk "$((${maxdur:-0} <= 60000 + IDLE * 1000))" "longest relay lived ${maxdur}ms"
    lib_chk "$(($(lib_closes "$SPLICED_LOG" idle) >= idle_conns))" "idle closes $(lib_closes "$SPLICED_LOG" idle) < idle-batch relays $idle_conns"
    # Resources back where they started.
    lib_wait_until 10 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds), baseline $base"
    local rss1
    rss1=$(lib_mem_kb "$SPLICED_PID")
    lib_chk "$((rss1 <= rss0 + RSS_SLACK_KB))" "RSS ${rss1}kB, baseline ${rss0}kB (+${RSS_SLACK_KB} allowed)"
    local after peak_fds peak_rss
    after=$(lib_fd_count "$SPLICED_PID" kinds)
    lib_sampler_stop
    peak_fds=$(lib_sample_peak "$samples" 2)
    peak_rss=$(lib_sample_peak "$samples" 3)
    lib_stop_pid "$SPLICED_PID" 15 || lib_chk 0 "spliced still running 15s after SIGTERM"
    lib_stop_pid "$UP_PID" 10 KILL
    lib_chk_done "$name" "${secs}s: $conns churn relays (ok=$ok rst_sent=$rst), $(lib_json "$f" bytes_verified) bytes verified, rr_ops=$(lib_json "$f" rr_ops); $b idle batches ($idle_conns relays); closes: $(lib_close_reasons "$SPLICED_LOG") (all $closed closed ${t_closed}ms after the load, longest relay ${maxdur}ms); fds sock/pipe/other $base -> $after (peak $peak_fds); RSS ${rss0} -> ${rss1} kB (peak ${peak_rss})"
}

T_START=$(lib_now_ms)
for mode in $MODES; do
    lib_log "=== mode $mode: ${PER_MODE}s"
    soak_mode "$mode" "$PER_MODE"
done
lib_log "done in $((($(lib_now_ms) - T_START) / 1000))s"
echo "soak: $LIB_PASSED passed, $LIB_FAILED failed"
[ "$LIB_FAILED" -eq 0 ]
