#!/usr/bin/env bash
# The application stages of `make bench-peers` (STAGES iperf3 and apps): real
# clients and servers through spliced (--mode splice, copy, auto; and
# spliced-uring-copy etc. for the same on --loop uring) and the peers
# (HAProxy forced splice, splice-auto, no splice; nginx stream), each run as one
# worker pinned to PROXY_CPU, and a `direct` baseline with no proxy.
#
#   iperf3   iperf3 -c through the proxy, client to server and -R, for
#            IPERF_SECS (default 5) with 128 KiB writes: Gbit/s and the proxy's
#            CPU seconds per GB
#   apps     redis-benchmark -t set,get -n REDIS_REQUESTS (default 100000
#            each) at -c 50 and at -c 500: requests/s, proxy CPU µs per
#            request, and p50/p99 latency per request of SET and GET (from
#            its --csv); pgbench -S -T PGBENCH_SECS (default 5) at -c 8 -j 1
#            and at -c 100 -j 2: tps, proxy CPU µs per transaction, and
#            p50/p99 latency per transaction (nearest rank over every
#            transaction of its -l log). PostgreSQL runs with
#            max_connections=120 for the 100 clients.
#
# Proxy CPU is utime+stime (+ reaped children) of the proxy's pid and its
# children (nginx's worker) from /proc/PID/stat, read before and after each
# client run. iperf3 -s, redis-server and a PostgreSQL cluster (initdb under
# the work dir, trust auth) are started by hand on 127.0.0.1, pinned to
# LOAD_CPU with the clients, and stopped by pid at the end (also on Ctrl-C).
# Each proxy is started fresh for each run and stopped after it, so pipes one
# proxy pooled are not charged to the next one's user (pipe-user-pages-soft);
# runs take the proxies in turn (a drift of the machine hits all alike).
#
# Medians of RUNS runs (default 5) with their spread go into OUT (default
# docs/benchmarks/apps-loopback.md) between the apps markers. Called by
# scripts/bench-peers.sh; runs on its own too:
#
#   STAGES=iperf3,apps RUNS=3 bash scripts/bench-apps.sh
#
# Loopback only (127.0.0.1). Needs root to install packages.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_LOG=${RUST_LOG:-warn}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

RUNS=${RUNS:-5}
STAGES=${STAGES:-iperf3,apps}
BENCH_PATH=${BENCH_PATH:-loopback}
OUT=${OUT:-docs/benchmarks/apps-loopback.md}
APPS_PORT=${APPS_PORT:-19300}
IPERF_SECS=${IPERF_SECS:-5}
REDIS_REQUESTS=${REDIS_REQUESTS:-100000}
PGBENCH_SECS=${PGBENCH_SECS:-5}
PGBENCH_SCALE=${PGBENCH_SCALE:-10}
ENGINES=${ENGINES:-direct,spliced-splice,spliced-copy,spliced-auto,spliced-uring-copy,spliced-uring-auto,haproxy-splice,haproxy-splice-auto,haproxy-nosplice,nginx}
NCPU=$(nproc)
PROXY_CPU=${PROXY_CPU:-$((NCPU > 1 ? 1 : 0))}
LOAD_CPU=${LOAD_CPU:-0}
HZ=$(getconf CLK_TCK)
stage() { [[ ,$STAGES, == *,$1,* ]]; }

if ! stage iperf3 && ! stage apps; then exit 0; fi
if [[ $BENCH_PATH != loopback ]]; then
    lib_log "iperf3/apps stages run on loopback only; skipped for BENCH_PATH=$BENCH_PATH"
    exit 0
fi
if [[ ! -x $SPLICED_BIN ]]; then
    lib_log "build first: cargo build --release ($SPLICED_BIN is missing)"
    exit 1
fi

