#!/usr/bin/env bash
# Compares spliced with HAProxy (forced splice, splice-auto, no splice), nginx's
# stream module and socat on loopback, with the same `spliced bench` load, and
# writes the tables into docs/BENCHMARKS.md between the peers markers.
#
# Each peer runs as a single worker pinned to PROXY_CPU, like spliced's worker
# (--pin-proxy); the load generator runs pinned to LOAD_CPU. Everything runs as
# BENCH_USER (default: cloudsdk when run as root and that user exists), because
# root bypasses pipe-user-pages-soft (see docs/BENCHMARKS.md).
#
#   make bench-peers                      # or: bash scripts/bench-peers.sh
#   BENCH_USER=root make bench-peers      # measure as root instead
#   RUNS=3 OUT=/tmp/b.md bash scripts/bench-peers.sh
#
# Only loopback addresses are used. Needs root to install packages (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
# One log line per closed relay is spliced's default; the peers log nothing.
export RUST_LOG=${RUST_LOG:-warn}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

OUT=${OUT:-docs/BENCHMARKS.md}
RUNS=${RUNS:-5}
UP_PORT=${UP_PORT:-19000}
BASE_PORT=${BASE_PORT:-19100}
NCPU=$(nproc)
PROXY_CPU=${PROXY_CPU:-$((NCPU > 1 ? 1 : 0))}
LOAD_CPU=${LOAD_CPU:-0}
UPSTREAM=127.0.0.1:$UP_PORT

if [[ ! -x $SPLICED_BIN ]]; then
    lib_log "build first: cargo build --release ($SPLICED_BIN is missing)"
    exit 1
fi

# --- packages --------------------------------------------------------------
pkgs=()
command -v haproxy >/dev/null || pkgs+=(haproxy)
command -v socat >/dev/null || pkgs+=(socat)
command -v taskset >/dev/null || pkgs+=(util-linux)
if ! command -v nginx >/dev/null; then pkgs+=(nginx-light); fi
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || pkgs+=(libnginx-mod-stream)
if ((${#pkgs[@]})); then
    # No service is started by the packages (lib_apt_install): the peers run
    # from their own configs below.
    lib_apt_install "${pkgs[@]}" || {
        lib_log "missing ${pkgs[*]}; run as root so apt-get can install them"
        exit 1
    }
fi

# --- who runs it -----------------------------------------------------------
if [[ -z ${BENCH_USER:-} ]]; then
    if [[ $(id -u) == 0 ]] && id cloudsdk >/dev/null 2>&1; then BENCH_USER=cloudsdk; else BENCH_USER=$(id -un); fi
fi
as_user() {
    if [[ $(id -un) == "$BENCH_USER" ]]; then
        "$@"
    else
        setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups -- "$@"
    fi
}
# Enough fds for 10 000 idle relays (2 per relay in the load generator and in
# each proxy); raised before dropping privileges so BENCH_USER inherits it.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# Each idle relay costs 2 fds in the load generator and 2 in the proxy (HAProxy
# also reserves 2 per pipe of maxpipes). Even root may not raise the limit in a
# container, so the peers' idle run opens as many relays as all of them can hold,
# and spliced's own idle run asks for 10 000 (it opens as many as fit).
PEER_MAXPIPES=1000
MAXCONN=$(((NOFILE - 2 * PEER_MAXPIPES - 300) / 2))
IDLE_RELAYS=${IDLE_RELAYS:-$((MAXCONN - 50 < 10000 ? MAXCONN - 50 : 10000))}

# The work dir goes at exit, after the peers (tracked pids) are stopped.
lib_init peers
WORK=$LIB_TMP
chmod 755 "$WORK"
[[ $(id -un) == "$BENCH_USER" ]] || chown "$BENCH_USER" "$WORK"
cp "$SPLICED_BIN" "$WORK/spliced"
BIN=$WORK/spliced
PIDS=()

# --- peers -----------------------------------------------------------------
haproxy_cfg() { # name port splice-mode(forced|auto|none)
    local opt=""
    case $3 in
        forced) opt=$'    option splice-request\n    option splice-response' ;;
        auto) opt="    option splice-auto" ;;
        none) opt="" ;;
    esac
    cat >"$WORK/$1.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
    maxpipes $PEER_MAXPIPES
$([[ $3 == none ]] && echo "    nosplice")
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
$opt
frontend fe
    bind 127.0.0.1:$2
    default_backend be
backend be
    server up $UPSTREAM
EOF
}

