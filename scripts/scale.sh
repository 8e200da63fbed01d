#!/usr/bin/env bash
# Scale test for spliced.
#
# spliced runs as an UNPRIVILEGED user (root would bypass
# pipe-user-pages-soft), the load generator and the upstream run as separate
# processes. The number of relays is sized to spliced's hard fd limit: N is
# spliced's own relay cap (what is left after its reserve x 2/5: two sockets
# per relay plus a pipe per four relays, see runtime::fd_budget), capped at
# 50 000. For each mode:
#   traffic: N relays opened, all established, then all transfer at once;
#            every byte checked.
#   idle:    N relays opened and held idle while spliced is measured.
# After each phase spliced's sockets/fds and RSS must come back to the
# baseline. Prints a table and "scale: N passed, M failed".
#
# Env: SCALE_MODES="splice copy", SCALE_RELAYS (override N), SCALE_BYTES
# (per relay in the traffic phase, default 131072), SCALE_USER, KEEP=1 (keep
# the work dir; it is also kept when a check failed).

# No errexit: a failing step is recorded as a failed check and the run goes on.
set -uo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
lib_init scale keep-failed

MODES=${SCALE_MODES:-splice copy}
BYTES=${SCALE_BYTES:-131072}
BP_BYTES=${SCALE_BP_BYTES:-262144}
WORKERS=2
# RSS may exceed the pre-phase value by the idle copy-buffer pools (2 workers x
# 256 x 64 KiB = 32 MiB, by design) plus 16 MiB of allocator slack.
RSS_SLACK_KB=${SCALE_RSS_SLACK_KB:-$((32768 + 16384))}

if [ "$(id -u)" != 0 ]; then
    echo "scale.sh needs root (to run spliced as an unprivileged user)" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
fi
lib_need jq jq || { echo "scale.sh needs jq" >&2; echo "scale: 0 passed, 1 failed"; exit 1; }

# The unprivileged user: SCALE_USER, else spliced-test, else an existing
# ordinary user, else create spliced-test.
pick_user() {
    if [ -n "${SCALE_USER:-}" ]; then echo "$SCALE_USER"; return; fi
    if id spliced-test >/dev/null 2>&1; then echo spliced-test; return; fi
    local u
    u=$(getent passwd | awk -F: '$3 >= 1000 && $3 < 60000 {print $1; exit}')
    if [ -n "$u" ]; then echo "$u"; return; fi
    useradd -r -M -s /usr/sbin/nologin spliced-test >/dev/null 2>&1 && echo spliced-test
}
SPLICED_AS=$(pick_user)
if [ -z "$SPLICED_AS" ] || [ "$(id -u "$SPLICED_AS" 2>/dev/null)" = 0 ]; then
    echo "no unprivileged user to run spliced as" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
fi

lib_build loadgen >"$LIB_TMP/build.log" 2>&1 || { tail -20 "$LIB_TMP/build.log"; echo "scale: 0 passed, 1 failed"; exit 1; }
runuser -u "$SPLICED_AS" -- test -x "$SPLICED_BIN" || {
    echo "$SPLICED_AS cannot execute $SPLICED_BIN" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
}

HARD=$(runuser -u "$SPLICED_AS" -- sh -c 'ulimit -Hn')
MY_HARD=$(ulimit -Hn)
# spliced's reserve: an eighth of the limit (16 to 256 fds) + 4 per worker.
RESERVE=$((HARD / 8))
[ "$RESERVE" -lt 16 ] && RESERVE=16
[ "$RESERVE" -gt 256 ] && RESERVE=256
RESERVE=$((RESERVE + 4 * WORKERS))
N=$(((HARD - RESERVE) * 2 / 5))
[ "$N" -gt 50000 ] && N=50000
# The load generator holds N sockets too (its own process, its own limit).
[ "$N" -gt $((MY_HARD - 200)) ] && N=$((MY_HARD - 200))
[ -n "${SCALE_RELAYS:-}" ] && N=$SCALE_RELAYS
# Spread ephemeral ports: one upstream address per 10 000 relays, and one
# client source address per phase.
NUP=$((N / 10000 + 1))
lib_log "user $SPLICED_AS, spliced hard fd limit $HARD -> $N relays (its relay cap: 2 sockets each, $RESERVE fds reserved, the rest for pipes); loadgen limit $MY_HARD"
lib_log "pipe-user-pages-soft=$(cat /proc/sys/fs/pipe-user-pages-soft) pipe-max-size=$(cat /proc/sys/fs/pipe-max-size) work dir $LIB_TMP"

POOL_SLACK=$((2 * 64 * WORKERS))
sockets_at_least() { [ "$(lib_fd_count "$1" kinds | cut -d' ' -f1)" -ge "$2" ]; }
rss_back() { [ "$(lib_mem_kb "$1")" -le $(($2 + RSS_SLACK_KB)) ]; }

mb() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }

# Directions that fell back from splice to copy (a close line may hold two).
fallbacks_in() { lib_clean_log "$1" | grep 'relay closed' | grep -o 'copy-fallback' | wc -l; }