# --- packages --------------------------------------------------------------
pkgs=()
command -v haproxy >/dev/null || pkgs+=(haproxy)
command -v nginx >/dev/null || pkgs+=(nginx-light)
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || pkgs+=(libnginx-mod-stream)
command -v taskset >/dev/null || pkgs+=(util-linux)
command -v jq >/dev/null || pkgs+=(jq)
if stage iperf3 && ! command -v iperf3 >/dev/null; then pkgs+=(iperf3); fi
if ((${#pkgs[@]})); then
    lib_apt_install "${pkgs[@]}" || lib_die "missing ${pkgs[*]}; run as root so apt-get can install them"
fi
# redis-server, redis-tools, postgresql (pgbench ships with the server).
have_apps() { command -v redis-server && command -v redis-benchmark && compgen -G '/usr/lib/postgresql/*/bin/pgbench'; }
if stage apps && ! have_apps >/dev/null; then
    bash scripts/install-deps.sh || lib_die "scripts/install-deps.sh failed"
fi

# --- who runs it -----------------------------------------------------------
lib_bench_user
# PostgreSQL refuses to run as root.
if stage apps && [[ $BENCH_USER == root ]]; then lib_die "the apps stage needs BENCH_USER other than root (postgres refuses root)"; fi
load() { lib_as_user taskset -c "$LOAD_CPU" "$@"; }

lib_bench_init apps

# spawn NAME CPU CMD...: CMD as BENCH_USER pinned to CPU, output to
# $WORK/NAME.log; SPAWNED is its pid (every step execs).
spawn() {
    local name=$1 cpu=$2
    shift 2
    (
        if [[ $(id -un) == "$BENCH_USER" ]]; then exec taskset -c "$cpu" "$@"; fi
        exec setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups -- \
            taskset -c "$cpu" "$@"
    ) </dev/null >"$WORK/$name.log" 2>&1 &
    SPAWNED=$!
}
listening() { # pid port...
    local pid=$1 p
    shift
    lib_pid_alive "$pid" || return 1
    for p in "$@"; do lib_port_listening "$p" || return 1; done
}

# --- servers on 127.0.0.1, pinned with the load ----------------------------
IPERF_PORT=$APPS_PORT
REDIS_PORT=$((APPS_PORT + 1))
PG_PORT=$((APPS_PORT + 2))
for p in "$IPERF_PORT" "$REDIS_PORT" "$PG_PORT"; do
    ! lib_port_listening "$p" || lib_die "port $p is already in use; set APPS_PORT"
done
SERVERS=""
if stage iperf3; then
    spawn iperf3-server "$LOAD_CPU" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT"
    lib_track_pid "$SPAWNED"
    lib_wait_until 10 listening "$SPAWNED" "$IPERF_PORT" || lib_die "iperf3 -s did not start: $(cat "$WORK/iperf3-server.log")"
    SERVERS+="iperf3 $(iperf3 --version | head -1 | cut -d' ' -f2), "
fi
if stage apps; then
    spawn redis "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        --protected-mode no --dir "$WORK" --daemonize no
    lib_track_pid "$SPAWNED"
    lib_wait_until 10 listening "$SPAWNED" "$REDIS_PORT" || lib_die "redis-server did not start: $(cat "$WORK/redis.log")"
    SERVERS+="redis $(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-), "

    PGBIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -1)
    [[ -x $PGBIN/initdb ]] || lib_die "PostgreSQL binaries not found under /usr/lib/postgresql"
    lib_as_user "$PGBIN/initdb" -D "$WORK/pg" -U postgres -A trust --no-sync -E UTF8 >"$WORK/initdb.log" 2>&1 ||
        lib_die "initdb failed: $(tail -5 "$WORK/initdb.log")"
    spawn postgres "$LOAD_CPU" "$PGBIN/postgres" -D "$WORK/pg" -k "$WORK" -p "$PG_PORT" \
        -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
        -c max_connections=120
    PG_PID=$SPAWNED
    # Fast shutdown (SIGINT) by pid, before the work dir goes.
    lib_on_exit "lib_stop_pid $PG_PID 20 INT || true"
    lib_wait_until 20 listening "$PG_PID" "$PG_PORT" || lib_die "postgres did not start: $(tail -5 "$WORK/postgres.log")"
    pg_ready() { "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres; }
    lib_wait_until 20 pg_ready || lib_die "postgres is not accepting connections"
    lib_log "pgbench -i -s $PGBENCH_SCALE"
    load "$PGBIN/pgbench" -i -q -s "$PGBENCH_SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres \
        >"$WORK/pgbench-init.log" 2>&1 || lib_die "pgbench -i failed: $(tail -5 "$WORK/pgbench-init.log")"
    SERVERS+="PostgreSQL $("$PGBIN/postgres" --version | awk '{ print $3 }') (scale $PGBENCH_SCALE, fsync off), "
fi

# --- proxies: each listens on three ports, one per server ------------------
# Engine i listens on PEER_PORT + 3i (iperf3), +1 (redis), +2 (postgres).
PEER_PORT=$((APPS_PORT + 10))
ports_of() { # index
    local b=$((PEER_PORT + 3 * $1))
    echo "$b $((b + 1)) $((b + 2))"
}
write_configs() { # index
    local b=$((PEER_PORT + 3 * $1)) i=0 up m opt
    local ups=("$IPERF_PORT" "$REDIS_PORT" "$PG_PORT")
    : >"$WORK/spliced-$1.toml"
    for up in "${ups[@]}"; do
        printf '[[listener]]\nname = "l%d"\nlisten = ["127.0.0.1:%d"]\n[listener.pool]\nservers = [{ address = "127.0.0.1:%d" }]\n\n' \
            "$i" "$((b + i))" "$up" >>"$WORK/spliced-$1.toml"
        i=$((i + 1))
    done
    for m in forced auto none; do
        case $m in
            forced) opt=$'    option splice-request\n    option splice-response' ;;
            auto) opt="    option splice-auto" ;;
            none) opt="" ;;
        esac
        {
            printf 'global\n    nbthread 1\n    maxconn 4000\n'
            [[ $m != none ]] || printf '    nosplice\n'
            printf 'defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n%s\n' "$opt"
            for i in 0 1 2; do
                printf 'listen l%d\n    bind 127.0.0.1:%d\n    server up 127.0.0.1:%d\n' "$i" "$((b + i))" "${ups[i]}"
            done
        } >"$WORK/haproxy-$m-$1.cfg"
    done
    {
        printf 'load_module /usr/lib/nginx/modules/ngx_stream_module.so;\ndaemon off;\nmaster_process on;\n'
        printf 'worker_processes 1;\npid %s/nginx.pid;\nerror_log %s/nginx-error.log warn;\n' "$WORK" "$WORK"
        printf 'events { worker_connections 4000; }\nstream {\n'
        for i in 0 1 2; do
            printf '    server { listen 127.0.0.1:%d; proxy_pass 127.0.0.1:%d; proxy_timeout 1h; }\n' "$((b + i))" "${ups[i]}"
        done
        printf '}\n'
    } >"$WORK/nginx-$1.conf"
}

