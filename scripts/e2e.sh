#!/usr/bin/env bash
# scripts/e2e.sh: real-database end-to-end tests of spliced.
#
# Starts a throwaway PostgreSQL and Redis on 127.0.0.1 (in a mktemp -d dir,
# stopped at exit even on failure), then for each engine (splice, copy) runs
# real clients through spliced: pgbench (init, select-only, TPC-B-like, one
# connection per transaction), a ledger consistency check, large COPY
# streams both ways with sha256 comparison, idle-timeout behaviour under
# pg_sleep, redis-benchmark, and a 100k-command `redis-cli --pipe` load
# checked key by key. A real Prometheus scrapes spliced during pgbench and its
# byte counters must equal the clients' (scripts/e2e-prom.sh). Throughput
# through spliced is reported as a ratio to
# the direct connection (informational only: no pass/fail on speed).
#
# Ends with `e2e: N passed, M failed` and exits non-zero if M > 0.
#
# Knobs: E2E_MODES ("splice copy"), E2E_PGBENCH_SECS (3), E2E_PG_SCALE (2),
# E2E_PERF_ROUNDS (3), E2E_PERF_SECS (3),
# E2E_COPY_ROWS (600000), E2E_REDIS_KEYS (100000), E2E_IDLE (2, seconds),
# SPLICED_BIN, SPLICED_STANDIN=socat (script development only), KEEP_TMP=1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
source "$HERE/lib.sh"

MODES="${E2E_MODES:-splice copy}"
PGBENCH_SECS="${E2E_PGBENCH_SECS:-3}"
PERF_ROUNDS="${E2E_PERF_ROUNDS:-3}"
PERF_SECS="${E2E_PERF_SECS:-3}"
PG_SCALE="${E2E_PG_SCALE:-2}"
COPY_ROWS="${E2E_COPY_ROWS:-600000}"
REDIS_KEYS="${E2E_REDIS_KEYS:-100000}"
IDLE_TIMEOUT_S="${E2E_IDLE:-2}"          # seconds, integer
REDIS_BENCH_TESTS="set,get,incr,lpush,mset"   # correctness run
REDIS_PERF_TESTS="set,get"                      # throughput rounds
T_START=$SECONDS

bash "$HERE/install-deps.sh"

if lib_standin; then
    echo "e2e: SPLICED_STANDIN=$SPLICED_STANDIN: relaying with a stand-in, spliced log checks are skipped"
elif [[ ! -x "$SPLICED_BIN" ]]; then
    echo "e2e: $SPLICED_BIN missing: cargo build --release"
    lib_build || lib_die "cargo build --release failed"
fi

lib_init e2e
W="$LIB_TMP"
mkdir -p "$W/checks"
if ! lib_standin; then
    # Test a snapshot: a concurrent `cargo build` must not swap the binary mid-run.
    cp "$SPLICED_BIN" "$W/spliced-under-test"
    echo "e2e: testing $SPLICED_BIN (built $(date -u -r "$SPLICED_BIN" '+%F %T') UTC)"
    SPLICED_BIN="$W/spliced-under-test"
fi
: >"$W/metrics"

# ---------------------------------------------------------------- harness
# Results are counted by lib_pass / lib_fail; names padded to 68 columns.
# shellcheck disable=SC2034 # read by lib.sh
LIB_NAME_WIDTH=68

# check NAME CMD...: run CMD in a subshell with errexit (any failing command
# fails the check), output captured; print PASS/FAIL (+ output tail on FAIL).
check() {
    local name="$1" out rc t0
    shift
    out="$W/checks/$((LIB_PASSED + LIB_FAILED + 1)).out"
    t0="$(lib_now_ms)"
    set +e
    (
        set -eEuo pipefail
        # shellcheck disable=SC2154 # rc_ is assigned inside the trap string
        trap 'rc_=$?; [[ $BASH_COMMAND == "return 1" ]] || echo "  -> command failed (status $rc_) at line $LINENO: $BASH_COMMAND" >&2' ERR
        "$@"
    ) >"$out" 2>&1 </dev/null
    rc=$?
    set -e
    record "$name" "$rc" "$t0" "$out"
}

# check_here NAME CMD...: same, but CMD runs in this shell (it may set
# variables); CMD must handle its own errors (errexit is off inside `if`).
check_here() {
    local name="$1" out rc=0 t0
    shift
    out="$W/checks/$((LIB_PASSED + LIB_FAILED + 1)).out"
    t0="$(lib_now_ms)"
    if "$@" >"$out" 2>&1 </dev/null; then rc=0; else rc=$?; fi
    record "$name" "$rc" "$t0" "$out"
}

