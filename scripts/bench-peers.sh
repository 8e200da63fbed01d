#!/usr/bin/env bash
# Compares spliced with HAProxy (forced splice, splice-auto, no splice), nginx's
# stream module and socat, with the same `spliced bench` load over the same
# network path, and writes the tables into docs/benchmarks/peers-PATH.md
# between the peers markers of that path.
#
# BENCH_PATH picks the path (`spliced bench --path`): loopback (default); veth,
# the upstream in a network namespace behind a veth pair of MTU BENCH_MTU
# (default 1500) with a NIC's offloads (GSO out, GRO in); veth2, the load
# generator behind a second pair too; veth-nooffload, the veth layout with one
# segment per skb and no GRO (a worst case). For the
# veth paths `spliced bench --hold` makes the namespaces once, every peer runs
# in the proxy's namespace (`ip netns exec`), each `spliced bench` run uses
# them (--netns), and they are removed at the end, also on Ctrl-C.
#
# Each peer runs as a single worker pinned to PROXY_CPU, like spliced's worker
# (--pin-proxy); the load generator runs pinned to LOAD_CPU. Everything runs as
# BENCH_USER (default: cloudsdk when run as root and that user exists), because
# root bypasses pipe-user-pages-soft (see docs/BENCHMARKS.md).
#
#   make bench-peers                      # or: bash scripts/bench-peers.sh
#   BENCH_USER=root make bench-peers      # measure as root instead
#   BENCH_PATH=veth make bench-peers      # over a 1500-byte veth path (root)
#   BENCH_PATH=veth2 BENCH_MTU=9000 make bench-peers
#   RUNS=3 OUT=/tmp/b.md bash scripts/bench-peers.sh
#   STAGES=main bash scripts/bench-peers.sh   # some of: idle,main,onecpu,pipes,syscalls,logline,routes,loops,iperf3,apps
#
# The stages iperf3 and apps (scripts/bench-apps.sh, loopback only) run last,
# after these peers are stopped: iperf3, redis-benchmark and pgbench through
# spliced (splice, copy, auto, each also on --loop uring) and a second set
# of peers started for them. The loops stage runs `spliced bench` on both of
# spliced's loops side by side (bulk, ping-pong, connections).
#
# On a veth path the peers still run as BENCH_USER, but `spliced bench` (the
# load and the in-process spliced) runs as root: it enters the namespaces,
# which takes CAP_SYS_ADMIN, and that capability also lifts the pipe limits.
#
# Only loopback addresses, or addresses inside the namespaces the bench makes,
# are used. Needs root to install packages (apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
# One log line per closed relay is spliced's default; the peers log nothing.
export RUST_LOG=${RUST_LOG:-warn}
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

RUNS=${RUNS:-5}
UP_PORT=${UP_PORT:-19000}
BENCH_PATH=${BENCH_PATH:-loopback}
OUT=${OUT:-docs/benchmarks/peers-$BENCH_PATH.md}
# The iperf3 and apps stages write beside it.
APPS_OUT=${APPS_OUT:-$(dirname "$OUT")/apps-$BENCH_PATH.md}
BENCH_MTU=${BENCH_MTU:-1500}
STAGES=${STAGES:-idle,main,onecpu,pipes,syscalls,logline,routes,loops,iperf3,apps}
BASE_PORT=${BASE_PORT:-19100}
NCPU=$(nproc)
PROXY_CPU=${PROXY_CPU:-$((NCPU > 1 ? 1 : 0))}
LOAD_CPU=${LOAD_CPU:-0}
case $BENCH_PATH in
    loopback | veth | veth2 | veth-nooffload) ;;
    *)
        echo "BENCH_PATH must be loopback, veth, veth2 or veth-nooffload, not '$BENCH_PATH'" >&2
        exit 2
        ;;
esac
if [[ $BENCH_PATH != loopback && $(id -u) != 0 ]]; then
    echo "BENCH_PATH=$BENCH_PATH needs root: the bench creates network namespaces" >&2
    exit 2