# start_proxy ENGINE INDEX: sets PROXY_PID (empty for direct) and BASE, the
# port the iperf3 client uses (redis +1, postgres +2).
start_proxy() {
    local eng=$1 idx=$2 ports cmd
    read -r -a ports <<<"$(ports_of "$idx")"
    PROXY_PID=""
    if [[ $eng == direct ]]; then
        BASE=""
        return 0
    fi
    BASE=${ports[0]}
    case $eng in
        spliced-uring-*) cmd=(env "RUNTIME_DIRECTORY=$WORK" "$BIN" run --config "$WORK/spliced-$idx.toml"
            --mode "${eng#spliced-uring-}" --loop uring --workers 1 --name "apps-$eng") ;;
        spliced-*) cmd=(env "RUNTIME_DIRECTORY=$WORK" "$BIN" run --config "$WORK/spliced-$idx.toml"
            --mode "${eng#spliced-}" --workers 1 --name "apps-$eng") ;;
        haproxy-splice) cmd=(haproxy -db -f "$WORK/haproxy-forced-$idx.cfg") ;;
        haproxy-splice-auto) cmd=(haproxy -db -f "$WORK/haproxy-auto-$idx.cfg") ;;
        haproxy-nosplice) cmd=(haproxy -db -f "$WORK/haproxy-none-$idx.cfg") ;;
        nginx) cmd=(nginx -e "$WORK/nginx-error.log" -p "$WORK" -c "$WORK/nginx-$idx.conf") ;;
        *) lib_die "unknown engine '$eng' in ENGINES" ;;
    esac
    spawn "$eng" "$PROXY_CPU" "${cmd[@]}"
    PROXY_PID=$SPAWNED
    lib_track_pid "$PROXY_PID"
    if ! lib_wait_until 10 listening "$PROXY_PID" "${ports[@]}"; then
        lib_log "$eng did not start: $(tail -5 "$WORK/$eng.log")"
        lib_stop_pid "$PROXY_PID" 5 || true
        return 1
    fi
}