record() {
    local name="$1" rc="$2" t0="$3" out="$4" took
    took="$(printf '%6ss' "$(lib_elapsed "$t0")")"
    if ((rc == 0)); then
        lib_pass "$name" "$took"
    else
        lib_fail "$name" "$took (status $rc)"
        tail -n 25 "$out" | sed 's/^/      | /'
    fi
}

fail() { echo "  -> $*" >&2; return 1; }
metric() { echo "$1 $2" >>"$W/metrics"; }
get_metric() { awk -v k="$1" '$1 == k { v = $2 } END { print v }' "$W/metrics"; }
# median of all values recorded under KEY (empty if none)
get_median() {
    awk -v k="$1" '$1 == k { print $2 }' "$W/metrics" | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

# Every client command gets a hard time limit so a wedged relay fails the
# check instead of hanging the suite.
t() { local secs="$1"; shift; timeout -k 5 "$secs" "$@"; }

# ---------------------------------------------------------------- postgres
PGBIN=""
for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/initdb" && -x "$d/pgbench" ]] && PGBIN="$d"; done
[[ -n "$PGBIN" ]] || lib_die "PostgreSQL binaries not found under /usr/lib/postgresql/*/bin"
PG_PORT=""
PG_USER=""
PG_DATA="$W/pg/data"
PG_SOCK="$W/pg/sock"

pg_as() {
    if [[ "$(id -u)" == 0 ]]; then
        (cd "$W/pg" && runuser -u "$PG_USER" -- "$@")
    else
        (cd "$W/pg" && "$@")
    fi
}

pg_start() {
    if [[ "$(id -u)" == 0 ]]; then
        # postgres refuses to run as root
        if getent passwd postgres >/dev/null; then PG_USER=postgres
        elif getent passwd cloudsdk >/dev/null; then PG_USER=cloudsdk
        else
            getent passwd spliced-e2e >/dev/null || useradd --system --no-create-home spliced-e2e || return 1
            PG_USER=spliced-e2e
        fi
    else
        PG_USER="$(id -un)"
    fi
    mkdir -p "$PG_SOCK" && chmod 755 "$W/pg" || return 1
    [[ "$(id -u)" == 0 ]] && { chown -R "$PG_USER" "$W/pg" || return 1; }
    pg_as "$PGBIN/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$W/pg-initdb.log" 2>&1 \
        || { cat "$W/pg-initdb.log"; return 1; }
    PG_PORT="$(lib_free_port)" || return 1
    lib_on_exit pg_stop
    pg_as "$PGBIN/pg_ctl" -D "$PG_DATA" -l "$W/pg/server.log" -w -t 60 start -o \
        "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_SOCK -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=60 -c shared_buffers=128MB" \
        || { cat "$W/pg/server.log"; return 1; }
    lib_wait_port "$PG_PORT" 10 || return 1
    t 30 "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE bench" || return 1
    echo "postgres $("$PGBIN/postgres" --version | awk '{print $3}') as $PG_USER on 127.0.0.1:$PG_PORT"
}

pg_stop() {
    [[ -f "$PG_DATA/postmaster.pid" ]] || return 0
    pg_as "$PGBIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 && return 0
    local pid
    pid="$(head -n1 "$PG_DATA/postmaster.pid" 2>/dev/null)" && [[ -n "$pid" ]] && lib_stop_pid "$pid" 10
    cp "$W/pg/server.log" "$W/pg-server.log" 2>/dev/null || true
}

# psql / pgbench against PORT (the server itself or a spliced in front of it)
PSQL() { local port="$1"; shift; "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench "$@"; }
PGBENCH() { local port="$1"; shift; "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres "$@" bench; }

# ---------------------------------------------------------------- redis
RD_PORT=""
redis_start() {
    mkdir -p "$W/redis" || return 1
    RD_PORT="$(lib_free_port)" || return 1
    lib_bg redis-server redis-server --port "$RD_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$W/redis" \
        --logfile "$W/redis.log" --daemonize no --protected-mode yes
    lib_wait_port "$RD_PORT" 10 || { cat "$W/redis.log"; return 1; }
    lib_wait_until 10 rcli "$RD_PORT" PING >/dev/null || return 1
    echo "redis $(redis-server --version | grep -Eo 'v=[0-9.]+') on 127.0.0.1:$RD_PORT"
}
rcli() { local port="$1"; shift; timeout -k 2 30 redis-cli -h 127.0.0.1 -p "$port" "$@"; }

# ---------------------------------------------------------------- pg checks
# pgbench_run LABEL PORT ARGS...: run pgbench, assert success, record tps
pgbench_run() {
    local label="$1" port="$2" out tps n failed
    shift 2
    out="$W/pgbench-$label.txt"
    t $((PGBENCH_SECS + 60)) "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres "$@" bench >"$out" 2>&1 \
        || { cat "$out"; fail "pgbench $* exited non-zero"; }
    grep -E '^(number of|tps|latency)' "$out"
    n="$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")"
    [[ -n "$n" && "$n" -gt 0 ]] || fail "no transactions processed"
    failed="$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")"
    [[ -z "$failed" || "$failed" == 0 ]] || fail "$failed failed transactions"
    grep -q 'aborted' "$out" && fail "pgbench reports aborted clients"
    tps="$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | tail -n1)"
    [[ -n "$tps" ]] || fail "no tps line"
    metric "pg_${label}_tps" "$tps"
    metric "pg_${label}_xacts" "$n"
}

pg_init() {
    local port="$1"
    t 120 "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -i -q -s "$PG_SCALE" bench 2>&1 | tail -n 3
    local rows
    rows="$(PSQL "$port" -At -c "SELECT count(*) FROM pgbench_accounts")"
    [[ "$rows" == $((PG_SCALE * 100000)) ]] || fail "pgbench_accounts has $rows rows, want $((PG_SCALE * 100000))"
}

# sum(abalance) = sum(bbalance) = sum(tbalance) = sum(delta), and the history
# has one row per committed TPC-B transaction.
pg_consistency() {
    local port="$1" label="$2" row a b tt h n xacts
    row="$(t 60 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench -At -F ' ' -c \
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches),
                (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
                (SELECT count(*) FROM pgbench_history)")"
    read -r a b tt h n <<<"$row"
    echo "sum(abalance)=$a sum(bbalance)=$b sum(tbalance)=$tt sum(delta)=$h history_rows=$n"
    [[ -n "$a" && "$a" == "$b" && "$b" == "$tt" && "$tt" == "$h" ]] || fail "balances disagree"
    xacts="$(get_metric "pg_${label}_xacts")"
    [[ -n "$xacts" ]] || fail "no pgbench transaction count recorded for $label"
    # pgbench counts only transactions it saw commit; one per client may
    # still have been in flight at the -T deadline.
    ((n >= xacts && n <= xacts + 4)) || fail "history has $n rows but pgbench committed $xacts"
}

COPY_Q="COPY (SELECT i, md5(i::text), repeat(chr(65 + i % 26), 24), '2020-01-01'::date + i % 3650 FROM generate_series(1, $COPY_ROWS) i) TO STDOUT"

PERF_COPY_ROWS=$((COPY_ROWS / 3))
PERF_COPY_Q="${COPY_Q/generate_series(1, $COPY_ROWS)/generate_series(1, $PERF_COPY_ROWS)}"

pg_copy_reference() {
    local t0
    t0="$(lib_now_ms)"
    t 120 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench -c "$COPY_Q" >"$W/copy-direct.tsv"
    metric copy_direct_s "$(lib_elapsed "$t0")"
    sha256sum <"$W/copy-direct.tsv" | awk '{print $1}' >"$W/copy-direct.sha"
    local sz
    sz="$(stat -c %s "$W/copy-direct.tsv")"
    metric copy_bytes "$sz"
    echo "direct COPY: $sz bytes, sha256 $(cat "$W/copy-direct.sha")"
    ((sz > 20000000)) || fail "reference COPY is only $sz bytes"
    [[ "$(wc -l <"$W/copy-direct.tsv")" == "$COPY_ROWS" ]] || fail "reference COPY row count"
}

pg_copy_out() {
    local port="$1" mode="$2" t0 sha sz
    t0="$(lib_now_ms)"
    t 120 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench -c "$COPY_Q" >"$W/copy-$mode.tsv"
    metric "copy_${mode}_s" "$(lib_elapsed "$t0")"
    sz="$(stat -c %s "$W/copy-$mode.tsv")"
    sha="$(sha256sum <"$W/copy-$mode.tsv" | awk '{print $1}')"
    rm -f "$W/copy-$mode.tsv"
    echo "via spliced: $sz bytes, sha256 $sha"
    [[ "$sha" == "$(cat "$W/copy-direct.sha")" ]] || fail "sha256 differs from direct COPY ($(get_metric copy_bytes) bytes)"
}

# COPY FROM STDIN through spliced (client -> server bulk), read back directly.
pg_copy_in() {
    local port="$1" mode="$2" out sha
    PSQL "$PG_PORT" -q -c "DROP TABLE IF EXISTS upload_$mode; CREATE TABLE upload_$mode (i int, h text, pad text, d date)"
    out="$(t 120 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench \
        -c "COPY upload_$mode FROM STDIN" <"$W/copy-direct.tsv")"
    echo "$out"
    [[ "$out" == "COPY $COPY_ROWS" ]] || fail "expected 'COPY $COPY_ROWS'"
    sha="$(t 120 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench \
        -c "COPY (SELECT * FROM upload_$mode ORDER BY i) TO STDOUT" | sha256sum | awk '{print $1}')"
    echo "read back directly: sha256 $sha"
    [[ "$sha" == "$(cat "$W/copy-direct.sha")" ]] || fail "uploaded table differs from the uploaded file"
    PSQL "$PG_PORT" -q -c "DROP TABLE upload_$mode"
}

# One connection per transaction (-C): every relay must be logged closed.
pg_conn_churn() {
    local port="$1" mode="$2" log="$3" before eof0 n closed bad
    before="$(lib_closes "$log")"
    eof0="$(lib_closes "$log" eof)"
    pgbench_run "${mode}_C" "$port" -n -S -C -c 2 -j 2 -T 3
    n="$(get_metric "pg_${mode}_C_xacts")"
    if lib_standin; then return 0; fi
    # each transaction had its own connection: >= n relays closed
    lib_wait_until 10 lib_closes_at_least "$log" $((before + n)) ||
        fail "only $(($(lib_closes "$log") - before)) 'relay closed' lines for $n connections"
    closed=$(($(lib_closes "$log") - before))
    echo "$closed relays closed for $n transactions; reasons over the whole log: $(lib_close_reasons "$log")"
    # pgbench ends every connection cleanly (Terminate, then close)
    bad=$((closed - ($(lib_closes "$log" eof) - eof0)))
    ((bad == 0)) || fail "$bad of these relays closed with a reason other than eof"
}

pg_idle_long() {
    local port="$1" log="$2" before t0 el rc=0 sleep_s=$((IDLE_TIMEOUT_S * 2 + 1))
    before="$(lib_closes "$log" idle)"
    t0="$(lib_now_ms)"
    t 60 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench -At \
        -c "SELECT pg_sleep($sleep_s)" >"$W/idle.out" 2>&1 || rc=$?
    el="$(lib_elapsed "$t0")"
    cat "$W/idle.out"
    echo "psql exit status $rc after ${el}s (idle timeout ${IDLE_TIMEOUT_S}s, pg_sleep($sleep_s))"
    ((rc != 0)) || fail "psql succeeded: the silent connection was not closed at the idle timeout"
    awk -v e="$el" -v s="$sleep_s" 'BEGIN { exit !(e < s - 0.5) }' || fail "closed only after ${el}s, not at the idle timeout"
    awk -v e="$el" -v i="$IDLE_TIMEOUT_S" 'BEGIN { exit !(e >= i - 0.2) }' || fail "closed after ${el}s, before the idle timeout"
    if lib_standin; then return 0; fi
    lib_wait_until 5 lib_closes_at_least "$log" $((before + 1)) idle || fail "spliced log shows no new 'relay closed ... reason=idle'"
    lib_clean_log "$log" | grep 'reason=idle' | tail -n1
}

pg_idle_short() {
    local port="$1" out
    out="$(t 30 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench -At \
        -c "SELECT 'slept', pg_sleep($IDLE_TIMEOUT_S / 4.0)")"
    echo "$out"
    [[ "$out" == "slept|" ]] || fail "unexpected result"
}

# A session longer than the idle timeout, with gaps shorter than it.
pg_idle_active_session() {
    local port="$1" out args=() i gap
    gap="$(awk -v i="$IDLE_TIMEOUT_S" 'BEGIN { print i * 0.3 }')"
    for i in 1 2 3 4 5 6; do args+=(-c "SELECT $i, pg_sleep($gap)"); done
    out="$(t 60 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d bench -At "${args[@]}" | tr '\n' ' ')"
    echo "$out"
    [[ "$out" == "1| 2| 3| 4| 5| 6| " ]] || fail "session did not survive (gaps ${gap}s < idle ${IDLE_TIMEOUT_S}s)"
}

# ---------------------------------------------------------------- redis checks
# redis_bench LABEL PORT TESTS ARGS...: redis-benchmark -q -t TESTS, assert
# success and one positive requests/s result per test; record them.
redis_bench() {
    local label="$1" port="$2" tests="$3" out lines name rps want
    shift 3
    out="$W/redis-bench-$label.txt"
    t 120 redis-benchmark -h 127.0.0.1 -p "$port" -q -t "$tests" "$@" 2>&1 | tr '\r' '\n' >"$out" \
        || { tail -n 5 "$out"; fail "redis-benchmark exited non-zero"; }
    lines="$(grep 'requests per second' "$out" || true)"
    echo "$lines"
    want="$(awk -v s="$tests" 'BEGIN { print split(s, a, ",") }')"
    [[ "$(grep -c . <<<"$lines")" == "$want" ]] || fail "expected $want result lines"
    while read -r name rps _; do
        name="${name%%:*}"
        awk -v r="$rps" 'BEGIN { exit !(r > 0) }' || fail "bad rate for $name: $rps"
        metric "redis_${label}_${name}" "$rps"
    done < <(sed -E 's/^([A-Z_]+)[^:]*: ([0-9.]+) requests per second.*/\1 \2/' <<<"$lines")
}

redis_gen_pipe() {
    local mode="$1"
    awk -v n="$REDIS_KEYS" -v m="$mode" 'BEGIN {
        pad = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
        for (i = 1; i <= n; i++) {
            k = "e2e:" m ":" i; v = "val:" i ":" m ":" pad
            printf "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", length(k), k, length(v), v
        }
    }' >"$W/pipe-$mode.resp"
}

redis_pipe() {
    local port="$1" mode="$2" out
    redis_gen_pipe "$mode"
    [[ "$(rcli "$port" FLUSHALL)" == OK ]] || fail "FLUSHALL"
    echo "payload: $(stat -c %s "$W/pipe-$mode.resp") bytes, $REDIS_KEYS SET commands"
    out="$(t 120 redis-cli -h 127.0.0.1 -p "$port" --pipe <"$W/pipe-$mode.resp")"
    echo "$out"
    grep -qx "errors: 0, replies: $REDIS_KEYS" <<<"$out" || fail "expected the line 'errors: 0, replies: $REDIS_KEYS'"
    local dbsize
    dbsize="$(rcli "$port" DBSIZE)"
    echo "DBSIZE $dbsize"
    [[ "$dbsize" == "$REDIS_KEYS" ]] || fail "DBSIZE $dbsize, want $REDIS_KEYS"
}

redis_verify() {
    local port="$1" mode="$2" k i pad="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
    : >"$W/get-$mode.cmd"
    : >"$W/get-$mode.want"
    for ((k = 0; k < 500; k++)); do
        i=$((1 + (k * 7919 + k * k) % REDIS_KEYS))
        ((k == 1)) && i=$REDIS_KEYS
        echo "GET e2e:$mode:$i" >>"$W/get-$mode.cmd"
        echo "val:$i:$mode:$pad" >>"$W/get-$mode.want"
    done
    echo "GET e2e:$mode:$((REDIS_KEYS + 1))" >>"$W/get-$mode.cmd"
    echo "" >>"$W/get-$mode.want"
    t 60 redis-cli -h 127.0.0.1 -p "$port" <"$W/get-$mode.cmd" >"$W/get-$mode.got"
    diff "$W/get-$mode.want" "$W/get-$mode.got" | head -n 10 || fail "GET results differ (want vs got above)"
    echo "$(wc -l <"$W/get-$mode.got") GET replies match (incl. one missing key)"
    # and the same sample read directly agrees
    t 60 redis-cli -h 127.0.0.1 -p "$RD_PORT" <"$W/get-$mode.cmd" | cmp - "$W/get-$mode.want" || fail "direct GET disagrees"
}

# ---------------------------------------------------------------- spliced checks
# No panic; and, as every client of this instance closed cleanly, every
# relay closed with reason=eof (but EXPECT_IDLE relays with reason=idle).
log_clean() {
    local log="$1" expect_idle="${2:-0}" total eof idle other
    if lib_clean_log "$log" | grep -Ei 'panicked|RUST_BACKTRACE'; then fail "panic in $log"; fi
    lib_standin && return 0
    total="$(lib_closes "$log")"
    eof="$(lib_closes "$log" eof)"
    idle="$(lib_closes "$log" idle)"
    echo "relay closed lines: $total (eof $eof, idle $idle)"
    ((total > 0)) || fail "no 'relay closed' line at all"
    other=$((total - eof - idle))
    if ((other > 0 || idle != expect_idle)); then
        lib_clean_log "$log" | grep 'relay closed' | grep -v 'reason=eof' | head -n 10
        fail "want every relay closed with reason=eof (and $expect_idle with reason=idle)"
    fi
}

stop_spliced() {
    local pid="$1" log="$2" rc
    if lib_stop_pid "$pid" 20; then
        rc=$LIB_STOP_STATUS
        echo "exit status $rc"
    else
        rc=124
        echo "still running 20s after SIGTERM: killed"
    fi
    lib_clean_log "$log" | tail -n 3
    ((rc == 0)) || fail "spliced exited with $rc after SIGTERM"
}

# ---------------------------------------------------------------- throughput
# One round against one target (direct or a spliced): the figures of the
# ratio table. Every command must still succeed.
perf_round() {
    local tgt="$1" pgp="$2" rdp="$3" t0
    pgbench_run "perf_${tgt}_S" "$pgp" -n -S -c 4 -j 2 -T "$PERF_SECS" | grep '^tps'
    pgbench_run "perf_${tgt}_B" "$pgp" -n -c 4 -j 2 -T "$PERF_SECS" | grep '^tps'
    pgbench_run "perf_${tgt}_C" "$pgp" -n -S -C -c 2 -j 2 -T 2 | grep '^tps'
    redis_bench "perf_${tgt}" "$rdp" "$REDIS_PERF_TESTS" -n 20000 -c 20
    redis_bench "perf_${tgt}P" "$rdp" "$REDIS_PERF_TESTS" -n 100000 -c 20 -P 16
    t0="$(lib_now_ms)"
    t 120 "$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pgp" -U postgres -d bench -c "$PERF_COPY_Q" >"$W/perf-copy.tsv"
    metric "perf_${tgt}_copy_mbps" "$(awk -v b="$(stat -c %s "$W/perf-copy.tsv")" -v s="$(lib_elapsed "$t0")" 'BEGIN { printf "%.1f\n", b / s / 1e6 }')"
    [[ "$(wc -l <"$W/perf-copy.tsv")" == "$PERF_COPY_ROWS" ]] || fail "COPY returned $(wc -l <"$W/perf-copy.tsv") rows, want $PERF_COPY_ROWS"
    echo "COPY $(stat -c %s "$W/perf-copy.tsv") bytes: $(get_metric "perf_${tgt}_copy_mbps") MB/s"
    rm -f "$W/perf-copy.tsv"
}

# Kernel TCP counters: global TCP memory pressure (e.g. other tests on a
# shared machine holding thousands of sockets) makes receivers drop segments
# and throughput collapse into retransmission timeouts, proxied paths (two
# TCP hops) more than direct ones. Reported with the throughput table.
tcp_counters() {
    awk '/^TcpExt:/ { if (!h) { split($0, k); h = 1 } else { split($0, v)
        for (i = 2; i in k; i++) if (k[i] ~ /^(TCPMemoryPressures|TCPMemoryPressuresChrono|TCPRcvQDrop|TCPTimeouts)$/) printf "%s=%s ", k[i], v[i] } }' \
        /proc/net/netstat 2>/dev/null || true
}
tcp_delta() {
    local a="$1" b="$2" k out=""
    for k in TCPMemoryPressures TCPMemoryPressuresChrono TCPRcvQDrop TCPTimeouts; do
        out+="$k +$(($(grep -o "$k=[0-9]*" <<<"$b" | cut -d= -f2) - $(grep -o "$k=[0-9]*" <<<"$a" | cut -d= -f2))) "
    done
    echo "$out"
}