ROWS=()
PHASE_NO=0

# phase MODE KIND : one measured phase against the running spliced.
phase() {
    local mode=$1 kind=$2 name="$1-$2" f base rss0 fb0 cl0 eof0
    PHASE_NO=$((PHASE_NO + 1))
    lib_chk_reset
    base=$(lib_fd_count "$SPLICED_PID" kinds)
    local fds0
    fds0=$(lib_fd_count "$SPLICED_PID")
    rss0=$(lib_mem_kb "$SPLICED_PID")
    fb0=$(fallbacks_in "$SPLICED_LOG")
    cl0=$(lib_closes "$SPLICED_LOG")
    eof0=$(lib_closes "$SPLICED_LOG" eof)
    # Reset VmHWM so it reports this phase's peak (clear_refs 5).
    echo 5 >"/proc/$SPLICED_PID/clear_refs" 2>/dev/null
    lib_sampler_start "$SPLICED_PID" "$LIB_TMP/$name.samples" 0.1
    # Fresh client source addresses per phase, one per 20 000 relays, so
    # ephemeral ports (about 28 000 per address pair) and TIME_WAIT never bind.
    local binds=() i
    for i in $(seq 1 $((N / 20000 + 1))); do binds+=(--bind "127.1.$PHASE_NO.$i"); done
    local targs=(--target "$SPLICED_ADDR" "${binds[@]}" -n "$N" --max-connecting 512
        --barrier --deadline 600 --progress 2 --seed "$PHASE_NO")
    local t0
    t0=$(lib_now_ms)
    if [ "$kind" = traffic ]; then
        "$LOADGEN" clients "${targs[@]}" --bytes "$BYTES" --pattern echo \
            >"$LIB_TMP/$name.json" 2>"$LIB_TMP/$name.err"
    elif [ "$kind" = backpressure ]; then
        # Slow readers with a tiny receive buffer: data backs up inside
        # spliced, so directions hold pipes (or buffers) at once, past what
        # the fd limit allows: the rest must fall back to copy, losslessly.
        "$LOADGEN" clients "${targs[@]}" --bytes "$BP_BYTES" --pattern echo --mix slow \
            --slow-chunk 8192 --rcvbuf 4096 >"$LIB_TMP/$name.json" 2>"$LIB_TMP/$name.err"
    else
        local rel=$LIB_TMP/$name.release
        lib_bg "$name-cl" "$LOADGEN" clients "${targs[@]}" --bytes 1024 --pattern echo \
            --hold 300 --hold-until "$rel"
        local pid=$LIB_BG_PID
        if lib_wait_log "$LIB_TMP/$name-cl.err" ESTABLISHED 300; then
            # Measure spliced while all N idle relays are held (both sockets
            # of every relay open).
            lib_wait_until 30 sockets_at_least "$SPLICED_PID" $((${base%% *} + 2 * N)) ||
                lib_chk 0 "spliced holds $(lib_fd_count "$SPLICED_PID" kinds) (sock pipe other) fds for $N idle relays"
            IDLE_FDS=$(lib_fd_count "$SPLICED_PID" kinds)
            IDLE_RSS=$(lib_mem_kb "$SPLICED_PID")
        else
            lib_chk 0 "idle relays never all established: $(grep '^progress' "$LIB_TMP/$name-cl.err" | tail -1)"
        fi
        touch "$rel"
        lib_wait_until 300 lib_pid_gone "$pid" || lib_chk 0 "idle clients did not finish"
        cp "$LIB_TMP/$name-cl.out" "$LIB_TMP/$name.json"
        cat "$LIB_TMP/$name-cl.err" >"$LIB_TMP/$name.err"
    fi
    local t1
    t1=$(lib_now_ms)
    f=$LIB_TMP/$name.json
    local ok err ver
    ok=$(lib_json "$f" ok); err=$(lib_json "$f" errors); ver=$(lib_json "$f" bytes_verified)
    local want_bytes=$BYTES
    [ "$kind" = idle ] && want_bytes=1024
    [ "$kind" = backpressure ] && want_bytes=$BP_BYTES
    lib_chk "$((ok == N))" "ok=$ok of $N (errors=$err: $(jq -c .details "$f" 2>/dev/null))"
    lib_chk "$((ver == N * want_bytes))" "verified $ver bytes, want $((N * want_bytes))"
    lib_chk "$(($(lib_json "$f" established) == N))" "established $(lib_json "$f" established) of $N at once"
    # Every relay closed, then fds and RSS back.
    lib_wait_until 60 lib_closes_at_least "$SPLICED_LOG" $((cl0 + N)) ||
        lib_chk 0 "spliced logged $(($(lib_closes "$SPLICED_LOG") - cl0)) closes of $N"
    local nonlocal
    nonlocal=$((($(lib_closes "$SPLICED_LOG") - cl0) - ($(lib_closes "$SPLICED_LOG" eof) - eof0)))
    lib_chk "$((nonlocal == 0))" "$nonlocal relays closed with a reason other than eof: $(lib_close_reasons "$SPLICED_LOG")"
    lib_wait_until 30 lib_fds_back "$SPLICED_PID" "$base" "$POOL_SLACK" || lib_chk 0 "fds (sock pipe other) $(lib_fd_count "$SPLICED_PID" kinds), base $base"
    lib_wait_until 10 rss_back "$SPLICED_PID" "$rss0" || lib_chk 0 "RSS $(lib_mem_kb "$SPLICED_PID") kB, baseline $rss0 kB (+$RSS_SLACK_KB allowed)"
    lib_sampler_stop
    local fds1 rss1 peak_fds peak_rss fb
    fds1=$(lib_fd_count "$SPLICED_PID")
    rss1=$(lib_mem_kb "$SPLICED_PID")
    peak_fds=$(lib_sample_peak "$LIB_TMP/$name.samples" 2)
    peak_rss=$(lib_sample_peak "$LIB_TMP/$name.samples" 3)
    local hwm
    hwm=$(lib_mem_kb "$SPLICED_PID" VmHWM)
    [ -n "$hwm" ] && [ "$hwm" -gt "$peak_rss" ] && peak_rss=$hwm
    fb=$(($(fallbacks_in "$SPLICED_LOG") - fb0))
    local per=$(((peak_rss - rss0) * 1024 / N))
    ROWS+=("$(printf '%-6s %-12s %7d %9d %10.1f %10d %6d/%d/%d %8.1f %8.1f %7.1f' \
        "$mode" "$kind" "$N" "$fb" "$(mb "$peak_rss")" "$per" \
        "$fds0" "$peak_fds" "$fds1" "$(mb "$rss0")" "$(mb "$rss1")" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1000}')")")
    local extra=""
    [ "$kind" = idle ] && extra=" idle-held fds(sock/pipe/other)=${IDLE_FDS:-?} rss=${IDLE_RSS:-?}kB"
    lib_chk_done "scale-$name" "relays=$N ok=$ok verified=${ver}B fallbacks=$fb peak_rss=${peak_rss}kB (${per} B/relay) fds $fds0/$peak_fds/$fds1 rss ${rss0}->${rss1}kB$extra"
}

