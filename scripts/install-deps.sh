#!/usr/bin/env bash
# scripts/install-deps.sh: install the Debian packages that the database
# end-to-end tests (scripts/e2e.sh) and the shell helpers (scripts/lib.sh)
# drive. Idempotent: installs only what is missing, runs `apt-get update` at
# most once and only when needed. Needs root only if something is missing.
#
#   PostgreSQL : server (initdb, pg_ctl, postgres), psql and pgbench.
#                On Debian bookworm pgbench ships in the *server* package
#                postgresql-15 (/usr/lib/postgresql/15/bin/pgbench; the
#                /usr/bin/pgbench wrapper is postgresql-client-common's);
#                postgresql-contrib is an empty metapackage and
#                postgresql-client-15 has only psql & co. So we install the
#                `postgresql` metapackage (server + client + contrib) of the
#                distribution's default version, which gives all three.
#   Redis      : redis-server, redis-tools (redis-cli, redis-benchmark).
#   Tools      : iproute2 (ss), procps (ps, pgrep), psmisc (fuser),
#                util-linux (runuser, setpriv), socat, coreutils.
#
# Package installation never starts system services (a temporary
# policy-rc.d denies it) and never creates the default "main" PostgreSQL
# cluster: the tests run their own throwaway servers on 127.0.0.1.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }

have_pg() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" && -x "$d/psql" && -x "$d/pgbench" ]] && return 0
    done
    return 1
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

missing=()
have_pg || missing+=(postgresql postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null; } || missing+=(redis-tools)
command -v ss >/dev/null || missing+=(iproute2)
{ command -v pgrep >/dev/null && command -v ps >/dev/null; } || missing+=(procps)
command -v fuser >/dev/null || missing+=(psmisc)
{ command -v runuser >/dev/null && command -v setpriv >/dev/null; } || missing+=(util-linux)
command -v socat >/dev/null || missing+=(socat)
command -v sha256sum >/dev/null || missing+=(coreutils)
command -v awk >/dev/null || missing+=(mawk)

if ((${#missing[@]} == 0)); then
    log "all dependencies present"
    exit 0
fi

log "missing: ${missing[*]}"
if [[ "$(id -u)" != 0 ]]; then
    log "ERROR: these packages must be installed as root (CI runs as root):"
    log "  sudo apt-get install -y ${missing[*]}"
    exit 1
fi
command -v apt-get >/dev/null || { log "ERROR: apt-get not found: not a Debian-like system"; exit 1; }

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)

# Don't let maintainer scripts start redis/postgresql services, and don't let
# postgresql-common create (and start) a "main" cluster on port 5432.
policy_created=0
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\n# temporary, scripts/install-deps.sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
fi
cleanup() { ((policy_created)) && rm -f /usr/sbin/policy-rc.d; return 0; }
trap cleanup EXIT
mkdir -p /etc/postgresql-common/createcluster.d
if [[ ! -e /etc/postgresql-common/createcluster.d/spliced-tests.conf ]]; then
    echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/spliced-tests.conf
fi

lists_present() { compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; }
updated=0
if ! lists_present; then
    log "apt-get update"
    apt-get update -q
    updated=1
fi
log "apt-get install ${missing[*]}"
if ! apt-get install "${APT_OPTS[@]}" "${missing[@]}"; then
    if ((updated)); then
        log "ERROR: apt-get install failed"
        exit 1
    fi
    log "install failed with the current package lists: apt-get update and retry"
    apt-get update -q
    apt-get install "${APT_OPTS[@]}" "${missing[@]}"
fi

have_pg || { log "ERROR: PostgreSQL binaries (initdb, pg_ctl, postgres, psql, pgbench) still missing"; exit 1; }
for c in redis-server redis-cli redis-benchmark ss socat runuser; do
    command -v "$c" >/dev/null || { log "ERROR: $c still missing after install"; exit 1; }
done
log "done"