# ---------------------------------------------------------------- run
echo "e2e: spliced=$( lib_standin && echo "stand-in ($SPLICED_STANDIN)" || echo "$SPLICED_BIN") modes=[$MODES] work=$W"

check_here "postgres starts (initdb, 127.0.0.1 only)" pg_start
check_here "redis starts (127.0.0.1, no persistence)" redis_start
check "direct: pgbench -i -s $PG_SCALE" pg_init "$PG_PORT"
check "direct: COPY TO STDOUT reference ($COPY_ROWS rows)" pg_copy_reference
COPY_MB=$(($(get_metric copy_bytes || true) + 0))
COPY_MB=$((COPY_MB / 1000000))

for mode in $MODES; do
    PGP="" IDP="" RDP="" PGPID="" IDPID="" RDPID="" PGLOG="" IDLOG="" RDLOG=""
    if check_here "[$mode] spliced starts in front of postgres" spliced_start "pg-$mode" --listen 127.0.0.1:0 --mode "$mode" --upstream "127.0.0.1:$PG_PORT"; then
        PGP=$SPLICED_PORT PGPID=$SPLICED_PID PGLOG=$SPLICED_LOG
    fi
    if check_here "[$mode] spliced starts with --idle-timeout ${IDLE_TIMEOUT_S}s" spliced_start "pgidle-$mode" --listen 127.0.0.1:0 --mode "$mode" --upstream "127.0.0.1:$PG_PORT" --idle-timeout "${IDLE_TIMEOUT_S}s"; then
        IDP=$SPLICED_PORT IDPID=$SPLICED_PID IDLOG=$SPLICED_LOG
    fi
    if check_here "[$mode] spliced starts in front of redis" spliced_start "redis-$mode" --listen 127.0.0.1:0 --mode "$mode" --upstream "127.0.0.1:$RD_PORT"; then
        RDP=$SPLICED_PORT RDPID=$SPLICED_PID RDLOG=$SPLICED_LOG
    fi
    # an unstarted spliced makes its checks fail against port 1 (refused)
    PGP=${PGP:-1} IDP=${IDP:-1} RDP=${RDP:-1}

    check "[$mode] pg: pgbench -i -s $PG_SCALE via spliced" pg_init "$PGP"
    check "[$mode] pg: pgbench -S -c 4 -j 2 -T $PGBENCH_SECS via spliced" pgbench_run "${mode}_S" "$PGP" -n -S -c 4 -j 2 -T "$PGBENCH_SECS"
    check "[$mode] pg: pgbench TPC-B -c 4 -j 2 -T $PGBENCH_SECS via spliced" pgbench_run "${mode}_B" "$PGP" -c 4 -j 2 -T "$PGBENCH_SECS"
    check "[$mode] pg: balances consistent after TPC-B (via spliced)" pg_consistency "$PGP" "${mode}_B"
    check "[$mode] pg: pgbench -S -C (connection per transaction), all relays closed eof" pg_conn_churn "$PGP" "$mode" "${PGLOG:-/dev/null}"
    check "[$mode] pg: COPY TO STDOUT ${COPY_MB} MB via spliced, sha256 = direct" pg_copy_out "$PGP" "$mode"
    check "[$mode] pg: COPY FROM STDIN ${COPY_MB} MB via spliced, read back = sent" pg_copy_in "$PGP" "$mode"
    check "[$mode] pg: pg_sleep($((IDLE_TIMEOUT_S * 2 + 1))) silent > idle ${IDLE_TIMEOUT_S}s is closed, reason=idle" pg_idle_long "$IDP" "${IDLOG:-/dev/null}"
    check "[$mode] pg: pg_sleep shorter than idle ${IDLE_TIMEOUT_S}s completes" pg_idle_short "$IDP"
    check "[$mode] pg: session of short sleeps outlives idle ${IDLE_TIMEOUT_S}s" pg_idle_active_session "$IDP"

    check "[$mode] redis: redis-benchmark -n 20000 ($REDIS_BENCH_TESTS) via spliced" redis_bench "$mode" "$RDP" "$REDIS_BENCH_TESTS" -n 20000 -c 20
    check "[$mode] redis: --pipe $REDIS_KEYS SETs, errors: 0, replies: $REDIS_KEYS, DBSIZE" redis_pipe "$RDP" "$mode"
    check "[$mode] redis: 500 sampled GETs via spliced match" redis_verify "$RDP" "$mode"

    for x in "pg:$PGPID:$PGLOG:0" "pgidle:$IDPID:$IDLOG:1" "redis:$RDPID:$RDLOG:0"; do
        IFS=: read -r nm pid log nidle <<<"$x"
        [[ -n "$pid" ]] || continue
        check "[$mode] spliced($nm) log: no panic, all relays closed eof (idle: $nidle)" log_clean "$log" "$nidle"
        check_here "[$mode] spliced($nm) SIGTERM -> exit 0" stop_spliced "$pid" "$log"
    done
