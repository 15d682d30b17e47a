# shellcheck shell=bash
# Shared set-up for tools/test and tools/demo.  Source it, don't run it:
#     source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
#
# After sourcing: cwd is the repo root, .venv/bin is first on PATH, pyqcow is
# installed editable (compat mode: see below) with its [test] extras, and (when
# running as root) the system tools the tests use are installed:
#     qemu-img, qemu-io   <- qemu-utils
#     virt-xml-validate   <- libvirt-clients
#     xmllint             <- libxml2-utils (virt-xml-validate needs it silently)
#     fusermount3         <- fuse3 (pyqcow mount; libfuse3 comes with it)
#     qcowmount           <- libqcow-utils (libyal's FUSE mount: tools/bench read)
#     mkfs.ext2, mkfs.vfat <- e2fsprogs, dosfstools (guest file systems in the tests)
#     mkfs.xfs            <- xfsprogs (a reflink XFS on a loop device: tests/interop/test_reflink.py;
#                            filefrag comes with e2fsprogs)
# plus python3, python3-venv, and a C compiler with Python headers (gcc,
# libc6-dev, python3-dev) for the cffi helper, if those are missing.
#
# Quiet on success; on failure it says what failed, shows the log, exits non-zero.

set -euo pipefail

_pyqcow_die() {
    echo "tools/_setup.sh: error: $*" >&2
    exit 1
}

_pyqcow_show_log() {
    # $1 = log file; print its tail to stderr.
    echo "----- last lines of $1 -----" >&2
    tail -n 60 "$1" >&2 || true
    echo "-----" >&2
}

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export REPO_ROOT
cd "$REPO_ROOT"

# --- the interpreter -----------------------------------------------------------
# .venv is made from PYQCOW_PYTHON if set, else from the distribution's own python3
# (/usr/bin/python3) when it is >= 3.11, else from python3 on PATH.  The distribution's
# comes first because of how it is built: Debian's python3 is compiled with profile-
# guided and link-time optimisation and libpython linked in, a pyenv build by default
# with neither (and a shared libpython).  Measured here (tools/bench startup): Python's
# own start `python -S -c pass` 9.4 ms against 16.4 ms, and `pyqcow info` 25 ms against
# 41 ms, the difference being the same code run faster; the test suite ran ~20% faster.

_pyqcow_python() {
    # prints the interpreter to use; fails if there is none >= 3.11
    local py
    for py in "${PYQCOW_PYTHON:-}" /usr/bin/python3 "$(command -v python3 2>/dev/null || true)"; do
        [[ -n "$py" && -x "$py" ]] || continue
        if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
            echo "$py"
            return 0
        fi
        [[ -z "${PYQCOW_PYTHON:-}" || "$py" != "$PYQCOW_PYTHON" ]] \
            || _pyqcow_die "PYQCOW_PYTHON=$PYQCOW_PYTHON: not a Python >= 3.11"
    done
    return 1
}

# --- system packages ---------------------------------------------------------

