#!/usr/bin/env bash
# scripts/failover.sh: real failovers through spliced's active checks (part
# of `make e2e`). Everything runs on 127.0.0.1 under a mktemp -d dir and is
# stopped by pid at exit.
#
#   postgres  a primary and a streaming replica (pg_basebackup -R) behind a
#             listener with `role = "primary"`, `on-down = "kill"`: the
#             primary hangs (SIGSTOP) and spliced resets its clients; then
#             it is stopped and the replica promoted; new connections through
#             spliced reach the new primary within interval x fall + 1 s, and
#             pgbench through spliced runs again. Cancel routing: `SELECT
#             pg_sleep(30)` through a two-server round-robin pool, cancelled
#             by psql (SIGINT), ends within 5 s of the SIGINT, every time.
#   redis     a master and a replica switched with REPLICAOF: the old
#             master's clients are reset by spliced (server-down), new
#             connections reach the new master within interval x fall + 1 s.
#   mariadb   behind a `mysql` check: up while it runs, marked down with its
#             reason once it stops.
#
# Ends with `failover: N passed, M failed`; exits non-zero if M > 0.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
source "$HERE/lib.sh"

INTERVAL_MS=300
FALL=2
BOUND_MS=$((INTERVAL_MS * FALL + 1000))

bash "$HERE/install-deps.sh" >/dev/null || lib_die "install-deps failed"
[[ -x "$SPLICED_BIN" ]] || lib_build || lib_die "cargo build --release failed"
lib_init failover
W="$LIB_TMP"
cp "$SPLICED_BIN" "$W/spliced-under-test" && SPLICED_BIN="$W/spliced-under-test"
chmod 755 "$W"

# Services run as an unprivileged user when we are root.
SVC_USER="$(id -un)"
if [[ "$(id -u)" == 0 ]]; then
    if getent passwd postgres >/dev/null; then SVC_USER=postgres
    else
        getent passwd spliced-e2e >/dev/null || useradd --system --no-create-home spliced-e2e
        SVC_USER=spliced-e2e
    fi
fi
as_svc() {
    if [[ "$(id -u)" == 0 ]]; then runuser -u "$SVC_USER" -- "$@"; else "$@"; fi
}
t() { local secs="$1"; shift; timeout -k 5 "$secs" "$@"; }

# wait_ms MS CMD...: run CMD every 20 ms until it succeeds; prints the
# milliseconds it took; fails after MS.
wait_ms() {
    local limit="$1" t0 now
    shift
    t0="$(lib_now_ms)"
    while true; do
        if "$@" >/dev/null 2>&1; then
            now="$(lib_now_ms)"
            echo $((now - t0))
            return 0
        fi
        now="$(lib_now_ms)"
        ((now - t0 > limit)) && { echo $((now - t0)); return 1; }
        sleep 0.02
    done
}

# all_reach CMD...: CMD succeeds six times in a row.
all_reach() {
    local i
    for i in 1 2 3 4 5 6; do "$@" >/dev/null 2>&1 || return 1; done
}

# spliced_with NAME TOML: writes the config and starts spliced on it.
spliced_with() {
    printf '%s\n' "$2" >"$W/$1.toml"
    RUST_LOG=info spliced_start "$1" --workers 2 --config "$W/$1.toml"
}