done

# shellcheck source=scripts/e2e-prom.sh
source "$HERE/e2e-prom.sh"
for mode in $MODES; do prom_case "$mode"; done

# Throughput: rounds over direct and each engine, order rotated each round
# so that no target always runs first; the table shows medians.
TARGETS=(direct)
declare -A TPG=([direct]=$PG_PORT) TRD=([direct]=$RD_PORT) TPIDS=() TLOGS=()
for mode in $MODES; do
    if check_here "[perf] spliced($mode) starts in front of postgres" spliced_start "perf-pg-$mode" --listen 127.0.0.1:0 --mode "$mode" --upstream "127.0.0.1:$PG_PORT"; then
        TPG[$mode]=$SPLICED_PORT
        TPIDS[pg-$mode]=$SPLICED_PID TLOGS[pg-$mode]=$SPLICED_LOG
    fi
    if check_here "[perf] spliced($mode) starts in front of redis" spliced_start "perf-redis-$mode" --listen 127.0.0.1:0 --mode "$mode" --upstream "127.0.0.1:$RD_PORT"; then
        TRD[$mode]=$SPLICED_PORT
        TPIDS[redis-$mode]=$SPLICED_PID TLOGS[redis-$mode]=$SPLICED_LOG
    fi
    TARGETS+=("$mode")