# peer_up PID PORT: the peer runs and listens.
peer_up() { lib_pid_alive "$1" && lib_port_listening "$2"; }

start_peer() { # name port command...
    local name=$1 port=$2
    shift 2
    if lib_port_listening "$port"; then
        lib_log "port $port is already in use (a peer left over from an earlier run?); set BASE_PORT"
        exit 1
    fi
    # exec, so that $! is the peer's own pid (what --target-pid reads).
    (
        if [[ $(id -un) == "$BENCH_USER" ]]; then
            exec taskset -c "$PROXY_CPU" "$@"
        fi
        exec setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups -- \
            taskset -c "$PROXY_CPU" "$@"
    ) >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    lib_track_pid "$pid"
    if lib_wait_until 10 peer_up "$pid" "$port"; then
        TARGETS+=("--target" "$name=127.0.0.1:$port" "--target-pid" "$pid")
        NAMES+=("$name")
        return
    fi
    lib_log "$name did not start:"
    cat "$WORK/$name.log" >&2
    exit 1
}

TARGETS=()
NAMES=()
port=$BASE_PORT
for mode in forced auto none; do
    name=haproxy-$([[ $mode == forced ]] && echo splice || { [[ $mode == auto ]] && echo splice-auto || echo nosplice; })
    haproxy_cfg "$name" "$port" "$mode"
    start_peer "$name" "$port" haproxy -db -f "$WORK/$name.cfg"
    port=$((port + 1))
done

cat >"$WORK/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections $((NOFILE - 100)); }
stream {
    server {
        listen 127.0.0.1:$port;
        proxy_pass $UPSTREAM;
        proxy_timeout 1h;
    }
}
EOF
start_peer nginx "$port" nginx -e "$WORK/nginx-error.log" -p "$WORK" -c "$WORK/nginx.conf"
port=$((port + 1))

start_peer socat "$port" socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr,backlog=1024,nodelay" "TCP:$UPSTREAM,nodelay"
port=$((port + 1))

if lib_port_listening "$UP_PORT"; then
    lib_log "the upstream port $UP_PORT is already in use; set UP_PORT"
    exit 1
fi
lib_log "peers: ${NAMES[*]} (pinned to CPU $PROXY_CPU), running as $BENCH_USER"

