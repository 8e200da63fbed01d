#!/usr/bin/env bash
# scripts/artifacts.sh: checks the container image's and the Kubernetes
# manifests' promises without a container runtime or a cluster.
#
#   1. spliced starts with exactly the image's default config (the file the
#      Dockerfile COPYs to /etc/spliced/spliced.toml, with the Dockerfile's
#      ENV), and the Dockerfile's HEALTHCHECK command, run as written, passes
#      and asks /livez (a liveness check).
#   2. spliced starts with exactly the ConfigMap's spliced.toml, started with
#      the Deployment's args, and every probe of the Deployment (path and
#      port parsed from deployment.yaml) answers 200; liveness asks /livez,
#      readiness /healthz. Only the password-file path is changed, to a
#      temp file, since /etc/spliced-secrets exists only in the pod.
#   3. Every manifest under deploy/ validates against the Kubernetes schemas
#      with `kubernetes-validate --strict` (pip-installed into a temp venv).
#
# Each spliced runs in a network namespace of its own (`ip netns`, root), so
# the configs' own ports (0.0.0.0:9090, :3307, :6432) are bound as written
# without touching the host's; no traffic leaves the namespace, and the
# configs' upstream names do not resolve there (the pools stay empty, as a
# pod's would before its database exists).
#
#   bash scripts/artifacts.sh            # SPLICED=path/to/spliced to pick the binary
#
# `[[ ... ]] && ok ... || bad ...` below: ok never fails, so bad runs only
# when the test does.
# shellcheck disable=SC2015
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SPLICED=${SPLICED:-$ROOT/${CARGO_TARGET_DIR:-target}/release/spliced}
[[ $SPLICED == /* ]] || SPLICED=$ROOT/$SPLICED
[[ -x $SPLICED ]] || { echo "artifacts: no spliced binary at $SPLICED (make build)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "artifacts: needs root (ip netns)" >&2; exit 2; }
command -v curl >/dev/null || lib_apt_install curl
command -v python3 >/dev/null || lib_apt_install python3 python3-venv

WORK=$(mktemp -d /tmp/spliced-artifacts.XXXXXX)
NETNS=spliced-artifacts-$$
PID=
cleanup() {
    [[ -z $PID ]] || kill "$PID" 2>/dev/null || true
    ip netns del "$NETNS" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add "$NETNS"
ip -n "$NETNS" link set dev lo up

passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

python3 -m venv "$WORK/venv" >/dev/null
"$WORK/venv/bin/pip" install -q kubernetes-validate PyYAML
PY=$WORK/venv/bin/python

# Starts spliced inside the namespace with ENV (KEY=VALUE...) -- ARGS...;
# waits for its admin port; sets PID.
start_spliced() {
    local port=$1
    shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    ip netns exec "$NETNS" env -i PATH=/usr/bin:/bin "${envs[@]}" "$SPLICED" "$@" \
        >"$WORK/spliced.log" 2>&1 &
    PID=$!
    local i
    for i in $(seq 1 100); do
        if ip netns exec "$NETNS" curl -s -o /dev/null "http://127.0.0.1:$port/livez"; then
            return 0
        fi
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "spliced did not answer on :$port:" >&2
    cat "$WORK/spliced.log" >&2
    return 1
}

stop_spliced() {
    kill -TERM "$PID"
    wait "$PID" || true
    PID=
}

# --- 1. the image -----------------------------------------------------------
"$PY" - "$ROOT/Dockerfile" >"$WORK/image.env" <<'EOF'
import json, re, shlex, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
final = text[text.rindex("\nFROM "):]          # the runtime stage
m = re.search(r"^COPY\s+(\S+)\s+/etc/spliced/spliced\.toml\s*$", final, re.M)
env = {}
for line in re.findall(r"^ENV\s+(.*)$", final, re.M):
    for kv in shlex.split(line):
        k, v = kv.split("=", 1)
        env[k] = v
hc = re.search(r"^HEALTHCHECK\s.*?CMD\s+(\[.*\])\s*$", final, re.M)
cmd = json.loads(hc.group(1))
ep = json.loads(re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", final, re.M).group(1))
args = json.loads(re.search(r"^CMD\s+(\[.*\])\s*$", final, re.M).group(1))
print("CONFIG=" + shlex.quote(m.group(1)))
print("ENVS=(" + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + ")")
print("HEALTHCHECK=(" + " ".join(shlex.quote(c) for c in cmd) + ")")
print("ARGS=(" + " ".join(shlex.quote(a) for a in args) + ")")
print("ENTRY=" + shlex.quote(ep[0]))
print("ADMIN_PORT=" + shlex.quote(env["SPLICED_ADMIN_PORT"]))
EOF
# shellcheck disable=SC1091
source "$WORK/image.env"
[[ $ENTRY == /usr/local/bin/spliced ]] && ok "image: ENTRYPOINT is spliced" || bad "image: ENTRYPOINT $ENTRY"
mkdir -p "$WORK/image-run"
# As in the image: the config at SPLICED_CONFIG, the ENV as written except
# RUNTIME_DIRECTORY (/run/spliced there, a temp dir here).
cp "$ROOT/$CONFIG" "$WORK/image.toml"
IMAGE_ENVS=()
# shellcheck disable=SC2153 # ENVS comes from image.env
for kv in "${ENVS[@]}"; do
    case $kv in
        SPLICED_CONFIG=*) IMAGE_ENVS+=("SPLICED_CONFIG=$WORK/image.toml") ;;
        RUNTIME_DIRECTORY=*) IMAGE_ENVS+=("RUNTIME_DIRECTORY=$WORK/image-run") ;;
        *) IMAGE_ENVS+=("$kv") ;;
    esac
done
if "$SPLICED" check --config "$WORK/image.toml" >/dev/null; then
    ok "image: spliced check accepts $CONFIG"
else
    bad "image: spliced check rejects $CONFIG"
fi
if start_spliced "$ADMIN_PORT" "${IMAGE_ENVS[@]}" -- "${ARGS[@]}"; then
    ok "image: spliced ${ARGS[*]} starts with $CONFIG and answers on :$ADMIN_PORT"
    if ip netns exec "$NETNS" env -i PATH=/usr/bin:/bin "${IMAGE_ENVS[@]}" "${HEALTHCHECK[@]}"; then
        ok "image: the HEALTHCHECK command passes"
    else
        bad "image: the HEALTHCHECK command fails"
    fi
    # A liveness check: it must ask /livez, which stays 200 while draining.
    [[ "${HEALTHCHECK[*]}" == *"GET /livez "* ]] && ok "image: the HEALTHCHECK asks /livez" ||
        bad "image: the HEALTHCHECK does not ask /livez"
    stop_spliced
else
    bad "image: spliced ${ARGS[*]} does not start with $CONFIG"
    PID=
fi

# --- 2. the ConfigMap and the Deployment's probes ---------------------------
"$PY" - "$ROOT/deploy" "$WORK" >"$WORK/k8s.env" <<'EOF'
import shlex, sys, yaml
deploy, work = sys.argv[1], sys.argv[2]
cm = yaml.safe_load(open(f"{deploy}/configmap.yaml"))
open(f"{work}/configmap.toml", "w").write(cm["data"]["spliced.toml"])
dep = yaml.safe_load(open(f"{deploy}/deployment.yaml"))
c = dep["spec"]["template"]["spec"]["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
def probe(name):
    g = c[name]["httpGet"]
    port = g["port"]
    return g["path"], ports.get(port, port)
mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
print("DEP_ARGS=(" + " ".join(shlex.quote(a) for a in c["args"]) + ")")
for name in ["readinessProbe", "livenessProbe"]:
    path, port = probe(name)
    print(f"{name.upper()}_PATH={shlex.quote(path)} {name.upper()}_PORT={port}")
print("CONFIG_MOUNT=" + shlex.quote(mounts["config"]))
print("SECRET_MOUNT=" + shlex.quote(mounts.get("monitor-password", "")))
EOF
# shellcheck disable=SC1091
source "$WORK/k8s.env"
[[ $LIVENESSPROBE_PATH == /livez ]] && ok "deployment: liveness asks /livez" || bad "deployment: liveness asks $LIVENESSPROBE_PATH, not /livez"
[[ $READINESSPROBE_PATH == /healthz ]] && ok "deployment: readiness asks /healthz" || bad "deployment: readiness asks $READINESSPROBE_PATH, not /healthz"
# The only change: the Secret's file, which exists only in the pod.
PASSWORD_FILE=$(sed -n 's/^password-file = "\(.*\)"$/\1/p' "$WORK/configmap.toml")
if [[ -n $PASSWORD_FILE ]]; then
    [[ $PASSWORD_FILE == "$SECRET_MOUNT"/* ]] && ok "configmap: password-file $PASSWORD_FILE is in the Secret's mount" ||
        bad "configmap: password-file $PASSWORD_FILE is not under the Secret's mount ($SECRET_MOUNT)"
    printf 'not-a-real-password\n' >"$WORK/monitor.pass"
    chmod 0440 "$WORK/monitor.pass"
    sed -i "s#^password-file = \".*\"\$#password-file = \"$WORK/monitor.pass\"#" "$WORK/configmap.toml"
fi
if "$SPLICED" check --config "$WORK/configmap.toml" >/dev/null; then
    ok "configmap: spliced check accepts spliced.toml"
else
    bad "configmap: spliced check rejects spliced.toml"
fi
# The Deployment's args, with its config path pointing at the extracted file.
K8S_ARGS=()
for a in "${DEP_ARGS[@]}"; do
    [[ $a == "$CONFIG_MOUNT/spliced.toml" ]] && a=$WORK/configmap.toml
    K8S_ARGS+=("$a")
done
mkdir -p "$WORK/k8s-run"
if start_spliced "$LIVENESSPROBE_PORT" RUNTIME_DIRECTORY="$WORK/k8s-run" -- "${K8S_ARGS[@]}"; then
    ok "configmap: spliced ${DEP_ARGS[*]} starts with the ConfigMap's config"
    for p in READINESSPROBE LIVENESSPROBE; do
        path_var=${p}_PATH port_var=${p}_PORT
        code=$(ip netns exec "$NETNS" curl -s -o /dev/null -w '%{http_code}' \
            "http://127.0.0.1:${!port_var}${!path_var}")
        [[ $code == 200 ]] && ok "deployment: ${p,,} GET :${!port_var}${!path_var} answers 200" ||
            bad "deployment: ${p,,} GET :${!port_var}${!path_var} answers $code"
    done
    stop_spliced
else
    bad "configmap: spliced does not start with the ConfigMap's config"
    PID=
fi

# --- 3. the manifests against the schemas -----------------------------------
for f in "$ROOT"/deploy/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] && continue
    if "$WORK/venv/bin/kubernetes-validate" --strict --quiet "$f"; then
        ok "schema: $(basename "$f") (kubernetes-validate --strict)"
    else
        bad "schema: $(basename "$f")"
    fi
done

echo "$passed passed, $failed failed"
((failed == 0))
