#!/usr/bin/env bash
# Run the whole test suite, installing what it needs first:
# redis-server, rabbitmq-server and Chromium (from the system's packages) and the project
# with its test extra. It also installs the project alone into a fresh virtualenv (a test does).
# Then the checks (ruff, mypy --strict, the import-linter layer contracts) and pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}

# System packages the integration tests use: redis-server and rabbitmq-server (started
# by the tests on free ports; the package's own service is not used: in a container its
# postinst is denied the start by policy-rc.d, which is fine) and Chromium (the example
# page is tested in a real browser).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if command -v apt-get >/dev/null 2>&1; then
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
fi
command -v chromium >/dev/null 2>&1 || command -v brew >/dev/null 2>&1 || missing+=(chromium)
if ((${#missing[@]})); then
    echo "Installing ${missing[*]} ..."
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    elif command -v brew >/dev/null 2>&1; then
        # the browser tests find no Chromium there and are skipped, the RabbitMQ ones
        # find no Debian rabbitmq-server (/usr/lib/rabbitmq/bin) and are skipped too
        brew install redis
    else
        echo "Please install ${missing[*]} (the integration tests need them)." >&2
        exit 1
    fi
fi

"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "ruff:" && "$PYTHON" -m ruff check flask_tasks tests bench example_app
echo "mypy --strict:" && "$PYTHON" -m mypy
echo "lint-imports:" && "$PYTHON" -c \
    "import sys; from importlinter.cli import lint_imports_command as lint; sys.exit(lint())" \
    --no-cache
"$PYTHON" -m pytest "$@"
