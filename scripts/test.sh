#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first:
# redis-server (from the system's packages) and the project with its test extra.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "Installing redis-server ..."
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        brew install redis
    else
        echo "Please install redis-server (the integration tests start their own)." >&2
        exit 1
    fi
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
"$PYTHON" -m mypy
"$PYTHON" -m pytest "$@"