# ---------------------------------------------------------------- postgres
PGBIN=""
for d in /usr/lib/postgresql/*/bin; do [[ -x "$d/initdb" && -x "$d/pg_basebackup" ]] && PGBIN="$d"; done
PSQL() { local port="$1"; shift; "$PGBIN/psql" -X -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
pg_ctl_as() { as_svc "$PGBIN/pg_ctl" "$@"; }
pg_stop_dir() {
    [[ -f "$1/postmaster.pid" ]] || return 0
    pg_ctl_as -D "$1" -m immediate -w -t 30 stop >/dev/null 2>&1
}
pg_run() {  # DIR PORT
    pg_ctl_as -D "$1" -l "$1.log" -w -t 60 start -o \
        "-p $2 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$W/pg -c fsync=off -c wal_level=replica -c max_wal_senders=5 -c hot_standby=on" >/dev/null
}
# pg_freeze DIR STOP|CONT: signals the cluster's postmaster and every
# process it started.
pg_freeze() {
    local pm
    pm="$(head -1 "$1/postmaster.pid" 2>/dev/null)" || return 0
    [[ -n "$pm" ]] || return 0
    pkill "-$2" -P "$pm" 2>/dev/null
    kill "-$2" "$pm" 2>/dev/null
    return 0
}
sleeping_on() { [[ "$(PSQL "$1" -c "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'")" == 1 ]]; }
in_recovery() { PSQL "$1" -c 'SELECT pg_is_in_recovery()'; }
primary_port_via() {  # the port of the server a new connection through PORT reaches, if it is a primary
    [[ "$(PSQL "$1" -c "SELECT pg_is_in_recovery()::text || ' ' || current_setting('port')")" == "false $2" ]]
}

postgres_suite() {
    [[ -n "$PGBIN" ]] || { lib_skip "postgres failover" "no PostgreSQL binaries"; return; }
    mkdir -p "$W/pg" && chown "$SVC_USER" "$W/pg"
    local p1 p2 ok
    p1="$(lib_free_port)"; p2="$(lib_free_port)"
    as_svc "$PGBIN/initdb" -D "$W/pg/a" -U postgres -A trust --no-sync >"$W/pg-initdb.log" 2>&1 \
        || { lib_fail "postgres: initdb" "$(tail -3 "$W/pg-initdb.log")"; return; }
    lib_on_exit "pg_stop_dir $W/pg/a"
    lib_on_exit "pg_stop_dir $W/pg/b"
    pg_run "$W/pg/a" "$p1" || { lib_fail "postgres: start the primary" "$(tail -3 "$W/pg/a.log")"; return; }
    as_svc "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$p1" -U postgres -D "$W/pg/b" -R -X stream >"$W/pg-basebackup.log" 2>&1 \
        || { lib_fail "postgres: pg_basebackup -R" "$(tail -3 "$W/pg-basebackup.log")"; return; }
    pg_run "$W/pg/b" "$p2" || { lib_fail "postgres: start the replica" "$(tail -3 "$W/pg/b.log")"; return; }
    [[ "$(in_recovery "$p2")" == t ]] || { lib_fail "postgres: the replica is in recovery"; return; }

    spliced_with pg "
[[listener]]
name = \"pg-primary\"
listen = \"127.0.0.1:0\"
protocol = \"postgres\"
[listener.pool]
on-down = \"kill\"
servers = [\"127.0.0.1:$p1\", \"127.0.0.1:$p2\"]
[listener.pool.health]
check = \"postgres\"
role = \"primary\"
user = \"postgres\"
interval = \"${INTERVAL_MS}ms\"
timeout = \"250ms\"
fall = $FALL
rise = 1

[[listener]]
name = \"pg-any\"
listen = \"127.0.0.1:0\"
protocol = \"postgres\"
[listener.pool]
servers = [\"127.0.0.1:$p1\", \"127.0.0.1:$p2\"]
" || { lib_fail "postgres: start spliced"; return; }
    local via any
    via="$(lib_clean_log "$SPLICED_LOG" | grep -Eo 'listening on [0-9.]+:[0-9]+ listener=pg-primary' | grep -Eo ':[0-9]+ ' | tr -d ': ')"
    any="$(lib_clean_log "$SPLICED_LOG" | grep -Eo 'listening on [0-9.]+:[0-9]+ listener=pg-any' | grep -Eo ':[0-9]+ ' | tr -d ': ')"
    [[ -n "$via" && -n "$any" ]] || { lib_fail "postgres: listener ports" "$(lib_clean_log "$SPLICED_LOG" | grep listening)"; return; }

    # The replica fails the role check from its first probe: every new
    # connection reaches the primary.
    if all_reach primary_port_via "$via" "$p1"; then
        lib_pass "postgres: role = primary sends every connection to the primary"
    else
        lib_fail "postgres: role = primary sends every connection to the primary"
    fi

    # Cancel routing through a round-robin pool of both servers.
    # The figure is from SIGINT to psql's exit.
    local i t0 took fails=0 figures=""
    for i in 1 2 3 4; do
        t0="$(lib_now_ms)"
        "$PGBIN/psql" -X -h 127.0.0.1 -p "$any" -U postgres -d postgres -c 'SELECT pg_sleep(30)' >"$W/cancel-$i.out" 2>&1 &
        local pid=$!
        sleep 1
        t0="$(lib_now_ms)"
        kill -INT "$pid"
        wait_ms 10000 lib_pid_gone "$pid" >/dev/null
        took=$(($(lib_now_ms) - t0))
        figures+="${took}ms "
        wait "$pid"
        grep -q 'canceling statement due to user request' "$W/cancel-$i.out" && ((took < 5000)) || fails=$((fails + 1))
    done
    if ((fails == 0)); then lib_pass "postgres: pg_sleep(30) cancelled through a 2-server pool" "$figures"
    else lib_fail "postgres: pg_sleep(30) cancelled through a 2-server pool" "$fails of 4 not cancelled: $figures"; fi

    # pgbench through spliced, then the failover.
    "$PGBIN/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$via" -U postgres postgres >"$W/pgbench-init.log" 2>&1 \
        || { lib_fail "postgres: pgbench -i through spliced" "$(tail -3 "$W/pgbench-init.log")"; return; }
    # The primary hangs (every process of it stopped, as on a frozen
    # host): it closes nothing itself, so only spliced's on-down = kill can
    # end its clients' sessions. Then it is stopped and the replica
    # promoted.
    "$PGBIN/psql" -X -h 127.0.0.1 -p "$via" -U postgres -d postgres -c 'SELECT pg_sleep(60)' >"$W/old-client.out" 2>&1 &
    local old=$!
    wait_ms 5000 sleeping_on "$p1" >/dev/null || lib_fail "postgres: the old client's query runs" "$(cat "$W/old-client.out")"
    pg_freeze "$W/pg/a" STOP
    lib_on_exit "pg_freeze $W/pg/a CONT"
    if t 10 tail --pid="$old" -f /dev/null && ! wait "$old" \
        && grep -qiE 'reset|closed the connection unexpectedly' "$W/old-client.out" \
        && lib_wait_log "$SPLICED_LOG" "reason=server-down.*127.0.0.1:$p1|127.0.0.1:$p1.*reason=server-down" 3; then
        lib_pass "postgres: the hung primary's client was reset (on-down = kill)" "$(tr '\n' ' ' <"$W/old-client.out" | cut -c1-120)"
    else
        lib_fail "postgres: the hung primary's client was reset (on-down = kill)" "$(tr '\n' ' ' <"$W/old-client.out" | cut -c1-120)"
    fi
    pg_freeze "$W/pg/a" CONT
    pg_stop_dir "$W/pg/a"
    pg_ctl_as -D "$W/pg/b" -w -t 30 promote >/dev/null || { lib_fail "postgres: promote the replica"; return; }
    took="$(wait_ms "$BOUND_MS" primary_port_via "$via" "$p2")" && ok=1 || ok=0
    if ((ok)); then lib_pass "postgres: new connections reach the promoted replica" "${took} ms after promotion (bound ${BOUND_MS} ms)"
    else lib_fail "postgres: new connections reach the promoted replica" "not within ${BOUND_MS} ms"; fi
    if "$PGBIN/pgbench" -T 3 -c 2 -h 127.0.0.1 -p "$via" -U postgres postgres >"$W/pgbench-after.log" 2>&1 \
        && grep -q '^tps' "$W/pgbench-after.log"; then
        lib_pass "postgres: pgbench through spliced resumes on the new primary" "$(grep -m1 '^tps' "$W/pgbench-after.log")"
    else
        lib_fail "postgres: pgbench through spliced resumes on the new primary" "$(tail -3 "$W/pgbench-after.log")"
    fi
    if lib_clean_log "$SPLICED_LOG" | grep -q "WARN.*server marked down.*127.0.0.1:$p1\|WARN.*upstream=127.0.0.1:$p1.*server marked down"; then
        lib_pass "postgres: the down server is logged at warn with its reason"
    else
        lib_fail "postgres: the down server is logged at warn with its reason"
    fi
    lib_stop_pid "$SPLICED_PID" 5
}

# ---------------------------------------------------------------- redis
rcli() { local port="$1"; shift; timeout -k 2 10 redis-cli -h 127.0.0.1 -p "$port" "$@"; }
redis_port_via() { [[ "$(rcli "$1" INFO server | tr -d '\r' | sed -n 's/^tcp_port://p')" == "$2" ]]; }

redis_suite() {
    command -v redis-server >/dev/null || { lib_skip "redis failover" "no redis-server"; return; }
    local r1 r2 took ok
    r1="$(lib_free_port)"; r2="$(lib_free_port)"
    mkdir -p "$W/r1" "$W/r2"
    lib_bg redis-a redis-server --port "$r1" --bind 127.0.0.1 --save '' --dir "$W/r1"
    lib_bg redis-b redis-server --port "$r2" --bind 127.0.0.1 --save '' --dir "$W/r2" --replicaof 127.0.0.1 "$r1"
    lib_wait_port "$r1" 10 && lib_wait_port "$r2" 10 || { lib_fail "redis: start"; return; }
    spliced_with redis "
[[listener]]
name = \"redis-master\"
listen = \"127.0.0.1:0\"
[listener.pool]
on-down = \"kill\"
servers = [\"127.0.0.1:$r1\", \"127.0.0.1:$r2\"]
[listener.pool.health]
check = \"redis\"
role = \"primary\"
interval = \"${INTERVAL_MS}ms\"
timeout = \"250ms\"
fall = $FALL
rise = 1
" || { lib_fail "redis: start spliced"; return; }
    local via="$SPLICED_PORT"
    all_reach redis_port_via "$via" "$r1" && rcli "$via" SET k v >/dev/null \
        && lib_pass "redis: role = primary sends every connection to the master" \
        || lib_fail "redis: role = primary sends every connection to the master"
    # An old client, held open on a file descriptor.
    exec 7<>"/dev/tcp/127.0.0.1/$via"
    printf 'PING\r\n' >&7
    local line=""
    read -r -t 5 line <&7
    [[ "$line" == +PONG* ]] || lib_fail "redis: old client PING" "$line"
    rcli "$r2" REPLICAOF NO ONE >/dev/null && rcli "$r1" REPLICAOF 127.0.0.1 "$r2" >/dev/null
    took="$(wait_ms "$BOUND_MS" redis_port_via "$via" "$r2")" && ok=1 || ok=0
    if ((ok)); then lib_pass "redis: new connections reach the new master" "${took} ms after REPLICAOF (bound ${BOUND_MS} ms)"
    else lib_fail "redis: new connections reach the new master" "not within ${BOUND_MS} ms"; fi
    if ! read -r -t 3 line <&7 && lib_wait_log "$SPLICED_LOG" 'reason=server-down' 3; then
        lib_pass "redis: the old master's client was reset (on-down = kill)"
    else
        lib_fail "redis: the old master's client was reset (on-down = kill)"
    fi
    exec 7<&-
    rcli "$via" SET k2 v2 >/dev/null && [[ "$(rcli "$r1" GET k2)" == v2 ]] || true
    lib_stop_pid "$SPLICED_PID" 5
}

# ---------------------------------------------------------------- mariadb
mariadb_suite() {
    local server install port
    server="$(command -v mariadbd || command -v mysqld || true)"
    install="$(command -v mariadb-install-db || command -v mysql_install_db || true)"
    [[ -n "$server" && -n "$install" ]] || { lib_skip "mariadb check" "no MariaDB"; return; }
    mkdir -p "$W/my" && chown "$SVC_USER" "$W/my"
    as_svc "$install" --no-defaults --datadir="$W/my/data" --auth-root-authentication-method=normal --skip-test-db >"$W/my-install.log" 2>&1 \
        || { lib_fail "mariadb: install-db" "$(tail -3 "$W/my-install.log")"; return; }
    port="$(lib_free_port)"
    lib_bg mariadb runuser -u "$SVC_USER" -- "$server" --no-defaults --datadir="$W/my/data" --socket="$W/my/sock" \
        --pid-file="$W/my/pid" --bind-address=127.0.0.1 --port="$port" --skip-name-resolve --max-connect-errors=3
    lib_wait_port "$port" 30 || { lib_fail "mariadb: start"; return; }
    spliced_with my "
[[listener]]
name = \"mysql\"
listen = \"127.0.0.1:0\"
[listener.pool]
servers = [\"127.0.0.1:$port\"]
[listener.pool.health]
check = \"mysql\"
interval = \"${INTERVAL_MS}ms\"
timeout = \"250ms\"
fall = $FALL
" || { lib_fail "mariadb: start spliced"; return; }
    sleep 2  # a dozen probes: none may fail (max-connect-errors = 3)
    if ! lib_clean_log "$SPLICED_LOG" | grep -q 'marked down' \
        && t 10 mariadb -h 127.0.0.1 -P "$SPLICED_PORT" -u root -e 'SELECT 1' >/dev/null 2>&1; then
        lib_pass "mariadb: up behind a mysql check; queries pass through"
    else
        lib_fail "mariadb: up behind a mysql check; queries pass through" "$(lib_clean_log "$SPLICED_LOG" | grep -m1 'marked down')"
    fi
    local pid
    pid="$(cat "$W/my/pid" 2>/dev/null)"
    [[ -n "$pid" ]] && lib_stop_pid "$pid" 20
    if lib_wait_log "$SPLICED_LOG" 'WARN.*marked down' 5; then
        lib_pass "mariadb: a stopped server is marked down with its reason" "$(lib_clean_log "$SPLICED_LOG" | grep -m1 -o 'marked down.*' | cut -c1-100)"
    else
        lib_fail "mariadb: a stopped server is marked down with its reason"
    fi
    lib_stop_pid "$SPLICED_PID" 5
}

postgres_suite
redis_suite
mariadb_suite
echo "failover: $LIB_PASSED passed, $LIB_FAILED failed"
((LIB_FAILED == 0))