fi
stage() { [[ ,$STAGES, == *,$1,* ]]; }

if [[ ! -x $SPLICED_BIN ]]; then
    lib_log "build first: cargo build --release ($SPLICED_BIN is missing)"
    exit 1
fi
# The application stages start servers and peers of their own.
apps() {
    RUNS=$RUNS STAGES=$STAGES OUT=$APPS_OUT BENCH_PATH=$BENCH_PATH PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU \
        BENCH_USER=${BENCH_USER:-} bash scripts/bench-apps.sh
}
if ! stage idle && ! stage main && ! stage onecpu && ! stage pipes && ! stage syscalls && ! stage logline &&
    ! stage routes && ! stage loops; then
    apps
    exit
fi

# --- packages --------------------------------------------------------------
pkgs=()
command -v haproxy >/dev/null || pkgs+=(haproxy)
command -v socat >/dev/null || pkgs+=(socat)
! stage syscalls || command -v strace >/dev/null || pkgs+=(strace)
command -v taskset >/dev/null || pkgs+=(util-linux)
[[ $BENCH_PATH == loopback ]] || { command -v ip >/dev/null && command -v tc >/dev/null; } || pkgs+=(iproute2)
[[ $BENCH_PATH == loopback ]] || command -v ethtool >/dev/null || pkgs+=(ethtool)
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
lib_bench_user
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
lib_bench_init peers
PIDS=()

# --- the network path --------------------------------------------------------
# Loopback: everything in this namespace. veth/veth2: the proxies (the peers
# and the in-process spliced) in the namespace PX_NS, reached on LISTEN_IP.
LISTEN_IP=127.0.0.1
UP_IP=127.0.0.1
NETNS=
NS_EXEC=()
PATH_ARGS=()
PATH_NOTE="loopback"
if [[ $BENCH_PATH != loopback ]]; then
    mkfifo "$WORK/hold.in"
    # The holder removes the namespaces when its stdin closes (this shell
    # exits, however it ends) or on SIGTERM (the cleanup's tracked pids).
    "$BIN" bench --path "$BENCH_PATH" --mtu "$BENCH_MTU" --hold <"$WORK/hold.in" \
        >"$WORK/hold.out" 2>"$WORK/hold.log" &
    lib_track_pid $!
    # Held open until this shell exits: the holder's stdin.
    exec {HOLD_FD}>"$WORK/hold.in"
    hold_ready() { [[ -s $WORK/hold.out ]]; }
    if ! lib_wait_until 20 hold_ready; then
        lib_log "the $BENCH_PATH path was not set up:"
        cat "$WORK/hold.log" >&2
        exit 1
    fi
    hold_value() { tr ' ' '\n' <"$WORK/hold.out" | sed -n "s/^$1=//p"; }
    NETNS=$(hold_value netns)
    LISTEN_IP=$(hold_value listen)
    UP_IP=$(hold_value upstream)
    NS_EXEC=(ip netns exec "$(hold_value proxy_netns)")
    PATH_ARGS=(--path "$BENCH_PATH" --netns "$NETNS")
    PATH_NOTE="$BENCH_PATH, MTU $(hold_value mtu)"
    lib_log "path $PATH_NOTE: namespaces $NETNS-*, proxies listen on $LISTEN_IP, upstream $UP_IP"
fi
UPSTREAM=$UP_IP:$UP_PORT
# A port listening in the proxies' namespace.
port_listening() { [[ -n "$("${NS_EXEC[@]}" ss -Htln "( sport = :$1 )" 2>/dev/null)" ]]; }

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
    bind $LISTEN_IP:$2
    default_backend be
backend be
    server up $UPSTREAM
EOF
}