# Clock ticks of PID and its children: utime, stime and reaped children's.
cpu_ticks() {
    local p sum=0 line f
    for p in "$1" $(pgrep -P "$1" || true); do
        { read -r line <"/proc/$p/stat"; } 2>/dev/null || continue
        read -r -a f <<<"${line##*) }"
        sum=$((sum + f[11] + f[12] + f[13] + f[14]))
    done
    echo "$sum"
}

RESULTS=$WORK/results.tsv
: >"$RESULTS"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }
# proxy CPU seconds (empty for direct) between two cpu_ticks readings
cpu_s() { [[ -z $PROXY_PID ]] || awk -v a="$1" -v b="$2" -v hz="$HZ" 'BEGIN { printf "%.4f", (b - a) / hz }'; }
ticks() { [[ -z $PROXY_PID ]] || cpu_ticks "$PROXY_PID"; }

run_iperf3() { # engine run
    local eng=$1 run=$2 port=${BASE:-$IPERF_PORT} dir rev c0 c1 out bytes secs cpu
    for dir in up down; do
        rev=()
        [[ $dir == up ]] || rev=(-R)
        out=$WORK/iperf3-$eng-$dir-$run.json
        c0=$(ticks)
        if ! load timeout $((IPERF_SECS + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$IPERF_SECS" -l 128K -J \
            "${rev[@]}" >"$out" 2>&1; then
            lib_log "iperf3 $dir through $eng failed (run $run): $(jq -r '.error // empty' "$out" 2>/dev/null | head -1)"
            continue
        fi
        c1=$(ticks)
        bytes=$(jq -r '.end.sum_received.bytes' "$out")
        secs=$(jq -r '.end.sum_received.seconds' "$out")
        record "iperf3-$dir-gbps" "$eng" "$(awk -v b="$bytes" -v s="$secs" 'BEGIN { printf "%.4f", b * 8 / s / 1e9 }')"
        cpu=$(cpu_s "$c0" "$c1")
        [[ -z $cpu ]] || record "iperf3-$dir-cpu" "$eng" "$(awk -v c="$cpu" -v b="$bytes" 'BEGIN { printf "%.5f", c / (b / 1e9) }')"
    done
}

# p50 and p99 (nearest rank) of the numbers on stdin, one a line: "P50 P99".
percentiles() {
    sort -n | awk '{ a[NR] = $1 } END {
        if (NR == 0) exit 1
        i = int(0.5 * NR); if (i < 0.5 * NR) i++; if (i < 1) i = 1
        j = int(0.99 * NR); if (j < 0.99 * NR) j++; if (j < 1) j = 1
        print a[i], a[j]
    }'
}

# redis-benchmark --csv: "test","rps","avg_latency_ms","min_latency_ms",
# "p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms".
# Prints "RPS P50_US P99_US" of TEST.
redis_csv() { # file test
    awk -F'","' -v t="\"$2" '
        NR == 1 { for (i = 1; i <= NF; i++) { h = $i; gsub(/"/, "", h); col[h] = i } }
        $1 == t { r = $col["rps"]; p = $col["p50_latency_ms"]; q = $col["p99_latency_ms"]
                  gsub(/"/, "", r); gsub(/"/, "", p); gsub(/"/, "", q)
                  printf "%s %.1f %.1f\n", r, p * 1000, q * 1000 }' "$1"
}

run_redis() { # engine run clients
    local eng=$1 run=$2 clients=$3 port=$REDIS_PORT c0 c1 out cpu t key rps p50 p99
    [[ -z $BASE ]] || port=$((BASE + 1))
    key=redis
    [[ $clients == 50 ]] || key=redis$clients
    out=$WORK/$key-$eng-$run.csv
    c0=$(ticks)
    if ! load timeout 300 redis-benchmark -h 127.0.0.1 -p "$port" -c "$clients" -n "$REDIS_REQUESTS" -t set,get --csv \
        >"$out" 2>&1; then
        lib_log "redis-benchmark -c $clients through $eng failed (run $run): $(tail -1 "$out")"
        return 0
    fi
    c1=$(ticks)
    for t in SET GET; do
        read -r rps p50 p99 <<<"$(redis_csv "$out" "$t")" || true
        [[ -n $rps ]] || { lib_log "redis-benchmark -c $clients through $eng: no $t line in $out"; continue; }
        record "$key-$t-rps" "$eng" "$rps"
        record "$key-$t-p50" "$eng" "$p50"
        record "$key-$t-p99" "$eng" "$p99"
    done
    cpu=$(cpu_s "$c0" "$c1")
    [[ -z $cpu ]] || record "$key-cpu" "$eng" "$(awk -v c="$cpu" -v n="$REDIS_REQUESTS" 'BEGIN { printf "%.4f", c * 1e6 / (2 * n) }')"
}

run_pgbench() { # engine run clients jobs
    local eng=$1 run=$2 clients=$3 jobs=$4 port=$PG_PORT c0 c1 out cpu n key logs p50 p99
    [[ -z $BASE ]] || port=$((BASE + 2))
    key=pgbench
    [[ $clients == 8 ]] || key=pgbench$clients
    out=$WORK/$key-$eng-$run.txt
    logs=$WORK/$key-$eng-$run.log
    c0=$(ticks)
    # -l: one line per transaction, its latency in µs in the third field.
    if ! load timeout $((PGBENCH_SECS + 60)) "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -S \
        -c "$clients" -j "$jobs" -T "$PGBENCH_SECS" -l --log-prefix="$logs" postgres >"$out" 2>&1; then
        lib_log "pgbench -c $clients through $eng failed (run $run): $(tail -1 "$out")"
        return 0
    fi
    c1=$(ticks)
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    record "$key-tps" "$eng" "$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out")"
    if read -r p50 p99 < <(cat "$logs".* 2>/dev/null | awk '{ print $3 }' | percentiles); then
        record "$key-p50" "$eng" "$p50"
        record "$key-p99" "$eng" "$p99"
    else
        lib_log "pgbench -c $clients through $eng: no transaction log ($logs.*)"
    fi
    rm -f "$logs".*
    cpu=$(cpu_s "$c0" "$c1")
    [[ -z $cpu || -z $n ]] || record "$key-cpu" "$eng" "$(awk -v c="$cpu" -v n="$n" 'BEGIN { printf "%.4f", c * 1e6 / n }')"
}

IFS=, read -r -a ENG <<<"$ENGINES"
for i in "${!ENG[@]}"; do
    for p in $(ports_of "$i"); do ! lib_port_listening "$p" || lib_die "port $p is already in use; set APPS_PORT"; done
    write_configs "$i"
done
lib_log "apps: ${ENG[*]} (proxies pinned to CPU $PROXY_CPU, load and servers to CPU $LOAD_CPU), as $BENCH_USER, $RUNS runs"
T0=$(lib_now_ms)
for ((run = 1; run <= RUNS; run++)); do
    for i in "${!ENG[@]}"; do
        eng=${ENG[i]}
        start_proxy "$eng" "$i" || continue
        if stage iperf3; then run_iperf3 "$eng" "$run"; fi
        if stage apps; then
            run_redis "$eng" "$run" 50
            run_redis "$eng" "$run" 500
            run_pgbench "$eng" "$run" 8 1
            run_pgbench "$eng" "$run" 100 2
        fi
        [[ -z $PROXY_PID ]] || lib_stop_pid "$PROXY_PID" 10 || lib_log "$eng did not stop on SIGTERM"
    done
    lib_log "run $run/$RUNS done ($(lib_elapsed "$T0") s)"
done

# --- the table -------------------------------------------------------------
# Rows: metric, label, which way is better (hi/lo), and the target it meets.
ROWS="iperf3-up-gbps|iperf3 client → server, Gbit/s|hi|hs-hi
iperf3-up-cpu|iperf3 client → server, proxy CPU s/GB|lo|hs-lo
iperf3-down-gbps|iperf3 -R server → client, Gbit/s|hi|hs-hi
iperf3-down-cpu|iperf3 -R server → client, proxy CPU s/GB|lo|hs-lo
redis-SET-rps|redis-benchmark -c 50 SET, requests/s|hi|-
redis-GET-rps|redis-benchmark -c 50 GET, requests/s|hi|-
redis-cpu|redis-benchmark SET+GET, proxy CPU µs/request|lo|best-085
redis-SET-p50|redis-benchmark -c 50 SET, p50 µs|lo|-
redis-SET-p99|redis-benchmark -c 50 SET, p99 µs|lo|-
redis-GET-p50|redis-benchmark -c 50 GET, p50 µs|lo|-
redis-GET-p99|redis-benchmark -c 50 GET, p99 µs|lo|-
redis500-SET-rps|redis-benchmark -c 500 SET, requests/s|hi|-
redis500-GET-rps|redis-benchmark -c 500 GET, requests/s|hi|-
redis500-cpu|redis-benchmark -c 500 SET+GET, proxy CPU µs/request|lo|-
redis500-SET-p50|redis-benchmark -c 500 SET, p50 µs|lo|-
redis500-SET-p99|redis-benchmark -c 500 SET, p99 µs|lo|-
redis500-GET-p50|redis-benchmark -c 500 GET, p50 µs|lo|-
redis500-GET-p99|redis-benchmark -c 500 GET, p99 µs|lo|-
pgbench-tps|pgbench -S -c 8, tps|hi|-
pgbench-cpu|pgbench -S -c 8, proxy CPU µs/transaction|lo|best-085
pgbench-p50|pgbench -S -c 8, p50 µs/transaction|lo|-
pgbench-p99|pgbench -S -c 8, p99 µs/transaction|lo|-
pgbench100-tps|pgbench -S -c 100 -j 2, tps|hi|-
pgbench100-cpu|pgbench -S -c 100 -j 2, proxy CPU µs/transaction|lo|-
pgbench100-p50|pgbench -S -c 100 -j 2, p50 µs/transaction|lo|-
pgbench100-p99|pgbench -S -c 100 -j 2, p99 µs/transaction|lo|-"
table() {
    awk -F'\t' -v rows="$ROWS" -v engines="$ENGINES" '
    function fmt(x) {
        if (x >= 100) return sprintf("%.0f", x)
        if (x >= 10) return sprintf("%.1f", x)
        if (x >= 1) return sprintf("%.2f", x)
        if (x >= 0.1) return sprintf("%.3f", x)
        return sprintf("%.3g", x)
    }
    function median(key,   n, i, j, t, a) {
        n = split(vals[key], a, " ")
        for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        MED = (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        SPREAD = 0
        for (i = 1; i <= n; i++) if (MED > 0 && (a[i] - MED < 0 ? MED - a[i] : a[i] - MED) / MED > SPREAD) SPREAD = (a[i] - MED < 0 ? MED - a[i] : a[i] - MED) / MED
        return n
    }
    function better(a, b, way) { return way == "hi" ? a > b : a < b }
    # "met"/"not met" on the ratio of medians q against t; "within spread" when
    # the spreads of the runs (s1 spliced, s2 the reference) reach across t.
    function verdict(q, t, way, s1, s2, what,   ok, strict, lenient, v) {
        if (way == "hi") { ok = q >= t; strict = q * (1 - s1) >= t * (1 + s2); lenient = q * (1 + s1) >= t * (1 - s2) }
        else { ok = q < t || (t != 1.0 && q == t); strict = q * (1 + s1) <= t * (1 - s2); lenient = q * (1 - s1) <= t * (1 + s2) }
        v = sprintf("%s: %.2f×, %s", what, q, ok ? "met" : "not met")
        return strict != lenient ? v " (within spread)" : v
    }
    { vals[$1 SUBSEP $2] = vals[$1 SUBSEP $2] " " $3; seen[$1] = 1 }
    END {
        ne = split(engines, eng, ",")
        head = "| |"; sep = "|---|"
        for (e = 1; e <= ne; e++) { head = head " " eng[e] " |"; sep = sep "---|" }
        print head " best spliced / best peer | target |"
        print sep "---|---|"
        nr = split(rows, row, "\n")
        for (r = 1; r <= nr; r++) {
            split(row[r], f, "|")
            if (!(f[1] in seen)) continue
            line = "| " f[2] " |"
            bs = ""; bp = ""; bsn = ""; bpn = ""; hs = ""; bss = 0; bps = 0; hss = 0
            for (e = 1; e <= ne; e++) {
                k = f[1] SUBSEP eng[e]
                if (!(k in vals)) { line = line " — |"; continue }
                n = median(k)
                line = line sprintf(" %s ±%.0f%%%s |", fmt(MED), SPREAD * 100, n < RUNS ? " (" n " runs)" : "")
                if (eng[e] ~ /^spliced-/) {
                    if (bs == "" || better(MED, bs, f[3])) { bs = MED; bsn = substr(eng[e], 9); bss = SPREAD }
                } else if (eng[e] != "direct") {
                    if (bp == "" || better(MED, bp, f[3])) { bp = MED; bpn = eng[e]; bps = SPREAD }
                    if (eng[e] == "haproxy-splice") { hs = MED; hss = SPREAD }
                }
            }
            ratio = (bs != "" && bp > 0) ? sprintf("%.2f× (%s / %s)", bs / bp, bsn, bpn) : "—"
            target = "—"
            if (f[4] ~ /^hs-/ && bs != "" && hs > 0) {
                target = verdict(bs / hs, 1.0, f[3], bss, hss, (f[3] == "hi" ? "≥" : "<") " 1.0× haproxy-splice")
            } else if (f[4] == "best-085" && bs != "" && bp > 0) {
                target = verdict(bs / bp, 0.85, f[3], bss, bps, "≤ 0.85× best peer")
            }
            print line " " ratio " | " target " |"
        }
    }' RUNS="$RUNS" "$RESULTS"
}

MARK=apps
{
    echo "<!-- $MARK:begin (written by scripts/bench-apps.sh through scripts/bench-peers.sh; do not edit by hand) -->"
    echo
    echo "### Applications and iperf3"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($NCPU CPUs), kernel $(uname -r),"
    echo "as user \`$BENCH_USER\`, stages \`$STAGES\`, medians of \`$RUNS\` runs (± the largest distance of a run from the median)."
    echo "Servers: ${SERVERS%, }, on 127.0.0.1, pinned to CPU $LOAD_CPU with the clients;"
    echo "every proxy one worker pinned to CPU $PROXY_CPU, started fresh for each run. Peers: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3),"
    echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'). iperf3 ${IPERF_SECS} s with 128 KiB writes; redis-benchmark -c 50 and -c 500 -n $REDIS_REQUESTS -t set,get"
    echo "(p50/p99 from its --csv); pgbench -S -T $PGBENCH_SECS at -c 8 -j 1 and -c 100 -j 2 (max_connections=120; p50/p99 nearest rank over every"
    echo "transaction of its -l log). Latencies are per request or transaction, as the client sees them, medians over the runs."
    echo "Proxy CPU: utime+stime of the proxy's processes from /proc (10 ms ticks)."
    echo "Throughput rows are capped by CPU $LOAD_CPU (clients and servers); the CPU rows separate the proxies."
    echo "Ratios are of medians; \"within spread\" means the runs' spreads reach across the target."
    echo
    table
    echo
    echo "<!-- $MARK:end -->"
} >"$WORK/section.md"

lib_replace_section "$OUT" "$MARK" "$WORK/section.md"
lib_log "wrote $OUT"
sed -n '/^|/p' "$WORK/section.md"
