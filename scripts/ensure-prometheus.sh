#!/bin/sh
# Make sure a Prometheus server (and promtool) is on PATH, for tests/integration/test_prometheus.py.
#
# Idempotent and quiet: exits 0 at once when `prometheus` is already on PATH; otherwise installs Debian's
# `prometheus` package (Debian 12: 2.42, server and promtool) with apt, as root (or through sudo).
# No daemon is left running: a service start by the package's maintainer scripts is refused through
# policy-rc.d while apt runs, and there is no systemd to start one anyway. The test runs its own private
# prometheus on a free port; nothing here listens on 9090.
set -eu

if command -v prometheus >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "ensure-prometheus: prometheus is not installed and this is not root (and there is no sudo)" >&2
    echo "ensure-prometheus: as root, run: apt-get install -y --no-install-recommends prometheus" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: no apt-get here; install Prometheus 2.x so that 'prometheus' is on PATH" >&2
    exit 1
fi

log=$(mktemp)
policy=/usr/sbin/policy-rc.d
own_policy=""
cleanup() {
    # Remove only the policy file this script wrote; a pre-existing one (Docker images ship one) stays.
    if [ -n "$own_policy" ]; then $SUDO rm -f "$policy"; fi
    rm -f "$log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# policy-rc.d exit 101 = "action forbidden": invoke-rc.d will not start the prometheus service during install.
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    own_policy=1
fi

apt_install() {
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        >>"$log" 2>&1
}

# Try from the package lists as they are; refresh them only if that fails (a fresh image has none).
if ! apt_install; then
    if ! { $SUDO apt-get update -qq >>"$log" 2>&1 && apt_install; }; then
        cat "$log" >&2
        echo "ensure-prometheus: apt-get install prometheus failed (log above)" >&2
        exit 1
    fi
fi

# Belt and braces: if a service was started anyway (a pre-existing policy-rc.d that allows starts), stop it, so
# nothing is left listening on 9090. Only the package's own init script is used, never a kill by name.
if [ -x /etc/init.d/prometheus ] && $SUDO /etc/init.d/prometheus status >/dev/null 2>&1; then
    $SUDO /etc/init.d/prometheus stop >>"$log" 2>&1 || true
fi

if ! command -v prometheus >/dev/null 2>&1; then
    echo "ensure-prometheus: the prometheus package installed but 'prometheus' is not on PATH" >&2
    exit 1
fi