# HAProxy with two frontends: `fe` forwards at once, as haproxy_cfg's do;
# `fe-routed` waits for the TLS ClientHello and routes by its server name as
# `spliced bench`'s routed listener does (connect-routed): a.db.example,
# exactly one label before .olap.db.example, b.db.example, else the default;
# every backend holds the one upstream. HAProxy's default splice setting
# (none asked for), one thread.
haproxy_routes_cfg() { # name port routed-port
    cat >"$WORK/$1.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind $LISTEN_IP:$2
    default_backend be-default
frontend fe-routed
    bind $LISTEN_IP:$3
    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend be-a if { req.ssl_sni -i a.db.example }
    use_backend be-olap if { req.ssl_sni -m reg -i ^[^.]+\\.olap\\.db\\.example\$ }
    use_backend be-b if { req.ssl_sni -i b.db.example }
    default_backend be-default
backend be-a
    server up $UPSTREAM
backend be-olap
    server up $UPSTREAM
backend be-b
    server up $UPSTREAM
backend be-default
    server up $UPSTREAM
EOF
}

# peer_up PID PORT: the peer runs and listens.
peer_up() { lib_pid_alive "$1" && port_listening "$2"; }

start_peer() { # name port command...
    local name=$1 port=$2
    shift 2
    if port_listening "$port"; then
        lib_log "port $port is already in use (a peer left over from an earlier run?); set BASE_PORT"
        exit 1
    fi
    # exec (ip netns exec too), so that $! is the peer's own pid (what
    # --target-pid reads).
    (
        # A peer must not keep the holder's stdin open after this shell is gone.
        [[ -z ${HOLD_FD:-} ]] || exec {HOLD_FD}>&-
        if [[ $(id -un) == "$BENCH_USER" ]]; then
            exec "${NS_EXEC[@]}" taskset -c "$PROXY_CPU" "$@"
        fi
        exec "${NS_EXEC[@]}" setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups -- \
            taskset -c "$PROXY_CPU" "$@"
    ) >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    lib_track_pid "$pid"
    if lib_wait_until 10 peer_up "$pid" "$port"; then
        TARGETS+=("--target" "$name=$LISTEN_IP:$port" "--target-pid" "$pid")
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
    case $mode in
        forced) name=haproxy-splice ;;
        auto) name=haproxy-splice-auto ;;
        *) name=haproxy-nosplice ;;
    esac
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
        listen $LISTEN_IP:$port;
        proxy_pass $UPSTREAM;
        proxy_timeout 1h;
    }
}
EOF
start_peer nginx "$port" nginx -e "$WORK/nginx-error.log" -p "$WORK" -c "$WORK/nginx.conf"
port=$((port + 1))

# The routing peer is started with the others but measured only in the
# routes stage, so it is kept out of TARGETS.
ROUTES_PORT=$port
haproxy_routes_cfg haproxy-routes "$ROUTES_PORT" "$((ROUTES_PORT + 1))"
start_peer haproxy-routes "$ROUTES_PORT" haproxy -db -f "$WORK/haproxy-routes.cfg"
ROUTES_TARGET=("${TARGETS[@]: -4}" --target-routed "$LISTEN_IP:$((ROUTES_PORT + 1))")
TARGETS=("${TARGETS[@]:0:${#TARGETS[@]}-4}")
unset 'NAMES[-1]'
port=$((ROUTES_PORT + 2))

start_peer socat "$port" socat "TCP-LISTEN:$port,bind=$LISTEN_IP,fork,reuseaddr,backlog=1024,nodelay" "TCP:$UPSTREAM,nodelay"
port=$((port + 1))

# On a veth path the upstream has a namespace of its own, where the port is free.
if [[ $BENCH_PATH == loopback ]] && lib_port_listening "$UP_PORT"; then
    lib_log "the upstream port $UP_PORT is already in use; set UP_PORT"
    exit 1
