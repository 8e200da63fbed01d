# shellcheck shell=bash
# shellcheck disable=SC2034 # LIB_STOP_STATUS, UP_PID, ... are for the callers
# scripts/lib.sh: the one helper library of spliced's shell scripts
# (faults.sh, scale.sh, soak.sh, install-deps.sh, bench-peers.sh). Source it
# from bash:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#     lib_init SUITE                # work dir $LIB_TMP + EXIT/INT/TERM cleanup
#
# It is safe under `set -euo pipefail`: every function returns a status rather
# than exiting (so it works inside `if`, `||` and lib_wait_until) and never
# relies on errexit itself. It sets no shell option: each script sets its own.
# It only ends processes by pid, ones it was given (lib_track_pid, lib_bg,
# spliced_start, lib_sampler_start) or asked to stop; it never kills by name.
#
# Environment knobs:
#   SPLICED_BIN      spliced binary (default <repo>/target/release/spliced;
#                    SPLICED is accepted as another name for it)
#   LOADGEN          load generator (default $CARGO_TARGET_DIR, else
#                    <repo>/target, + /release/examples/loadgen)
#   LIB_REBUILD=1    lib_build rebuilds spliced even when the binary exists
#   SPLICED_STANDIN  "socat": spliced_start runs a socat relay instead of
#                    spliced (only for developing scripts; log-based checks
#                    consult lib_standin and skip)
#   SPLICED_AS=USER  spliced_start runs spliced as USER (runuser)
#   SPLICED_ENV="VAR=value ..."  extra environment for spliced (diagnosis)
#   KEEP_TMP=1, KEEP=1  keep the work dir ($LIB_TMP) after the run
#   LIB_LOG_DIR      where the work dir's *.log files are copied at exit
#                    (default <repo>/target/SUITE-logs)
#
# Functions, one per job:
#   lib_log MSG...             timestamped line on stderr
#   lib_die MSG...             lib_log, then exit 1
#   lib_now_ms                 milliseconds since the epoch
#   lib_elapsed T0_MS          seconds since T0_MS (3 decimals)
#   lib_init SUITE [keep-failed]
#                              create $LIB_TMP, install the cleanup trap; at
#                              exit: stop tracked pids, run lib_on_exit steps
#                              (last first), copy *.log to $LIB_LOG_DIR, remove
#                              $LIB_TMP (kept with KEEP_TMP/KEEP, or after a
#                              lib_fail when "keep-failed" was given)
#   lib_on_exit CMD            register a shell command for the cleanup
#   lib_wait_until SECS CMD... run CMD every 50 ms until it succeeds (0) or
#                              SECS (may be decimal) have passed (1)
#   lib_pid_alive PID          PID exists and is not a zombie
#   lib_pid_gone PID           the opposite (for lib_wait_until)
#   lib_track_pid PID          stop PID at cleanup (a pid recycled meanwhile is
#                              left alone); works from subshells too
#   lib_stop_pid PID [SECS] [SIGNAL]
#                              send SIGNAL (default TERM; 0: send nothing, for
#                              a process already signalled), wait up to SECS
#                              (default 10) until PID is gone, else SIGKILL it.
#                              0 if it went by itself, 1 if it was killed.
#                              LIB_STOP_STATUS: its exit status when it is a
#                              child of this shell, else 127
#   lib_bg NAME CMD...         CMD in the background, stdout/stderr to
#                              $LIB_TMP/NAME.out/.err, tracked; sets LIB_BG_PID
#   lib_fd_count PID [kinds]   open fds of PID; with "kinds":
#                              "SOCKETS PIPES OTHER"
#   lib_fds_back PID BASE SLACK  fds of PID back to BASE (lib_fd_count kinds):
#                              sockets and other at most BASE, pipes at most
#                              BASE + SLACK (what idle pipe pools may keep)
#   lib_mem_kb PID [FIELD]     a kB field of /proc/PID/status (default VmRSS)
#   lib_sampler_start PID FILE [SECS]
#                              every SECS (default 1) while PID lives, append
#                              "MS_SINCE_START FDS RSS_KB" to FILE
#   lib_sampler_stop           stop it
#   lib_sample_peak FILE COL   largest value of column COL of FILE
#   lib_clean_log FILE         FILE with ANSI escape sequences removed
#   lib_count_log FILE ERE     lines of FILE (cleaned) matching ERE
#   lib_wait_log FILE ERE [SECS]  wait (default 10 s) until FILE matches ERE
#   lib_closes LOG [REASON...] spliced's `relay closed` lines in LOG (only
#                              those with one of these reasons)
#   lib_closes_at_least LOG N [REASON...]  lib_closes >= N
#   lib_close_reasons LOG      "eof=12 idle=3": the close lines by reason
#   lib_json FILE KEY          a field of a JSON summary (-1 if missing)
#   lib_port_in_use PORT       any local TCP socket uses PORT
#   lib_port_listening PORT    something LISTENs on PORT (ss: no connection)
#   lib_free_port              a currently unused port in 20000-32767
#   lib_wait_port PORT [SECS]  wait (default 10 s) until PORT listens
#   lib_pass NAME [DETAIL], lib_fail NAME [DETAIL], lib_skip NAME [REASON]
#                              print and count a result (LIB_PASSED,
#                              LIB_FAILED, LIB_SKIPPED, LIB_FAILED_NAMES;
#                              also $LIB_TMP/results.tsv); names are padded
#                              to LIB_NAME_WIDTH (44)
#   lib_chk_reset, lib_chk COND MSG, lib_chk_done NAME DETAIL
#                              collect the failed conditions of one scenario
#                              (COND is 1 or 0), then one lib_pass/lib_fail
#   lib_apt_install PKG...     install Debian packages (root; no service is
#                              started; apt-get update when needed)
#   lib_need CMD PKG           install PKG if CMD is missing
#   lib_build [loadgen]        cargo build spliced if missing (and loadgen)
#   lib_standin                true when SPLICED_STANDIN is set
#   spliced_start NAME ARGS... `spliced run ARGS...`, stderr to
#                              $LIB_TMP/spliced-NAME.log; waits 10 s for its
#                              `listening on ADDR:PORT` line and the port;
#                              sets SPLICED_PID, SPLICED_ADDR, SPLICED_PORT,
#                              SPLICED_LOG. Call it from the shell that will
#                              stop it, so that lib_stop_pid gets its status
#   loadgen_upstream NAME NETNS ARGS...
#                              `loadgen upstream ARGS` (inside network
#                              namespace NETNS unless empty); waits 10 s for
#                              it to listen; sets UP_PID, UP_ADDR

LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$LIB_DIR/.." && pwd)"
SPLICED_BIN="${SPLICED_BIN:-${SPLICED:-$REPO_ROOT/target/release/spliced}}"
LOADGEN_TARGET="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
LOADGEN="${LOADGEN:-$LOADGEN_TARGET/release/examples/loadgen}"
# tracing-subscriber honours NO_COLOR; lib_clean_log strips escapes anyway.
export NO_COLOR=1

LIB_TMP=""
LIB_SUITE="tests"
LIB_KEEP_FAILED=0
LIB_LOG_DIR="${LIB_LOG_DIR:-}"
LIB_NAME_WIDTH="${LIB_NAME_WIDTH:-44}"
LIB_PASSED=0
LIB_FAILED=0
LIB_SKIPPED=0
LIB_FAILED_NAMES=()
LIB_CHK_ERRS=()
LIB_EXIT_CMDS=()
LIB_STOP_STATUS=127
LIB_BG_PID=""
LIB_SAMPLER_PID=""
SPLICED_PID=""
SPLICED_ADDR=""
SPLICED_PORT=""
SPLICED_LOG=""
UP_PID=""
UP_ADDR=""

# ------------------------------------------------------------ basics -------

lib_log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
lib_die() {
    lib_log "FATAL: $*"
    exit 1
}

lib_now_ms() {
    local t="${EPOCHREALTIME/[.,]/}"
    echo $((t / 1000))
}
lib_elapsed() {
    local d=$(($(lib_now_ms) - $1))
    printf '%d.%03d\n' $((d / 1000)) $((d % 1000))
}