# The peers' --target/--target-pid pairs without socat (fork per connection: 10 000
# idle relays would be 10 000 processes).
targets_without_socat() {
    local i
    for ((i = 0; i < ${#TARGETS[@]}; i += 4)); do
        [[ ${TARGETS[i + 1]} == socat=* ]] && continue
        printf '%s\n' "${TARGETS[@]:i:4}"
    done
}

bench() { # cpu-for-load args...
    local cpu=$1 rc=0
    shift
    as_user taskset -c "$cpu" "$BIN" bench --upstream "$UPSTREAM" --runs "${BENCH_RUNS:-$RUNS}" "$@" || rc=$?
    # A failed case is reported in its table; keep going with the others.
    ((rc == 0)) || lib_log "spliced bench exited $rc (see its errors section)"
}

repin() { # cpu
    for p in "${PIDS[@]}"; do
        for t in $(pgrep -P "$p") "$p"; do taskset -a -p -c "$1" "$t" >/dev/null 2>&1 || true; done
    done
}

# Idle first, while the peers are fresh: after the other workloads their
# memory pools are already grown and new relays would not show in their RSS.
lib_log "1/4 idle: spliced with up to 10000 relays, the peers with $IDLE_RELAYS"
bench "$LOAD_CPU" -w idle --idle-relays 10000 -e splice,copy --pin-proxy "$PROXY_CPU" >"$WORK/idle.txt"
mapfile -t IDLE_TARGETS < <(targets_without_socat)
# One run: a second one would find the peers' pools grown by the first.
BENCH_RUNS=1 bench "$LOAD_CPU" -w idle --idle-relays "$IDLE_RELAYS" -e splice,copy,target \
    --pin-proxy "$PROXY_CPU" "${IDLE_TARGETS[@]}" >"$WORK/idle-peers.txt"

lib_log "2/4 bulk, rr, connect: spliced (splice, copy), direct and every peer"
bench "$LOAD_CPU" -w bulk,rr,connect -e splice,copy,direct,target --pin-proxy "$PROXY_CPU" \
    "${TARGETS[@]}" --plot "$WORK/peers.svg" >"$WORK/main.txt"
mkdir -p target
cp "$WORK/peers.svg" target/bench-peers.svg 2>/dev/null || true

lib_log "3/4 rr 64 B with the load and every proxy on CPU $LOAD_CPU"
repin "$LOAD_CPU"
bench "$LOAD_CPU" -w rr --sizes 64 -e splice,copy,direct,target --pin-proxy "$LOAD_CPU" \
    "${TARGETS[@]}" >"$WORK/onecpu.txt"
repin "$PROXY_CPU"

lib_log "4/4 spliced's pipe size: 64k, 256k, 512k, 1m"
bench "$LOAD_CPU" -w bulk,rr --pipe-size 64k,256k,512k,1m -e splice,copy --pin-proxy "$PROXY_CPU" \
    >"$WORK/pipes.txt"

# --- write docs/BENCHMARKS.md ---------------------------------------------------
section() { # title file
    printf '### %s\n\n```text\n' "$1"
    sed -e 's/[[:space:]]*$//' "$2"
    printf '```\n\n'
}
{
    echo "<!-- peers:begin (written by scripts/bench-peers.sh; do not edit by hand) -->"
    echo
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($NCPU CPUs), kernel $(uname -r),"
    echo "as user \`$BENCH_USER\`, with \`$RUNS\` runs per figure. Peers: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3),"
    echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), socat $(socat -V 2>/dev/null | grep -m1 'socat version' | cut -d' ' -f3)."
    echo "Proxies (spliced's worker and each peer) pinned to CPU $PROXY_CPU, the load generator to CPU $LOAD_CPU,"
    echo "except in the one-CPU table where everything shares CPU $LOAD_CPU."
    echo
    section "Bulk, request/response and connection rate" "$WORK/main.txt"
    section "Idle relays, spliced (as many of 10 000 as the fd limit of $NOFILE allows)" "$WORK/idle.txt"
    section "Idle relays with the peers ($IDLE_RELAYS, what HAProxy's maxconn allows under that fd limit; one run on fresh processes; socat left out: one process per connection)" "$WORK/idle-peers.txt"
    section "rr 64 B, load and proxy on one CPU" "$WORK/onecpu.txt"
    section "spliced's pipe size" "$WORK/pipes.txt"
    echo "<!-- peers:end -->"
} >"$WORK/section.md"

if [[ -f $OUT ]] && grep -q '<!-- peers:begin' "$OUT"; then
    awk -v f="$WORK/section.md" '
        /<!-- peers:begin/ { while ((getline l < f) > 0) print l; skip = 1; next }
        /<!-- peers:end -->/ { skip = 0; next }
        !skip { print }' "$OUT" >"$WORK/out.md"
    cp "$WORK/out.md" "$OUT"
else
    { [[ -f $OUT ]] && cat "$OUT"; echo; cat "$WORK/section.md"; } >"$WORK/out.md"
    cp "$WORK/out.md" "$OUT"
fi
lib_log "wrote $OUT (plot: target/bench-peers.svg)"
cat "$WORK/main.txt"
