# shellcheck shell=bash
# scripts/e2e-prom.sh: the metrics case of scripts/e2e.sh (sourced by it).
#
# A real Prometheus server (the Debian package, on 127.0.0.1 under the run's
# temp dir) scrapes spliced's --admin endpoint every second while pgbench
# runs through it. Afterwards the byte counters are read back through
# Prometheus's HTTP API and must equal what the clients moved: the sum of
# bytes_c2u / bytes_u2c over the per-relay close lines (each relay's own
# count of what it delivered, kept apart from the counter blocks). The same
# totals must show in `spliced stats`, read from the stats file.

# prom_query PORT EXPR: the value of an instant query (empty if none).
prom_query() {
    curl -fsS --max-time 5 "http://127.0.0.1:$1/api/v1/query" --data-urlencode "query=$2" |
        jq -r '.data.result[0].value[1] // empty'
}

# prom_equals PORT EXPR WANT: the query answers exactly WANT.
prom_equals() { [[ "$(prom_query "$1" "$2")" == "$3" ]]; }

# close_sum LOG FIELD: the sum of FIELD over the log's close lines.
close_sum() {
    lib_clean_log "$1" | grep 'relay closed' | grep -oE "$2=[0-9]+" |
        awk -F= '{ s += $2 } END { printf "%d\n", s }'
}

prom_scrape() {
    local mode="$1" d="$W/prom-$mode" aport pport port spid slog ppid c2u u2c closes got
    mkdir -p "$d/data" "$d/run"
    aport="$(lib_free_port)" && pport="$(lib_free_port)" || return 1
    SPLICED_ENV="RUNTIME_DIRECTORY=$d/run" spliced_start "prom-$mode" --listen 127.0.0.1:0 --mode "$mode" \
        --upstream "127.0.0.1:$PG_PORT" --admin "127.0.0.1:$aport" --name "e2e-$mode" || return 1
    spid=$SPLICED_PID slog=$SPLICED_LOG port=$SPLICED_PORT
    cat >"$d/prometheus.yml" <<YML
global: { scrape_interval: 1s, evaluation_interval: 1s }
scrape_configs:
  - job_name: spliced
    static_configs: [ { targets: ["127.0.0.1:$aport"] } ]
YML
    lib_bg "prometheus-$mode" prometheus --config.file="$d/prometheus.yml" --storage.tsdb.path="$d/data" \
        --web.listen-address="127.0.0.1:$pport" --log.level=warn
    ppid=$LIB_BG_PID
    lib_wait_port "$pport" 30 || { cat "$LIB_TMP/prometheus-$mode.err"; fail "prometheus did not listen"; }
    lib_wait_until 30 prom_equals "$pport" 'up{job="spliced"}' 1 ||
        fail "prometheus never scraped spliced (up != 1)"
    echo "prometheus $(prometheus --version 2>&1 | awk 'NR == 1 { print $3 }') on 127.0.0.1:$pport scraping 127.0.0.1:$aport"

    pgbench_run "prom_${mode}" "$port" -n -S -c 4 -j 2 -T "$PGBENCH_SECS" | grep '^tps'
    lib_wait_until 10 lib_closes_at_least "$slog" 4 || fail "pgbench's 4 relays did not close"
    closes="$(lib_closes "$slog")"
    c2u="$(close_sum "$slog" bytes_c2u)" u2c="$(close_sum "$slog" bytes_u2c)"
    echo "clients moved (close lines): $closes relays, client->upstream $c2u B, upstream->client $u2c B"
    ((c2u > 0 && u2c > 0)) || fail "no bytes in the close lines"

    # Wait for a scrape taken after the last close, then compare.
    lib_wait_until 15 prom_equals "$pport" "sum(spliced_connections_closed_total)" "$closes" ||
        fail "prometheus shows $(prom_query "$pport" 'sum(spliced_connections_closed_total)') closes, want $closes"
    got="$(prom_query "$pport" 'sum(spliced_bytes_total{direction="client_to_upstream"})')"
    echo "prometheus: client_to_upstream $got B"
    [[ "$got" == "$c2u" ]] || fail "client_to_upstream: prometheus $got, clients $c2u"
    got="$(prom_query "$pport" 'sum(spliced_bytes_total{direction="upstream_to_client"})')"
    echo "prometheus: upstream_to_client $got B"
    [[ "$got" == "$u2c" ]] || fail "upstream_to_client: prometheus $got, clients $u2c"
    local engine=copy
    [[ "$mode" == splice ]] && engine=splice
    got="$(prom_query "$pport" "sum(spliced_bytes_total{engine=\"$engine\"})")"
    [[ "$got" == $((c2u + u2c)) ]] || fail "engine=$engine carries $got B of $((c2u + u2c))"
    got="$(prom_query "$pport" 'sum(spliced_connections_accepted_total)')"
    [[ "$got" == "$closes" ]] || fail "accepted: prometheus $got, want $closes"
    got="$(prom_query "$pport" 'sum(spliced_upstream_connect_duration_seconds_count)')"
    [[ "$got" == "$closes" ]] || fail "connect latency count $got, want $closes"

    # The same instance through its stats file, no network.
    RUNTIME_DIRECTORY="$d/run" "$SPLICED_BIN" stats --name "e2e-$mode" | tee "$d/stats.txt"
    # A listener from flags is named by its --listen text.
    grep -Eq "^127\.0\.0\.1:0 +0 +$closes " "$d/stats.txt" || fail "spliced stats does not show $closes accepted"

    lib_stop_pid "$ppid" 20 || fail "prometheus did not stop"
    stop_spliced "$spid" "$slog"
}

prom_case() {
    local mode="$1" name="[$1] prometheus scrapes spliced during pgbench; bytes = clients' bytes"
    if lib_standin; then
        lib_skip "$name" "stand-in has no metrics"
    elif ! command -v prometheus >/dev/null || ! command -v curl >/dev/null || ! command -v jq >/dev/null; then
        lib_skip "$name" "prometheus, curl or jq not installed (scripts/install-deps.sh could not install them)"
    else
        check "$name" prom_scrape "$mode"
    fi
}