T_START=$(lib_now_ms)
for mode in $MODES; do
    lib_log "=== mode $mode: $N relays"
    up_args=()
    ups=()
    for i in $(seq 1 "$NUP"); do up_args+=(--listen "127.0.2.$i:0"); done
    loadgen_upstream "up-$mode" "" "${up_args[@]}" --buf 16384 || { lib_fail "scale-$mode" "upstream did not start"; continue; }
    mapfile -t ups < <(grep -o 'listening on [0-9.:]*' "$LIB_TMP/up-$mode.err" | awk '{print $3}')
    sp_args=()
    for u in "${ups[@]}"; do sp_args+=(--upstream "$u"); done
    if ! RUST_LOG=info spliced_start "$mode" --listen 127.0.0.1:0 "${sp_args[@]}" --mode "$mode" \
        --workers $WORKERS --idle-timeout 300s --fin-timeout 60s; then
        lib_fail "scale-$mode" "spliced did not start as $SPLICED_AS"
        lib_stop_pid "$UP_PID" 10 KILL
        continue
    fi
    sp_user=$(ps -o user= -p "$SPLICED_PID")
    sp_lim=$(awk '/Max open files/{print $4" soft/"$5" hard"}' "/proc/$SPLICED_PID/limits")
    lib_log "spliced pid $SPLICED_PID runs as $sp_user, open files $sp_lim"
    if [ "$(ps -o uid= -p "$SPLICED_PID" | tr -d ' ')" = 0 ]; then
        lib_fail "scale-$mode" "spliced runs as root"
    fi
    # Idle first: its RSS per relay is then measured from a fresh process.
    phase "$mode" idle
    phase "$mode" traffic
    phase "$mode" backpressure
    lib_log "fd-pause warnings in log: $(lib_count_log "$SPLICED_LOG" 'out of file descriptors'); fallback warnings: $(lib_count_log "$SPLICED_LOG" 'splice fallback')"
    lib_chk_reset
    lib_stop_pid "$SPLICED_PID" 30 || lib_chk 0 "spliced did not exit 30s after SIGTERM"
    lib_chk_done "scale-$mode-sigterm" "exit after SIGTERM with no relay left"
    lib_stop_pid "$UP_PID" 10 KILL
done

echo
printf '%-6s %-12s %7s %9s %10s %10s %16s %8s %8s %7s\n' mode phase relays fallbacks "peakRSS MB" "B/relay" "fds before/peak/after" "RSS0 MB" "RSS1 MB" "secs"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
lib_log "done in $((($(lib_now_ms) - T_START) / 1000))s"
echo "scale: $LIB_PASSED passed, $LIB_FAILED failed"
[ "$LIB_FAILED" -eq 0 ]
