#!/usr/bin/env bash
# Scale test for spliced (issue 4, "Scale").
#
# spliced runs as an UNPRIVILEGED user (root would bypass
# pipe-user-pages-soft), the load generator and the upstream run as separate
# processes. The number of relays is sized to spliced's hard fd limit: each
# relay holds 2 sockets, pipes come and go, so N = (hard - slack) / 2, capped
# at 50 000. For each mode:
#   traffic: N relays opened, all established, then all transfer at once;
#            every byte checked.
#   idle:    N relays opened and held idle while spliced is measured.
# After each phase spliced's sockets/fds and RSS must come back to the
# baseline. Prints a table and "scale: N passed, M failed".
#
# Env: SCALE_MODES="splice copy", SCALE_RELAYS (override N), SCALE_BYTES
# (per relay in the traffic phase, default 131072), SCALE_USER, KEEP=1.

# shellcheck disable=SC2034 # read by faults-lib.sh
FL_NAME=scale
# shellcheck source=scripts/faults-lib.sh
source "$(dirname "$0")/faults-lib.sh"

MODES=${SCALE_MODES:-splice copy}
BYTES=${SCALE_BYTES:-131072}
BP_BYTES=${SCALE_BP_BYTES:-262144}
WORKERS=2
SLACK_FDS=2000
# RSS may exceed the pre-phase value by the idle copy-buffer pools (2 workers x
# 256 x 64 KiB = 32 MiB, by design) plus 16 MiB of allocator slack.
RSS_SLACK_KB=${SCALE_RSS_SLACK_KB:-$((32768 + 16384))}

if [ "$(id -u)" != 0 ]; then
    echo "scale.sh needs root (to run spliced as an unprivileged user)" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
fi
need jq jq || { echo "scale.sh needs jq" >&2; echo "scale: 0 passed, 1 failed"; exit 1; }

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
SP_AS=$(pick_user)
if [ -z "$SP_AS" ] || [ "$(id -u "$SP_AS" 2>/dev/null)" = 0 ]; then
    echo "no unprivileged user to run spliced as" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
fi
export SP_AS

build_tools >"$FL_DIR/build.log" 2>&1 || { tail -20 "$FL_DIR/build.log"; echo "scale: 0 passed, 1 failed"; exit 1; }
runuser -u "$SP_AS" -- test -x "$SPLICED" || {
    echo "$SP_AS cannot execute $SPLICED" >&2
    echo "scale: 0 passed, 1 failed"
    exit 1
}

HARD=$(runuser -u "$SP_AS" -- sh -c 'ulimit -Hn')
MY_HARD=$(ulimit -Hn)
N=$(((HARD - SLACK_FDS) / 2))
[ "$N" -gt 50000 ] && N=50000
# The load generator holds N sockets too (its own process, its own limit).
[ "$N" -gt $((MY_HARD - 200)) ] && N=$((MY_HARD - 200))
[ -n "${SCALE_RELAYS:-}" ] && N=$SCALE_RELAYS
# Spread ephemeral ports: one upstream address per 10 000 relays, and one
# client source address per phase.
NUP=$((N / 10000 + 1))
log "user $SP_AS, spliced hard fd limit $HARD -> $N relays (2 sockets each, $SLACK_FDS fds slack for pipes/listeners); loadgen limit $MY_HARD"
log "pipe-user-pages-soft=$(cat /proc/sys/fs/pipe-user-pages-soft) pipe-max-size=$(cat /proc/sys/fs/pipe-max-size) work dir $FL_DIR"

POOL_SLACK=$((2 * 64 * WORKERS))
sockets_at_least() { [ "$(fd_kinds "$1" | cut -d' ' -f1)" -ge "$2" ]; }
rss_back() { [ "$(rss_kb "$1")" -le $(($2 + RSS_SLACK_KB)) ]; }

# sampler PID FILE: "fds rss_kb" every 100 ms while PID lives.
start_sampler() {
    (
        while kill -0 "$1" 2>/dev/null; do
            printf '%s %s\n' "$(ls "/proc/$1/fd" 2>/dev/null | wc -l)" "$(rss_kb "$1")"
            sleep 0.1
        done
    ) >"$2" 2>/dev/null &
    SAMPLER=$!
    FL_PIDS+=("$SAMPLER")
}
stop_sampler() { kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; }
mb() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
peak_col() { awk -v c="$2" 'BEGIN{m=0} $c+0>m{m=$c+0} END{print m}' "$1"; }

fallbacks_in() { plain "$1" | grep 'relay closed' | grep -o 'copy-fallback' | wc -l; }
pauses_in() { plain "$1" | grep -c 'out of file descriptors' || true; }

