#!/usr/bin/env bash
# Install everything the test suite needs, then run it. The README's test command; CI runs it via .ci/run.
#   bash scripts/test.sh [pytest args...]
# As root on Debian it also installs the packages the real-Slurm tests need (.ci/apt-packages.txt); without them
# those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=$(while read -r pkg; do [ -n "$pkg" ] && ! dpkg -s "$pkg" >/dev/null 2>&1 && echo "$pkg"; done \
              < .ci/apt-packages.txt || true)
    if [ -n "$missing" ]; then
        echo "installing Debian packages: $missing"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# torch 2.13.0 first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
