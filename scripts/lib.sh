# shellcheck shell=bash
# scripts/lib.sh: shared helpers for spliced's shell test suites (e2e, faults,
# scale, soak...). Source it from a bash script that runs with
# `set -euo pipefail`:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#     lib_init                      # work dir + EXIT/INT/TERM cleanup trap
#
# Everything here only ever touches 127.0.0.1 and only ends processes it was
# given by pid (lib_track_pid / spliced_start); it never kills by name.
#
# Environment knobs:
#   SPLICED_BIN      binary to test (default: <repo>/target/release/spliced)
#   SPLICED_STANDIN  set to "socat" to run a socat relay instead of spliced
#                    (only for developing scripts before the engine exists;
#                    log-based checks should consult lib_standin and skip)
#   KEEP_TMP=1       keep the work dir ($LIB_TMP) after the run
#   LIB_LOG_DIR      where lib_save_logs copies *.log files
#                    (default: <repo>/target/<suite>-logs)
#
# Functions (all return non-zero rather than exit, so they are usable inside
# `if`; they never rely on errexit internally):
#   lib_log MSG...            timestamped line on stderr
#   lib_die MSG...            log and exit 1
#   lib_init [SUITE]          create $LIB_TMP (mktemp -d), install the cleanup trap
#   lib_on_exit CMD           register a shell command for cleanup (run LIFO)
#   lib_track_pid PID         kill PID at cleanup (TERM, then KILL after 5s);
#                             works from subshells too (pid registry file)
#   lib_kill_pid PID [SECS]   TERM, wait up to SECS (default 5), then KILL
#   lib_now                   seconds since epoch with µs (float string)
#   lib_elapsed T0            seconds since T0 (float string, 3 decimals)
#   lib_wait_until SECS CMD.. poll CMD every 0.1s until it succeeds or SECS pass
#   lib_port_in_use PORT      true if any local TCP socket uses PORT
#   lib_free_port             print a currently unused port in 20000-32767
#   lib_wait_port PORT SECS   wait until something LISTENs on 127.0.0.1:PORT
#                             (checks with ss: never opens a connection)
#   lib_pid_alive PID         true if PID exists and is not a zombie
#   lib_clean_log FILE        print FILE with ANSI colour escapes removed
#   lib_wait_log FILE ERE SECS  wait until FILE (cleaned) matches ERE
#   lib_count_log FILE ERE    number of lines of FILE (cleaned) matching ERE
#   lib_standin               true when SPLICED_STANDIN is set
#   spliced_start NAME MODE [spliced-run-args...]
#       start `spliced run --listen 127.0.0.1:0 --mode MODE ARGS...`, stderr to
#       $LIB_TMP/spliced-NAME.log; wait (10s) for the `listening on
#       127.0.0.1:PORT` line; sets SPLICED_PID, SPLICED_PORT, SPLICED_LOG.
#       Must be called from the shell that will later spliced_stop it (so
#       that `wait` can collect its exit status).
#   spliced_stop PID [SECS]   SIGTERM, wait up to SECS (default 15) for exit;
#                             returns spliced's exit status, or 124 (and
#                             SIGKILLs it) if it did not exit in time
#   spliced_relays_closed LOG [REASON]  count `relay closed` lines (of REASON)
#   lib_save_logs             copy $LIB_TMP/*.log to $LIB_LOG_DIR

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LIB_DIR/.." && pwd)"
SPLICED_BIN="${SPLICED_BIN:-$REPO_ROOT/target/release/spliced}"
# tracing-subscriber honours NO_COLOR; lib_clean_log strips escapes anyway.
export NO_COLOR=1
export RUST_LOG="${RUST_LOG:-info}"

LIB_TMP="${LIB_TMP:-}"
LIB_SUITE="${LIB_SUITE:-tests}"
declare -a LIB_EXIT_CMDS=()

lib_log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
lib_die() { lib_log "FATAL: $*"; exit 1; }

lib_now() { printf '%s\n' "$EPOCHREALTIME"; }
lib_elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f\n", b - a }'; }