ROWS=()
PHASE_NO=0
FL_FALLBACKS=0

# phase MODE KIND : one measured phase against the running spliced.
phase() {
    local mode=$1 kind=$2 name="$1-$2" f base rss0 fb0 cl0
    PHASE_NO=$((PHASE_NO + 1))
    chk_reset
    base=$(fd_kinds "$SP_PID")
    local fds0
    fds0=$(fd_count "$SP_PID")
    rss0=$(rss_kb "$SP_PID")
    fb0=$(fallbacks_in "$SP_LOG")
    cl0=$(count_closed "$SP_LOG")
    # Reset VmHWM so it reports this phase's peak (clear_refs 5).
    echo 5 >"/proc/$SP_PID/clear_refs" 2>/dev/null
    start_sampler "$SP_PID" "$FL_DIR/$name.samples"
    # Fresh client source addresses per phase, one per 20 000 relays, so
    # ephemeral ports (about 28 000 per address pair) and TIME_WAIT never bind.
    local binds=() i
    for i in $(seq 1 $((N / 20000 + 1))); do binds+=(--bind "127.1.$PHASE_NO.$i"); done
    local targs=(--target "$SP_ADDR" "${binds[@]}" -n "$N" --max-connecting 512
        --barrier --deadline 600 --progress 2 --seed "$PHASE_NO")
    local t0
    t0=$(now_ms)
    if [ "$kind" = traffic ]; then
        "$LOADGEN" clients "${targs[@]}" --bytes "$BYTES" --pattern echo \
            >"$FL_DIR/$name.json" 2>"$FL_DIR/$name.err"
    elif [ "$kind" = backpressure ]; then
        # Slow readers with a tiny receive buffer: data backs up inside
        # spliced, so directions hold pipes (or buffers) at once, past what
        # the fd limit allows: the rest must fall back to copy, losslessly.
        "$LOADGEN" clients "${targs[@]}" --bytes "$BP_BYTES" --pattern echo --mix slow \
            --slow-chunk 8192 --rcvbuf 4096 >"$FL_DIR/$name.json" 2>"$FL_DIR/$name.err"
    else
        local rel=$FL_DIR/$name.release
        bg_run "$name-cl" "$LOADGEN" clients "${targs[@]}" --bytes 1024 --pattern echo \
            --hold 300 --hold-until "$rel"
        local pid=$BG_PID
        if wait_until 300 grep -q ESTABLISHED "$FL_DIR/$name-cl.err"; then
            # Measure spliced while all N idle relays are held (both sockets
            # of every relay open).
            wait_until 30 sockets_at_least "$SP_PID" $((${base%% *} + 2 * N)) ||
                chk 0 "spliced holds $(fd_kinds "$SP_PID") (sock pipe other) fds for $N idle relays"
            IDLE_FDS=$(fd_kinds "$SP_PID")
            IDLE_RSS=$(rss_kb "$SP_PID")
        else
            chk 0 "idle relays never all established: $(grep '^progress' "$FL_DIR/$name-cl.err" | tail -1)"
        fi
        touch "$rel"
        wait_until 300 dead "$pid" || chk 0 "idle clients did not finish"
        cp "$FL_DIR/$name-cl.out" "$FL_DIR/$name.json"
        cat "$FL_DIR/$name-cl.err" >"$FL_DIR/$name.err"
    fi
    local t1
    t1=$(now_ms)
    f=$FL_DIR/$name.json
    local ok err ver
    ok=$(jget "$f" ok); err=$(jget "$f" errors); ver=$(jget "$f" bytes_verified)
    local want_bytes=$BYTES
    [ "$kind" = idle ] && want_bytes=1024
    [ "$kind" = backpressure ] && want_bytes=$BP_BYTES
    chk "$((ok == N))" "ok=$ok of $N (errors=$err: $(jq -c .details "$f" 2>/dev/null))"
    chk "$((ver == N * want_bytes))" "verified $ver bytes, want $((N * want_bytes))"
    chk "$(($(jget "$f" established) == N))" "established $(jget "$f" established) of $N at once"
    # Every relay closed, then fds and RSS back.
    wait_until 60 closed_at_least "$SP_LOG" $((cl0 + N)) ||
        chk 0 "spliced logged $(($(count_closed "$SP_LOG") - cl0)) closes of $N"
    local nonlocal
    nonlocal=$(plain "$SP_LOG" | grep 'relay closed' | tail -n +"$((cl0 + 1))" | grep -vcE 'reason="?eof' || true)
    chk "$((nonlocal == 0))" "$nonlocal relays closed with a reason other than eof: $(reasons "$SP_LOG")"
    wait_until 30 fds_back "$SP_PID" "$base" || chk 0 "fds (sock pipe other) $(fd_kinds "$SP_PID"), base $base"
    wait_until 10 rss_back "$SP_PID" "$rss0" || chk 0 "RSS $(rss_kb "$SP_PID") kB, baseline $rss0 kB (+$RSS_SLACK_KB allowed)"
    stop_sampler
    local fds1 rss1 peak_fds peak_rss fb
    fds1=$(fd_count "$SP_PID")
    rss1=$(rss_kb "$SP_PID")
    peak_fds=$(peak_col "$FL_DIR/$name.samples" 1)
    peak_rss=$(peak_col "$FL_DIR/$name.samples" 2)
    local hwm
    hwm=$(hwm_kb "$SP_PID")
    [ -n "$hwm" ] && [ "$hwm" -gt "$peak_rss" ] && peak_rss=$hwm
    fb=$(($(fallbacks_in "$SP_LOG") - fb0))
    FL_FALLBACKS=$((FL_FALLBACKS + fb))
    local per=$(((peak_rss - rss0) * 1024 / N))
    ROWS+=("$(printf '%-6s %-12s %7d %9d %10.1f %10d %6d/%d/%d %8.1f %8.1f %7.1f' \
        "$mode" "$kind" "$N" "$fb" "$(mb "$peak_rss")" "$per" \
        "$fds0" "$peak_fds" "$fds1" "$(mb "$rss0")" "$(mb "$rss1")" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1000}')")")
    local extra=""
    [ "$kind" = idle ] && extra=" idle-held fds(sock/pipe/other)=${IDLE_FDS:-?} rss=${IDLE_RSS:-?}kB"
    chk_done "scale-$name" "relays=$N ok=$ok verified=${ver}B fallbacks=$fb peak_rss=${peak_rss}kB (${per} B/relay) fds $fds0/$peak_fds/$fds1 rss ${rss0}->${rss1}kB$extra"
}