done
TCP_BEFORE="$(tcp_counters)"
for ((r = 0; r < PERF_ROUNDS; r++)); do
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        tg="${TARGETS[$(((i + r) % ${#TARGETS[@]}))]}"
        check "[perf] round $((r + 1))/$PERF_ROUNDS $tg: pgbench -S/TPC-B/-C, redis-benchmark, COPY" \
            perf_round "$tg" "${TPG[$tg]:-1}" "${TRD[$tg]:-1}"
    done
done
TCP_AFTER="$(tcp_counters)"
for k in "${!TPIDS[@]}"; do
    check "[perf] spliced($k) log: no panic, all relays closed eof" log_clean "${TLOGS[$k]}" 0
    check_here "[perf] spliced($k) SIGTERM -> exit 0" stop_spliced "${TPIDS[$k]}" "${TLOGS[$k]}"
done

# ---------------------------------------------------------------- report
ratio() {
    local a="$1" b="$2"
    [[ -n "$a" && -n "$b" ]] || { echo "-"; return; }
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f\n", a / b; else print "-" }'
}
fmt() { [[ -n "$1" ]] && awk -v v="$1" 'BEGIN { printf (v < 100 ? "%.1f\n" : "%.0f\n"), v }' || echo "-"; }
row() {
    local label="$1" key="$2" line m d v
    d="$(get_median "${key//@/direct}")"
    line="$(printf '%-34s %10s' "$label" "$(fmt "$d")")"
    for m in $MODES; do
        v="$(get_median "${key//@/$m}")"
        line+="$(printf ' %10s %6s' "$(fmt "$v")" "$(ratio "$v" "$d")")"
    done
    echo "$line"
}
echo
echo "Throughput through spliced vs direct: median of $PERF_ROUNDS rounds (informational, no pass/fail;"
echo "$(nproc) cores shared by postgres/redis, the clients and spliced)"
hdr="$(printf '%-34s %10s' "workload" "direct")"
for m in $MODES; do hdr+="$(printf ' %10s %6s' "$m" "ratio")"; done
echo "$hdr"
row "pgbench -S tps (c4 j2 T$PERF_SECS)" "pg_perf_@_S_tps"
row "pgbench TPC-B tps (c4 j2 T$PERF_SECS)" "pg_perf_@_B_tps"
row "pgbench -S -C tps (c2, conn/xact)" "pg_perf_@_C_tps"
for tname in ${REDIS_PERF_TESTS//,/ }; do
    T="${tname^^}"
    row "redis-benchmark $T ops/s (c20)" "redis_perf_@_$T"
    row "redis-benchmark $T ops/s (c20 P16)" "redis_perf_@P_$T"
done
row "psql COPY TO STDOUT $((COPY_MB / 3)) MB, MB/s" "perf_@_copy_mbps"
if [[ -n "$TCP_BEFORE" && -n "$TCP_AFTER" ]]; then
    echo "kernel TCP counters during the throughput rounds (whole machine): $(tcp_delta "$TCP_BEFORE" "$TCP_AFTER")"
    if [[ "$(tcp_delta "$TCP_BEFORE" "$TCP_AFTER")" != "TCPMemoryPressures +0 TCPMemoryPressuresChrono +0 "* ]]; then
        echo "  note: the host was under TCP memory pressure: receivers dropped segments; figures are not representative"
    fi
fi
cp "$W/metrics" "$W/metrics.log" 2>/dev/null || true

echo
echo "e2e: elapsed $((SECONDS - T_START))s"
if ((LIB_FAILED > 0)); then
    echo "e2e: failed checks:"
    printf '  - %s\n' "${LIB_FAILED_NAMES[@]}"
fi
echo "e2e: $LIB_PASSED passed, $LIB_FAILED failed"
((LIB_FAILED == 0))