lib_init() {
    LIB_SUITE="${1:-$LIB_SUITE}"
    if [[ -z "$LIB_TMP" ]]; then
        LIB_TMP="$(mktemp -d "${TMPDIR:-/tmp}/spliced-${LIB_SUITE}.XXXXXX")" || lib_die "mktemp failed"
    fi
    # Other users (e.g. the postgres server user) may need to traverse it.
    chmod 711 "$LIB_TMP"
    : >"$LIB_TMP/.pids"
    export LIB_TMP
    LIB_LOG_DIR="${LIB_LOG_DIR:-$REPO_ROOT/target/${LIB_SUITE}-logs}"
    trap lib__cleanup EXIT
    trap 'lib_log "interrupted"; exit 130' INT
    trap 'lib_log "terminated"; exit 143' TERM
}

lib_on_exit() { LIB_EXIT_CMDS+=("$1"); }

# pid registry: "PID STARTTIME" so that a recycled pid is never killed.
lib__starttime() { awk '{ print $22 }' "/proc/$1/stat" 2>/dev/null; }

lib_track_pid() {
    local st
    st="$(lib__starttime "$1")" || st=""
    [[ -n "$st" ]] || return 0
    echo "$1 $st" >>"$LIB_TMP/.pids"
}

lib_pid_alive() {
    local state
    state="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != "Z" && "$state" != "X" ]]
}

lib_kill_pid() {
    local pid="$1" secs="${2:-5}"
    lib_pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! lib_wait_until "$secs" lib__not_alive "$pid"; then
        lib_log "pid $pid ignored SIGTERM for ${secs}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        lib_wait_until 5 lib__not_alive "$pid" || true
    fi
}
lib__not_alive() { ! lib_pid_alive "$1"; }