# Milliseconds in SECS ("5", "0.5", "2.25").
lib__ms_of() {
    local s="$1" i f=""
    i="${s%%.*}"
    [[ "$s" != *.* ]] || f="${s#*.}"
    f="${f}000"
    echo $((10#${i:-0} * 1000 + 10#${f:0:3}))
}

lib_wait_until() {
    local deadline now
    deadline=$((${EPOCHREALTIME/[.,]/} + $(lib__ms_of "$1") * 1000))
    shift
    while :; do
        "$@" && return 0
        now="${EPOCHREALTIME/[.,]/}"
        ((now < deadline)) || return 1
        sleep 0.05
    done
}

# ------------------------------------------------------- work dir ----------

lib_init() {
    LIB_SUITE="${1:-$LIB_SUITE}"
    if [[ "${2:-}" == keep-failed ]]; then LIB_KEEP_FAILED=1; fi
    LIB_TMP="$(mktemp -d "${TMPDIR:-/tmp}/spliced-${LIB_SUITE}.XXXXXX")" || lib_die "mktemp failed"
    # Other users (the postgres server user, spliced run as SPLICED_AS) may
    # need to traverse it.
    chmod 711 "$LIB_TMP"
    : >"$LIB_TMP/.pids"
    LIB_LOG_DIR="${LIB_LOG_DIR:-$REPO_ROOT/target/${LIB_SUITE}-logs}"
    trap lib__cleanup EXIT
    trap 'lib_log "interrupted"; exit 130' INT
    trap 'lib_log "terminated"; exit 143' TERM
}

lib_on_exit() { LIB_EXIT_CMDS+=("$1"); }

# ------------------------------------------------- benchmarks as a user ----
# The bench-* scripts run their servers, proxies and load as BENCH_USER:
# unless given, cloudsdk when run as root and that user exists, else the
# caller.

lib_bench_user() {
    if [[ -z ${BENCH_USER:-} ]]; then
        if [[ $(id -u) == 0 ]] && id cloudsdk >/dev/null 2>&1; then BENCH_USER=cloudsdk; else BENCH_USER=$(id -un); fi
    fi
}

# lib_as_user CMD...: CMD as BENCH_USER.
lib_as_user() {
    if [[ $(id -un) == "$BENCH_USER" ]]; then
        "$@"
    else
        setpriv --reuid="$BENCH_USER" --regid="$(id -g "$BENCH_USER")" --init-groups -- "$@"
    fi
}

# lib_bench_init SUITE: lib_init SUITE, then WORK, the work dir, open to
# BENCH_USER, and BIN, a copy of SPLICED_BIN in it that BENCH_USER can run.
lib_bench_init() {
    lib_init "$1"
    WORK=$LIB_TMP
    chmod 755 "$WORK"
    [[ $(id -un) == "$BENCH_USER" ]] || chown "$BENCH_USER" "$WORK"
    cp "$SPLICED_BIN" "$WORK/spliced"
    BIN=$WORK/spliced
}

lib__cleanup() {
    local rc=$? i pid st pids=()
    trap - EXIT INT TERM
    set +e
    if [[ -n "$LIB_TMP" && -f "$LIB_TMP/.pids" ]]; then
        while read -r pid st; do
            [[ -n "$pid" && "$(lib__starttime "$pid")" == "$st" ]] && pids+=("$pid")
        done <"$LIB_TMP/.pids"
        # All at once, then each gets up to 5 s before SIGKILL.
        for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
        for pid in "${pids[@]}"; do lib_stop_pid "$pid" 5 0; done
    fi
    for ((i = ${#LIB_EXIT_CMDS[@]} - 1; i >= 0; i--)); do
        eval "${LIB_EXIT_CMDS[$i]}" || lib_log "cleanup step failed: ${LIB_EXIT_CMDS[$i]}"
    done
    if [[ -n "$LIB_TMP" && -d "$LIB_TMP" ]]; then
        lib__save_logs
        if [[ "${KEEP_TMP:-0}" == 1 || -n "${KEEP:-}" ]] || ((LIB_KEEP_FAILED && LIB_FAILED > 0)); then
            lib_log "work dir kept: $LIB_TMP"
        else
            rm -rf "$LIB_TMP"
        fi
    fi
    exit "$rc"
}

lib__save_logs() {
    [[ -n "$LIB_LOG_DIR" ]] || return 0
    mkdir -p "$LIB_LOG_DIR" 2>/dev/null || return 0
    rm -f "$LIB_LOG_DIR"/*.log 2>/dev/null
    find "$LIB_TMP" -maxdepth 3 -name '*.log' -type f -size -50M \
        -exec cp -t "$LIB_LOG_DIR" {} + 2>/dev/null
    return 0
}

# ------------------------------------------------------- processes ---------

# The fields of /proc/PID/stat after the command name (which may hold spaces):
# [0] is the state, [19] the start time.
lib__stat() {
    local line
    { read -r line <"/proc/$1/stat"; } 2>/dev/null || return 1
    read -r -a LIB__STAT <<<"${line##*) }"
}
lib__starttime() { lib__stat "$1" && echo "${LIB__STAT[19]}"; }

lib_pid_alive() {
    [[ -n "${1:-}" ]] && lib__stat "$1" || return 1
    [[ "${LIB__STAT[0]}" != Z && "${LIB__STAT[0]}" != X ]]
}
lib_pid_gone() { ! lib_pid_alive "$1"; }

lib_track_pid() {
    local st
    [[ -n "$LIB_TMP" ]] || return 0
    st="$(lib__starttime "$1")" || return 0
    echo "$1 $st" >>"$LIB_TMP/.pids"
}

lib_stop_pid() {
    local pid="$1" secs="${2:-10}" sig="${3:-TERM}" rc=0
    LIB_STOP_STATUS=127
    [[ -n "$pid" ]] || return 0
    if lib_pid_alive "$pid"; then
        if [[ "$sig" != 0 ]]; then kill -s "$sig" "$pid" 2>/dev/null || true; fi
        if ! lib_wait_until "$secs" lib_pid_gone "$pid"; then
            lib_log "pid $pid still running after ${secs}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            lib_wait_until 5 lib_pid_gone "$pid" || return 1
            rc=1
        fi
    fi
    if wait "$pid" 2>/dev/null; then LIB_STOP_STATUS=0; else LIB_STOP_STATUS=$?; fi
    return "$rc"
}

lib_bg() {
    local name="$1"
    shift
    "$@" </dev/null >"$LIB_TMP/$name.out" 2>"$LIB_TMP/$name.err" &
    LIB_BG_PID=$!
    lib_track_pid "$LIB_BG_PID"
    # Nobody waits for it: disowned, bash does not announce the kills that
    # scenarios do on purpose.
    disown "$LIB_BG_PID" 2>/dev/null || true
}

# ------------------------------------------------------- resources ---------

# shellcheck disable=SC2012 # /proc/PID/fd holds only numbers
lib_fd_count() {
    if [[ "${2:-}" == kinds ]]; then
        ls -l "/proc/$1/fd" 2>/dev/null | awk 'NR > 1 { if ($NF ~ /^socket:/) s++; else if ($NF ~ /^pipe:/) p++; else o++ }
            END { printf "%d %d %d\n", s, p, o }'
    else
        ls "/proc/$1/fd" 2>/dev/null | wc -l
    fi
    return 0
}

lib_fds_back() {
    local cur base slack="${3:?lib_fds_back PID BASE SLACK}"
    read -r -a cur <<<"$(lib_fd_count "$1" kinds)"
    read -r -a base <<<"$2"
    ((cur[0] <= base[0] && cur[2] <= base[2] && cur[1] <= base[1] + slack))
}

lib_mem_kb() { awk -v f="${2:-VmRSS}:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

lib_sampler_start() {
    local pid="$1" file="$2" every="${3:-1}" t0
    t0="$(lib_now_ms)"
    (
        while lib_pid_alive "$pid"; do
            printf '%s %s %s\n' "$(($(lib_now_ms) - t0))" "$(lib_fd_count "$pid")" "$(lib_mem_kb "$pid")"
            sleep "$every"
        done
    ) </dev/null >"$file" 2>/dev/null &
    LIB_SAMPLER_PID=$!
    lib_track_pid "$LIB_SAMPLER_PID"
}
lib_sampler_stop() { lib_stop_pid "$LIB_SAMPLER_PID" 5 || true; }
lib_sample_peak() { awk -v c="$2" 'BEGIN { m = 0 } $c + 0 > m { m = $c + 0 } END { print m }' "$1" 2>/dev/null; }

# ------------------------------------------------------------ logs ---------

lib_clean_log() { sed -e 's/\x1b\[[0-9;]*[A-Za-z]//g' "$1" 2>/dev/null; }
lib_count_log() { lib_clean_log "$1" | grep -Ec -- "$2" || true; }
lib__log_matches() { lib_clean_log "$1" | grep -Eq -- "$2"; }
lib_wait_log() { lib_wait_until "${3:-10}" lib__log_matches "$1" "$2"; }

# spliced logs one `relay closed ... reason=REASON ...` line per relay.
lib_closes() {
    local log="$1" r alt=""
    shift
    if (($# == 0)); then
        lib_count_log "$log" 'relay closed'
        return 0
    fi
    for r in "$@"; do alt+="${alt:+|}$r"; done
    lib_count_log "$log" "relay closed.*reason=($alt)([^a-z-]|\$)"
}
lib_closes_at_least() {
    local log="$1" n="$2"
    shift 2
    (($(lib_closes "$log" "$@") >= n))
}
lib_close_reasons() {
    lib_clean_log "$1" | grep 'relay closed' | grep -oE 'reason="?[a-z-]+' | tr -d '"' | sort | uniq -c |
        awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), substr($2, 8), $1 }'
    return 0
}

lib_json() {
    local v
    v="$(jq -r ".$2 // empty" "$1" 2>/dev/null)" || v=""
    echo "${v:--1}"
}

# ------------------------------------------------------------ ports --------

lib_port_in_use() { [[ -n "$(ss -Htan "( sport = :$1 )" 2>/dev/null)" ]]; }
lib_port_listening() { [[ -n "$(ss -Htln "( sport = :$1 )" 2>/dev/null)" ]]; }
lib_wait_port() { lib_wait_until "${2:-10}" lib_port_listening "$1"; }

lib_free_port() {
    local i p
    for ((i = 0; i < 500; i++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 12768))
        lib_port_in_use "$p" || {
            echo "$p"
            return 0
        }
    done
    lib_log "no free port found"
    return 1
}

# ---------------------------------------------------------- results --------

lib__result() {
    printf '%s  %-*s %s\n' "$1" "$LIB_NAME_WIDTH" "$2" "${3:-}"
    [[ -z "$LIB_TMP" ]] || printf '%s\t%s\t%s\n' "$2" "$1" "${3:-}" >>"$LIB_TMP/results.tsv"
}
lib_pass() {
    LIB_PASSED=$((LIB_PASSED + 1))
    lib__result PASS "$@"
}
lib_fail() {
    LIB_FAILED=$((LIB_FAILED + 1))
    LIB_FAILED_NAMES+=("$1")
    lib__result FAIL "$@"
}
lib_skip() {
    LIB_SKIPPED=$((LIB_SKIPPED + 1))
    lib__result SKIP "$@"
}

# Usage: lib_chk_reset; lib_chk "$((a == b))" "a=$a b=$b"; ...;
#        lib_chk_done NAME "figures"
lib_chk_reset() { LIB_CHK_ERRS=(); }
lib_chk() { [[ "$1" == 1 ]] || LIB_CHK_ERRS+=("$2"); }
lib_chk_done() {
    if ((${#LIB_CHK_ERRS[@]} == 0)); then
        lib_pass "$1" "$2"
    else
        local IFS=';'
        lib_fail "$1" "$2 -- ${LIB_CHK_ERRS[*]}"
    fi
}

# ------------------------------------------------------ dependencies -------

lib_apt_install() {
    if [[ "$(id -u)" != 0 ]]; then
        lib_log "installing ${*} needs root: sudo apt-get install -y $*"
        return 1
    fi
    command -v apt-get >/dev/null || {
        lib_log "apt-get not found: not a Debian-like system"
        return 1
    }
    lib_log "apt-get install $*"
    (
        export DEBIAN_FRONTEND=noninteractive
        opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
        # Maintainer scripts must not start services (redis, postgresql,
        # nginx, haproxy...) while packages are installed.
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
            printf '#!/bin/sh\n# temporary, scripts/lib.sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
        fi
        updated=0
        if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
            apt-get update -q || exit 1
            updated=1
        fi
        apt-get install "${opts[@]}" "$@" && exit 0
        ((updated == 0)) || exit 1
        lib_log "apt-get install failed with the current package lists: apt-get update and retry"
        apt-get update -q && apt-get install "${opts[@]}" "$@"
    ) >&2
}

lib_need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    lib_apt_install "$2" || true
    command -v "$1" >/dev/null 2>&1
}

# shellcheck disable=SC2120 # its argument is optional
lib_build() {
    if [[ ! -x "$SPLICED_BIN" || -n "${LIB_REBUILD:-}" ]]; then
        lib_log "building spliced (cargo build --release)"
        (cd "$REPO_ROOT" && env -u CARGO_TARGET_DIR cargo build --release) || return 1
    fi
    if [[ "${1:-}" == loadgen ]]; then
        lib_log "building loadgen (cargo build --release --example loadgen)"
        (cd "$REPO_ROOT" && CARGO_TARGET_DIR="$LOADGEN_TARGET" cargo build --release --example loadgen) || return 1
        [[ -x "$LOADGEN" ]] || return 1
    fi
    [[ -x "$SPLICED_BIN" ]]
}

# ---------------------------------------------------------- spliced --------

lib_standin() { [[ -n "${SPLICED_STANDIN:-}" ]]; }

spliced_start() {
    local name="$1" out extra_env=() child
    shift
    [[ -n "$LIB_TMP" ]] || {
        lib_log "spliced_start: call lib_init first"
        return 1
    }
    SPLICED_LOG="$LIB_TMP/spliced-$name.log"
    out="$LIB_TMP/spliced-$name.out"
    SPLICED_PID=""
    SPLICED_ADDR=""
    SPLICED_PORT=""
    if [[ -n "${SPLICED_ENV:-}" ]]; then read -r -a extra_env <<<"$SPLICED_ENV"; fi
    # Each instance its own runtime directory (pid and stats files): a
    # second instance under a live name is refused, and these may overlap.
    if [[ " ${extra_env[*]} " != *" RUNTIME_DIRECTORY="* ]]; then
        local rundir="$LIB_TMP/run-$name"
        mkdir -p -m 700 "$rundir"
        if [[ -n "${SPLICED_AS:-}" ]]; then chown "$SPLICED_AS" "$rundir"; fi
        extra_env+=("RUNTIME_DIRECTORY=$rundir")
    fi
    if lib_standin; then
        spliced__start_standin "$@" || return 1
    elif [[ ! -x "$SPLICED_BIN" ]]; then
        lib_log "spliced binary not found: $SPLICED_BIN"
        return 1
    elif [[ -n "${SPLICED_AS:-}" ]]; then
        runuser -u "$SPLICED_AS" -- env RUST_LOG="${RUST_LOG:-info}" NO_COLOR=1 "${extra_env[@]}" \
            "$SPLICED_BIN" run "$@" </dev/null >"$out" 2>"$SPLICED_LOG" &
        SPLICED_PID=$!
    else
        env RUST_LOG="${RUST_LOG:-info}" "${extra_env[@]}" \
            "$SPLICED_BIN" run "$@" </dev/null >"$out" 2>"$SPLICED_LOG" &
        SPLICED_PID=$!
    fi
    lib_track_pid "$SPLICED_PID"
    if ! lib_wait_log "$SPLICED_LOG" 'listening on [0-9.]+:[0-9]+' 10; then
        lib_log "spliced[$name] did not log 'listening on ADDR:PORT' within 10s; log:"
        lib_clean_log "$SPLICED_LOG" | tail -n 20 >&2
        lib_stop_pid "$SPLICED_PID" 2 || true
        return 1
    fi
    # runuser forks: SPLICED_PID becomes spliced itself.
    if [[ -n "${SPLICED_AS:-}" ]] && ! lib_standin; then
        child="$(pgrep -P "$SPLICED_PID" || true)"
        child="${child%%$'\n'*}"
        if [[ -n "$child" ]]; then
            SPLICED_PID="$child"
            lib_track_pid "$SPLICED_PID"
        fi
    fi
    SPLICED_ADDR="$(lib_clean_log "$SPLICED_LOG" | grep -m1 -Eo 'listening on [0-9.]+:[0-9]+' || true)"
    SPLICED_ADDR="${SPLICED_ADDR#listening on }"
    SPLICED_PORT="${SPLICED_ADDR##*:}"
    if [[ -z "$SPLICED_ADDR" || "$SPLICED_PORT" == 0 ]] || ! lib_wait_port "$SPLICED_PORT" 5; then
        lib_log "spliced[$name]: bad or unbound address '$SPLICED_ADDR'"
        lib_stop_pid "$SPLICED_PID" 2 || true
        return 1
    fi
    return 0
}

# socat stand-in: takes spliced's arguments (--mode, --upstream, --idle-timeout
# matter; it always listens on 127.0.0.1), logs a `listening on` line and
# exits 0 on SIGTERM.
spliced__start_standin() {
    local mode="" up="" idle="" a port tflag=()
    while (($#)); do
        a="$1"
        shift
        case "$a" in
            --mode) mode="$1"; shift ;;
            --upstream) [[ -n "$up" ]] || up="$1"; shift ;;
            --idle-timeout) idle="$1"; shift ;;
            --*) if (($#)) && [[ "$1" != --* ]]; then shift; fi ;;
        esac
    done
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

# ---------------------------------------------------------- loadgen --------

loadgen_upstream() {
    local name="$1" ns="$2"
    shift 2
    if [[ -n "$ns" ]]; then
        lib_bg "$name" ip netns exec "$ns" "$LOADGEN" upstream "$@"
    else
        lib_bg "$name" "$LOADGEN" upstream "$@"
    fi
    # ip netns exec execs the upstream: UP_PID is the upstream itself.
    UP_PID="$LIB_BG_PID"
    UP_ADDR=""
    if ! lib_wait_log "$LIB_TMP/$name.err" 'listening on' 10; then
        lib_log "upstream $name did not start: $(cat "$LIB_TMP/$name.err" 2>/dev/null)"
        return 1
    fi
    UP_ADDR="$(grep -m1 -Eo 'listening on [0-9.:]+' "$LIB_TMP/$name.err" || true)"
    UP_ADDR="${UP_ADDR#listening on }"
    [[ -n "$UP_ADDR" ]]
}

# lib_replace_section FILE MARK SECTION: puts SECTION (a file that starts
# with `<!-- MARK:begin` and ends with `<!-- MARK:end -->`) in place of
# FILE's section with the same markers, or appends it.
lib_replace_section() {
    local out="$1" mark="$2" section="$3" tmp
    tmp="$(mktemp)"
    if [[ -f $out ]] && grep -q "<!-- $mark:begin" "$out"; then
        awk -v f="$section" -v b="<!-- $mark:begin" -v e="<!-- $mark:end -->" '
            index($0, b) == 1 { while ((getline l < f) > 0) print l; skip = 1; next }
            index($0, e) == 1 { skip = 0; next }
            !skip { print }' "$out" >"$tmp"
    else
        { [[ ! -f $out ]] || cat "$out"; echo; cat "$section"; } >"$tmp"
    fi
    cat "$tmp" >"$out"
    rm -f "$tmp"
}