T_START=$(now_ms)
for mode in $MODES; do
    log "=== mode $mode: $N relays"
    up_args=()
    ups=()
    for i in $(seq 1 "$NUP"); do up_args+=(--listen "127.0.2.$i:0"); done
    start_upstream "up-$mode" "" "${up_args[@]}" --buf 16384 || { fail "scale-$mode" "upstream did not start"; continue; }
    mapfile -t ups < <(grep -o 'listening on [0-9.:]*' "$FL_DIR/up-$mode.err" | awk '{print $3}')
    sp_args=()
    for u in "${ups[@]}"; do sp_args+=(--upstream "$u"); done
    if ! RUST_LOG=info start_spliced "spliced-$mode" --listen 127.0.0.1:0 "${sp_args[@]}" --mode "$mode" \
        --workers $WORKERS --idle-timeout 300s --fin-timeout 60s; then
        fail "scale-$mode" "spliced did not start as $SP_AS"
        stop_pid "$UP_PID" KILL
        continue
    fi
    sp_user=$(ps -o user= -p "$SP_PID")
    sp_lim=$(awk '/Max open files/{print $4" soft/"$5" hard"}' "/proc/$SP_PID/limits")
    log "spliced pid $SP_PID runs as $sp_user, open files $sp_lim"
    if [ "$(ps -o uid= -p "$SP_PID" | tr -d ' ')" = 0 ]; then
        fail "scale-$mode" "spliced runs as root"
    fi
    # Idle first: its RSS per relay is then measured from a fresh process.
    phase "$mode" idle
    phase "$mode" traffic
    phase "$mode" backpressure
    log "fd-pause warnings in log: $(pauses_in "$SP_LOG"); fallback warnings: $(plain "$SP_LOG" | grep -c 'splice fallback' || true)"
    chk_reset
    kill -TERM "$SP_PID"
    if wait_until 30 dead "$SP_PID"; then chk 1 ""; else chk 0 "spliced did not exit 30s after SIGTERM"; fi
    chk_done "scale-$mode-sigterm" "exit after SIGTERM with no relay left"
    stop_pid "$UP_PID" KILL
done

echo
printf '%-6s %-12s %7s %9s %10s %10s %16s %8s %8s %7s\n' mode phase relays fallbacks "peakRSS MB" "B/relay" "fds before/peak/after" "RSS0 MB" "RSS1 MB" "secs"
for r in "${ROWS[@]}"; do echo "$r"; done
echo
log "done in $((($(now_ms) - T_START) / 1000))s; logs in $FL_DIR"
[ -n "${KEEP:-}" ] || [ "$FL_FAIL" -gt 0 ] || rm -rf "$FL_DIR"
echo "scale: $FL_PASS passed, $FL_FAIL failed"
[ "$FL_FAIL" -eq 0 ]