fi
lib_log "peers: ${NAMES[*]} (pinned to CPU $PROXY_CPU), running as $BENCH_USER, path $PATH_NOTE"

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
    local cpu=$1 rc=0 run=lib_as_user
    shift
    # Entering the namespaces takes root (see the top).
    [[ $BENCH_PATH == loopback ]] || run=
    $run taskset -c "$cpu" "$BIN" bench "${PATH_ARGS[@]}" --upstream "$UPSTREAM" \
        --runs "${BENCH_RUNS:-$RUNS}" "$@" || rc=$?
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
SUFFIX=$([[ $BENCH_PATH == loopback ]] || echo "-$BENCH_PATH")
PLOT=target/bench-peers$SUFFIX.svg
if stage idle; then
    lib_log "idle: spliced with up to 10000 relays, the peers with $IDLE_RELAYS"
    bench "$LOAD_CPU" -w idle --idle-relays 10000 -e splice,copy --pin-proxy "$PROXY_CPU" >"$WORK/idle.txt"
    mapfile -t IDLE_TARGETS < <(targets_without_socat)
    # One run: a second one would find the peers' pools grown by the first.
    BENCH_RUNS=1 bench "$LOAD_CPU" -w idle --idle-relays "$IDLE_RELAYS" -e splice,copy,target \
        --pin-proxy "$PROXY_CPU" "${IDLE_TARGETS[@]}" >"$WORK/idle-peers.txt"
fi

if stage main; then
    lib_log "main: bulk, rr, connect: spliced (splice, copy), direct and every peer"
    bench "$LOAD_CPU" -w bulk,rr,connect -e splice,copy,direct,target --pin-proxy "$PROXY_CPU" \
        "${TARGETS[@]}" --plot "$WORK/peers.svg" >"$WORK/main.txt"
    mkdir -p target
    cp "$WORK/peers.svg" "$PLOT" 2>/dev/null || true
fi

if stage onecpu; then
    lib_log "onecpu: rr 64 B with the load and every proxy on CPU $LOAD_CPU"
    repin "$LOAD_CPU"
    bench "$LOAD_CPU" -w rr --sizes 64 -e splice,copy,direct,target --pin-proxy "$LOAD_CPU" \
        "${TARGETS[@]}" >"$WORK/onecpu.txt"
    repin "$PROXY_CPU"
fi

if stage pipes; then
    lib_log "pipes: spliced's pipe size: 64k, 256k, 512k, 1m"
    bench "$LOAD_CPU" -w bulk,rr --pipe-size 64k,256k,512k,1m -e splice,copy --pin-proxy "$PROXY_CPU" \
        >"$WORK/pipes.txt"
fi

if stage syscalls; then
    # strace attaches to every proxy's threads (same user: no extra rights),
    # in an untimed pass after short timed runs. socat is left out: it forks
    # a process per connection, which a strace of its pid does not see.
    lib_log "syscalls: per relayed 64 B message and per connection, spliced and every peer but socat"
    mapfile -t SYSCALL_TARGETS < <(targets_without_socat)
    BENCH_RUNS=1 bench "$LOAD_CPU" -w rr,connect --sizes 64 --quick --syscalls -e splice,copy,auto,target \
        --pin-proxy "$PROXY_CPU" "${SYSCALL_TARGETS[@]}" >"$WORK/syscalls.txt"
fi

if stage logline; then
    # The one line per closed relay, on (spliced run's default level, info)
    # and off (warn), written to a file as a journal or log collector would
    # take it; the proxy's CPU includes its log writer thread. The peers,
    # which log nothing per connection, run beside it in both passes.
    lib_log "logline: connections through spliced with the close line on and off, and every peer"
    for level in info warn; do
        RUST_LOG=$level bench "$LOAD_CPU" -w connect -e splice,copy,target --pin-proxy "$PROXY_CPU" \
            "${TARGETS[@]}" >"$WORK/logline-$level.txt" 2>"$WORK/logline-$level.log"
    done
    {
        echo "close line on (RUST_LOG=info, $(wc -l <"$WORK/logline-info.log") lines logged):"
        cat "$WORK/logline-info.txt"
        echo
        echo "close line off (RUST_LOG=warn):"
        cat "$WORK/logline-warn.txt"
    } >"$WORK/logline.txt"
fi