_pyqcow_missing_pkgs() {
    local pkgs=()
    command -v qemu-img >/dev/null 2>&1 || pkgs+=(qemu-utils)
    command -v qemu-io >/dev/null 2>&1 || pkgs+=(qemu-utils)
    command -v virt-xml-validate >/dev/null 2>&1 || pkgs+=(libvirt-clients)
    command -v xmllint >/dev/null 2>&1 || pkgs+=(libxml2-utils)
    command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
    command -v qcowmount >/dev/null 2>&1 || pkgs+=(libqcow-utils)
    command -v mkfs.ext2 >/dev/null 2>&1 || pkgs+=(e2fsprogs)
    command -v mkfs.vfat >/dev/null 2>&1 || pkgs+=(dosfstools)
    command -v mkfs.xfs >/dev/null 2>&1 || pkgs+=(xfsprogs)
    local py
    if ! py="$(_pyqcow_python)"; then
        pkgs+=(python3 python3-venv python3-dev)
    else
        "$py" -c 'import ensurepip' >/dev/null 2>&1 || pkgs+=(python3-venv)
        "$py" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
            >/dev/null 2>&1 || pkgs+=(python3-dev)
    fi
    command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || pkgs+=(gcc libc6-dev)
    # libvirt's real QEMU driver for `pyqcow domain` (tests run an isolated embedded
    # instance) and what building libvirt-python needs
    command -v libvirtd >/dev/null 2>&1 || pkgs+=(libvirt-daemon)
    dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 || pkgs+=(libvirt-daemon-driver-qemu)
    command -v qemu-system-x86_64 >/dev/null 2>&1 || pkgs+=(qemu-system-x86)
    command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
    dpkg -s libvirt-dev >/dev/null 2>&1 || pkgs+=(libvirt-dev)
    # de-duplicate, keep order
    if ((${#pkgs[@]})); then
        printf '%s\n' "${pkgs[@]}" | awk '!seen[$0]++' | tr '\n' ' '
    fi
}

_pyqcow_pkgs="$(_pyqcow_missing_pkgs)"
if [[ -n "$_pyqcow_pkgs" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        _pyqcow_log="$(mktemp -t pyqcow-apt.XXXXXX)"
        # shellcheck disable=SC2086  # word splitting of the package list is intended
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q \
                && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                    $_pyqcow_pkgs; } >"$_pyqcow_log" 2>&1; then
            _pyqcow_show_log "$_pyqcow_log"
            _pyqcow_die "apt-get install $_pyqcow_pkgs failed"
        fi
        rm -f "$_pyqcow_log"
        _pyqcow_pkgs="$(_pyqcow_missing_pkgs)"
        [[ -z "$_pyqcow_pkgs" ]] || _pyqcow_die "still missing after apt-get: $_pyqcow_pkgs"
    else
        _pyqcow_msg="missing Debian packages: $_pyqcow_pkgs(run as root to install them, or: sudo apt-get install $_pyqcow_pkgs)"
        if [[ -n "${CI:-}" ]]; then
            _pyqcow_die "$_pyqcow_msg"
        fi
        echo "tools/_setup.sh: warning: $_pyqcow_msg; tests needing them will be skipped" >&2
    fi
fi

PYQCOW_PY="$(_pyqcow_python)" || _pyqcow_die "no Python >= 3.11 found (python3: $(python3 -V 2>&1))"

# libvirt's QEMU driver refuses to start without its user (Debian's build names
# libvirt-qemu; the tests' embedded instances run QEMU as root all the same)
if [[ "$(id -u)" == 0 ]] && ! id libvirt-qemu >/dev/null 2>&1 && command -v useradd >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin --user-group libvirt-qemu \
        || _pyqcow_die "cannot create the libvirt-qemu user"
fi

# --- virtualenv + editable install --------------------------------------------

VENV="$REPO_ROOT/.venv"
_pyqcow_stamp="$VENV/.pyqcow-install-stamp"

# Serialise concurrent runs (e.g. tools/test and tools/demo started together).
if command -v flock >/dev/null 2>&1; then
    exec 9<"$REPO_ROOT"
    flock 9
fi

_pyqcow_make_venv() {
    rm -rf "$VENV"
    "$PYQCOW_PY" -m venv "$VENV" >>"$_pyqcow_log" 2>&1 \
        && "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
        && echo "$PYQCOW_PY" >"$VENV/.pyqcow-python"
}

# (a .venv made from another interpreter is made again)
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.pyqcow-python" 2>/dev/null)" != "$PYQCOW_PY" ]]; then
    _pyqcow_log="$(mktemp -t pyqcow-venv.XXXXXX)"
    if ! _pyqcow_make_venv; then
        # Debian splits ensurepip out into python3-venv; install it and retry.
        if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1 \
            && { DEBIAN_FRONTEND=noninteractive apt-get update -q \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                     python3-venv; } >>"$_pyqcow_log" 2>&1 \
            && _pyqcow_make_venv; then
            :
        else
            _pyqcow_show_log "$_pyqcow_log"
            rm -rf "$VENV"
            _pyqcow_die "$PYQCOW_PY -m venv .venv failed (Debian: apt-get install python3-venv)"
        fi
    fi
    rm -f "$_pyqcow_log"
fi

# Extras: the test tools, FUSE and dfvfs; libvirt-python only where it can be built
# (libvirt-dev present).
_pyqcow_extras="test,fuse,forensics-test"
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libvirt 2>/dev/null; then
    _pyqcow_extras="$_pyqcow_extras,libvirt"
elif [[ -n "${CI:-}" ]]; then
    _pyqcow_die "libvirt-dev is missing: the libvirt extra cannot be built under CI"
fi

# Editable install in setuptools' "compat" mode: a plain path entry (.pth) for the
# repo, no import hook.  The default mode installs a finder module that site imports
# at every start of Python (pathlib, importlib.util, urllib.parse: ~20 ms, most of
# `pyqcow info`'s own start-up), a cost a user's wheel install never pays; the path
# entry costs nothing and measures what users get (tools/bench startup).
_pyqcow_editable_mode="compat"

# Hash of everything that decides what `pip install -e` builds.
_pyqcow_hash="$(
    {
        echo "extras: $_pyqcow_extras"
        echo "editable mode: $_pyqcow_editable_mode"
        "$VENV/bin/python" -c 'import sys; print(sys.version)'
        # (the launcher: pip copies it into .venv/bin at install time)
        for f in pyproject.toml setup.py setup.cfg tools/launcher/pyqcow; do
            if [[ -f "$f" ]]; then echo "== $f"; cat "$f"; fi
        done
        if [[ -d csrc ]]; then
            find csrc -type f ! -name '*.o' ! -name '*.so' -print | LC_ALL=C sort | while read -r f; do
                echo "== $f"
                cat "$f"
            done
        fi
    } | sha256sum | cut -d' ' -f1
)"

if [[ ! -f "$_pyqcow_stamp" || "$(cat "$_pyqcow_stamp")" != "$_pyqcow_hash" ]]; then
    _pyqcow_log="$(mktemp -t pyqcow-pip.XXXXXX)"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
            --config-settings "editable_mode=$_pyqcow_editable_mode" -e ".[$_pyqcow_extras]" \
            >"$_pyqcow_log" 2>&1; then
        _pyqcow_show_log "$_pyqcow_log"
        rm -f "$_pyqcow_stamp"
        _pyqcow_die "pip install -e '.[$_pyqcow_extras]' failed (full log: $_pyqcow_log)"
    fi
    # dfvfs pulls in libyal's libqcow-python, whose extension module is also called
    # pyqcow and would shadow this package: this package serves its API instead.
    if "$VENV/bin/python" -m pip show -q libqcow-python >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip uninstall --disable-pip-version-check -q -y libqcow-python \
            >>"$_pyqcow_log" 2>&1 || _pyqcow_die "pip uninstall libqcow-python failed"
    fi
    "$VENV/bin/python" -c 'import pyqcow, sys; sys.exit(not hasattr(pyqcow, "__path__"))' \
        || _pyqcow_die "'import pyqcow' does not load this package (is libqcow-python installed?)"
    rm -f "$_pyqcow_log"
    echo "$_pyqcow_hash" >"$_pyqcow_stamp"
fi

if command -v flock >/dev/null 2>&1; then
    flock -u 9
    exec 9<&-
fi

export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
hash -r
unset _pyqcow_pkgs _pyqcow_log _pyqcow_msg _pyqcow_hash _pyqcow_stamp _pyqcow_extras \
    _pyqcow_editable_mode
