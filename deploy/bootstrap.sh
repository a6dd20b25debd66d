# shellcheck shell=bash
# Shared bootstrap of deploy/up.sh and deploy/test.sh; source it, do not run it.
# After sourcing: the working directory is the repository root, SoftHSM2 is installed,
# and .venv holds an editable install of medvault with its dev extras.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv"
SOFTHSM_MODULE="/usr/lib/softhsm/libsofthsm2.so"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run as root directly, through sudo otherwise; fail clearly when neither is possible.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run: $* (install sudo or run as root)"
    fi
}

ensure_softhsm() {
    if command -v softhsm2-util >/dev/null 2>&1 && [ -f "$SOFTHSM_MODULE" ]; then
        return
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "SoftHSM2 is missing and apt-get is not available; install softhsm2 by hand"
    log "installing SoftHSM2 (Debian package softhsm2)"
    apt_get update
    apt_get install -y softhsm2
}

# The DICOM tests drive medvault with dcmtk's storescu, findscu and getscu, as hospitals do.
ensure_dcmtk() {
    if command -v storescu >/dev/null 2>&1 && command -v findscu >/dev/null 2>&1 \
        && command -v getscu >/dev/null 2>&1; then
        return
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "dcmtk is missing and apt-get is not available; install dcmtk by hand"
    log "installing dcmtk (Debian package dcmtk, for the DICOM tests)"
    apt_get update
    apt_get install -y dcmtk
}

# apt-get, waiting for apt's locks instead of failing when another apt or dpkg runs
# (unattended-upgrades on a fresh machine, a second terminal). dpkg's lock is waited
# for by apt itself (DPkg::Lock::Timeout); the lists lock of `update` is not, so a
# "Could not get lock" is retried until the same deadline. Other failures are not.
APT_LOCK_WAIT="${MEDVAULT_APT_LOCK_WAIT:-600}"
APT_RETRY_SECONDS="${MEDVAULT_APT_RETRY_SECONDS:-5}"
apt_get() {
    local deadline=$((SECONDS + APT_LOCK_WAIT)) errors status
    errors="$(mktemp)"
    while true; do
        status=0
        as_root env DEBIAN_FRONTEND=noninteractive \
            apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" 2> >(tee "$errors" >&2) \
            || status=$?
        wait  # for tee: $errors is complete
        if [ "$status" -eq 0 ] || ! grep -q "Could not get lock" "$errors" \
            || [ "$SECONDS" -ge "$deadline" ]; then
            rm -f "$errors"
            return "$status"
        fi
        log "apt is busy (another apt or dpkg holds its lock); waiting"
        sleep "$APT_RETRY_SECONDS"
    done
}

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "Python 3.11 or newer is required (found: $(python3 --version 2>&1 || echo none))"
}

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        local python
        python="$(find_python)"
        log "creating $VENV with $python"
        "$python" -m venv "$VENV"
    fi
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$VENV uses Python < 3.11; remove it and run again"
    # Reinstall only when pyproject.toml changed since the last successful install.
    local stamp="$VENV/.medvault-pyproject.sha256"
    local want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
        log "installing medvault and its dev dependencies into $VENV"
        # uv installs the same resolution as pip (same versions, checked) in a third of
        # the time (cold cache, 2 cores: 23 s against 68 s; every CI run starts from a
        # clean clone); pip remains the fallback where uv cannot be had or fails.
        if ! { "$VENV/bin/python" -m pip install --quiet uv \
            && "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" \
                --compile-bytecode -e '.[dev]'; }; then
            log "uv unavailable or failed; installing with pip"
            "$VENV/bin/python" -m pip install --quiet -e '.[dev]'
        fi
        printf '%s\n' "$want" > "$stamp"
    fi
    # Byte-code for the checkout, written even where PYTHONDONTWRITEBYTECODE is set (as on
    # the CI machine): without it every service, CLI and test process compiled the
    # project's modules from source again (~0.15 s of CPU per service start). Only a
    # saving: a module that does not compile is ruff's to report (compileall names it,
    # -q prints nothing else), and an unwritable __pycache__ must not stop the run.
    "$VENV/bin/python" -m compileall -q -j 0 service storage keystore bench tests \
        || log "warning: byte-code not written for every module (see above); continuing"
}

# MEDVAULT_BOOTSTRAP_FUNCTIONS_ONLY=1: define the functions and stop (for tests).
if [ "${MEDVAULT_BOOTSTRAP_FUNCTIONS_ONLY:-}" != 1 ]; then
    ensure_softhsm
    ensure_dcmtk
    ensure_venv
fi