lib__cleanup() {
    local rc=$? i pid st
    trap - EXIT INT TERM
    set +e
    for ((i = ${#LIB_EXIT_CMDS[@]} - 1; i >= 0; i--)); do
        eval "${LIB_EXIT_CMDS[$i]}" || lib_log "cleanup step failed: ${LIB_EXIT_CMDS[$i]}"
    done
    if [[ -n "$LIB_TMP" && -f "$LIB_TMP/.pids" ]]; then
        while read -r pid st; do
            [[ -n "$pid" ]] || continue
            [[ "$(lib__starttime "$pid")" == "$st" ]] || continue
            lib_kill_pid "$pid" 5
        done < <(tac "$LIB_TMP/.pids")
    fi
    if [[ -n "$LIB_TMP" && -d "$LIB_TMP" ]]; then
        lib_save_logs
        if [[ "${KEEP_TMP:-0}" == 1 ]]; then
            lib_log "work dir kept: $LIB_TMP"
        else
            rm -rf "$LIB_TMP"
        fi
    fi
    exit "$rc"
}

lib_save_logs() {
    [[ -n "${LIB_LOG_DIR:-}" && -n "$LIB_TMP" ]] || return 0
    mkdir -p "$LIB_LOG_DIR" 2>/dev/null || return 0
    rm -f "$LIB_LOG_DIR"/*.log 2>/dev/null
    find "$LIB_TMP" -maxdepth 3 -name '*.log' -type f -size -50M \
        -exec cp -t "$LIB_LOG_DIR" {} + 2>/dev/null
    return 0
}

lib_wait_until() {
    local secs="$1" deadline
    shift
    deadline=$(($(lib__ms) + $(awk -v s="$secs" 'BEGIN { printf "%d\n", s * 1000 }')))
    while :; do
        "$@" && return 0
        (($(lib__ms) < deadline)) || return 1
        sleep 0.1
    done
}
lib__ms() { local t="${EPOCHREALTIME/./}"; echo $((t / 1000)); }

lib_port_in_use() {
    [[ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]]
}

lib_free_port() {
    local i p
    for ((i = 0; i < 500; i++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 12768))
        lib_port_in_use "$p" || { echo "$p"; return 0; }
    done
    lib_log "no free port found"
    return 1
}

lib__listening() { [[ -n "$(ss -Htln "( sport = :$1 )" 2>/dev/null)" ]]; }
lib_wait_port() { lib_wait_until "${2:-10}" lib__listening "$1"; }

lib_clean_log() { sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g' "$1" 2>/dev/null; }
lib_count_log() { lib_clean_log "$1" | grep -Ec -- "$2" || true; }
lib__log_matches() { lib_clean_log "$1" | grep -Eq -- "$2"; }
lib_wait_log() { lib_wait_until "${3:-10}" lib__log_matches "$1" "$2"; }

lib_standin() { [[ -n "${SPLICED_STANDIN:-}" ]]; }

SPLICED_PID=""
SPLICED_PORT=""
SPLICED_LOG=""

spliced_start() {
    local name="$1" mode="$2"
    shift 2
    [[ -n "$LIB_TMP" ]] || { lib_log "spliced_start: call lib_init first"; return 1; }
    SPLICED_LOG="$LIB_TMP/spliced-$name.log"
    SPLICED_PID=""
    SPLICED_PORT=""
    if lib_standin; then
        spliced__start_standin "$mode" "$@" || return 1
    else
        [[ -x "$SPLICED_BIN" ]] || { lib_log "spliced binary not found: $SPLICED_BIN"; return 1; }
        "$SPLICED_BIN" run --listen 127.0.0.1:0 --mode "$mode" "$@" </dev/null 2>"$SPLICED_LOG" >&2 &
        SPLICED_PID=$!
    fi
    lib_track_pid "$SPLICED_PID"
    if ! lib_wait_log "$SPLICED_LOG" 'listening on 127\.0\.0\.1:[0-9]+' 10; then
        lib_log "spliced[$name] did not log 'listening on 127.0.0.1:PORT' within 10s; log:"
        lib_clean_log "$SPLICED_LOG" | tail -n 20 >&2
        lib_kill_pid "$SPLICED_PID" 2
        return 1
    fi
    SPLICED_PORT="$(lib_clean_log "$SPLICED_LOG" | grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' | head -n1 | sed 's/.*://')"
    if [[ -z "$SPLICED_PORT" || "$SPLICED_PORT" == 0 ]] || ! lib_wait_port "$SPLICED_PORT" 5; then
        lib_log "spliced[$name]: bad or unbound port '$SPLICED_PORT'"
        lib_kill_pid "$SPLICED_PID" 2
        return 1
    fi
    lib_log "spliced[$name] mode=$mode pid=$SPLICED_PID listening on 127.0.0.1:$SPLICED_PORT $*"
    return 0
}

# socat stand-in: same interface, logs a `listening on` line; exits 0 on TERM.
spliced__start_standin() {
    local mode="$1" up="" idle="" a
    shift
    while (($#)); do
        a="$1"
        shift
        case "$a" in
            --upstream) [[ -n "$up" ]] || up="$1"; shift ;;
            --idle-timeout) idle="$1"; shift ;;
            --*) (($#)) && [[ "$1" != --* ]] && shift ;;
        esac
    done
    local port tflag=()
    port="$(lib_free_port)" || return 1
    if [[ -n "$idle" ]]; then
        case "$idle" in
            *ms) tflag=(-T "$(awk -v v="${idle%ms}" 'BEGIN { print v / 1000 }')") ;;
            *s) tflag=(-T "${idle%s}") ;;
            *m) tflag=(-T "$((${idle%m} * 60))") ;;
        esac
    fi
    (
        trap 'kill -TERM "$sp" 2>/dev/null; wait "$sp" || true; echo "standin shutdown" >&2; exit 0' TERM
        socat "${tflag[@]}" "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "TCP:$up" &
        sp=$!
        lib_wait_port "$port" 5 && echo "standin(socat) mode=$mode listening on 127.0.0.1:$port" >&2
        wait "$sp"
    ) </dev/null 2>"$SPLICED_LOG" >&2 &
    SPLICED_PID=$!
}

spliced_stop() {
    local pid="$1" secs="${2:-15}" rc=0
    [[ -n "$pid" ]] || return 1
    if ! lib_pid_alive "$pid"; then
        wait "$pid" 2>/dev/null || rc=$?
        lib_log "spliced pid $pid had already exited (status $rc)"
        return "$rc"
    fi
    kill -TERM "$pid" 2>/dev/null || true
    if ! lib_wait_until "$secs" lib__not_alive "$pid"; then
        lib_log "spliced pid $pid still running ${secs}s after SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 124
    fi
    wait "$pid" 2>/dev/null || rc=$?
    return "$rc"
}

spliced_relays_closed() {
    if [[ -n "${2:-}" ]]; then
        lib_count_log "$1" "relay closed.*reason=$2([^a-z-]|$)"
    else
        lib_count_log "$1" 'relay closed'
    fi
}