if stage routes; then
    # The same ClientHello and 64 B through a listener without routes and one
    # that routes by server name: spliced (its second listener) and HAProxy
    # (fe and fe-routed of one process).
    lib_log "routes: connect-routed, spliced (splice, copy), direct and haproxy-routes"
    bench "$LOAD_CPU" -w connect-routed -e splice,copy,direct,target --pin-proxy "$PROXY_CPU" \
        "${ROUTES_TARGET[@]}" >"$WORK/routes.txt"
fi

if stage loops; then
    # The same engines on the epoll loop and on the uring loop, one after
    # the other in each run.
    lib_log "loops: bulk, rr 64 B, connect: spliced's engines on the epoll and the uring loop"
    bench "$LOAD_CPU" -w bulk,rr,connect --sizes 64 -e copy,uring-copy,auto,uring-auto,splice,uring-splice \
        --pin-proxy "$PROXY_CPU" >"$WORK/loops.txt"
fi

# --- write docs/benchmarks/peers-PATH.md ----------------------------------------
section() { # title file
    [[ -f $2 ]] || return 0
    printf '### %s\n\n```text\n' "$1"
    sed -e 's/[[:space:]]*$//' "$2"
    printf '```\n\n'
}
MARK=peers$SUFFIX
if [[ $BENCH_PATH == loopback ]]; then
    WHO="as user \`$BENCH_USER\`"
else
    WHO="peers as user \`$BENCH_USER\`, \`spliced bench\` as root (it enters the namespaces)"
fi
{
    echo "<!-- $MARK:begin (written by scripts/bench-peers.sh; do not edit by hand) -->"
    echo
    echo "Path: $PATH_NOTE (\`BENCH_PATH=$BENCH_PATH\`, stages \`$STAGES\`)."
    echo "Measured $(date -u '+%Y-%m-%d %H:%M UTC') on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//') ($NCPU CPUs), kernel $(uname -r),"
    echo "$WHO, with \`$RUNS\` runs per figure. Peers: $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3),"
    echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), socat $(socat -V 2>/dev/null | grep -m1 'socat version' | cut -d' ' -f3)."
    echo "Proxies (spliced's worker and each peer) pinned to CPU $PROXY_CPU, the load generator to CPU $LOAD_CPU,"
    echo "except in the one-CPU table where everything shares CPU $LOAD_CPU."
    echo
    section "Bulk, request/response and connection rate" "$WORK/main.txt"
    section "Idle relays, spliced (as many of 10 000 as the fd limit of $NOFILE allows)" "$WORK/idle.txt"
    section "Idle relays with the peers (up to $IDLE_RELAYS, what HAProxy's maxconn allows under that fd limit, and no more than spliced's relay cap under it, the count in the table; one run on fresh processes; socat left out: one process per connection)" "$WORK/idle-peers.txt"
    section "rr 64 B, load and proxy on one CPU" "$WORK/onecpu.txt"
    section "spliced's pipe size" "$WORK/pipes.txt"
    section "Syscalls per relayed message and per connection (strace -c on each proxy but socat; one short run)" "$WORK/syscalls.txt"
    section "Connections with the close line on and off (spliced's CPU includes its log writer thread)" "$WORK/logline.txt"
    section "What routing by server name costs per connection (connect-routed; haproxy-routes: tcp-request inspect-delay and req.ssl_sni)" "$WORK/routes.txt"
    section "spliced's two loops: epoll (copy, auto, splice) and uring (uring-copy, uring-auto, uring-splice)" "$WORK/loops.txt"
    echo "<!-- $MARK:end -->"
} >"$WORK/section.md"

lib_replace_section "$OUT" "$MARK" "$WORK/section.md"
lib_log "wrote $OUT (plot: $PLOT)"
[[ ! -f $WORK/main.txt ]] || cat "$WORK/main.txt"

if stage iperf3 || stage apps; then
    # Stopped first: their pooled pipes count against BENCH_USER's pipe pages.
    for p in "${PIDS[@]}"; do lib_stop_pid "$p" 10 || true; done
    apps
fi
