#!/usr/bin/env bash
# Run the example app: a flask_tasks worker and the web app, both on the embedded
# broker and result backend (no Redis needed).
#
# Installs the package first if it cannot be imported (`pip install -e .`; into a new
# ./.venv when the Python at hand refuses installs). Each process logs to its own file
# in the instance folder, shown here line by line ("worker | ...", "web | ...").
# If either process exits, the script stops the other, says which one died and where
# its log is, and exits non-zero: it never serves a half-dead system. Ctrl-C (or
# SIGTERM) stops the web app and warm-stops the worker (running tasks finish first;
# a second Ctrl-C stops it at once); the script then exits 130 (143).
#
# Environment: PORT (default 5000), PYTHON (default ./.venv/bin/python if it exists,
# else python3), EXAMPLE_INSTANCE_PATH (default ./instance: the app database, the
# queue files and the logs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=${PORT:-5000}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
unset BROKER_URL RESULT_BACKEND CELERY_BROKER_URL CELERY_RESULT_BACKEND  # embedded default
export EXAMPLE_INSTANCE_PATH=${EXAMPLE_INSTANCE_PATH:-$PWD/instance}
mkdir -p "$EXAMPLE_INSTANCE_PATH"
WORKER_LOG=$EXAMPLE_INSTANCE_PATH/worker.log
WEB_LOG=$EXAMPLE_INSTANCE_PATH/web.log

importable() {  # the worker's imports too: they reach kombu's transports
    "$PYTHON" -c "import flask_tasks.worker.main, flask_sqlalchemy" 2>/dev/null
}
install() {
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -e .
}
if ! importable; then
    if "$PYTHON" -c "import flask_tasks" 2>/dev/null; then
        echo "flask_tasks is installed, but its worker cannot be imported:"
        "$PYTHON" -c "import flask_tasks.worker.main, flask_sqlalchemy" 2>&1 | tail -n 1 || true
        echo "Reinstalling it with its dependencies (pip install -e .) ..."
    else
        echo "Installing flask_tasks and its dependencies (pip install -e .) ..."
    fi
    if ! install; then
        if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
            echo "pip install failed in the virtualenv of $PYTHON (see above)." >&2
            exit 1
        fi
        echo "Installing into a new virtualenv, ./.venv, instead ..."
        "$PYTHON" -m venv .venv || {
            echo "Could not create ./.venv (on Debian/Ubuntu: apt-get install python3-venv)." >&2
            exit 1
        }
        PYTHON=.venv/bin/python
        install || { echo "pip install failed in ./.venv (see above)." >&2; exit 1; }
    fi
    importable || {
        echo "flask_tasks is installed but its worker cannot be imported:" >&2
        "$PYTHON" -c "import flask_tasks.worker.main, flask_sqlalchemy" >&2 || true
        exit 1
    }
fi

WORKER_PID= WEB_PID=
stop() {
    trap - EXIT
    trap 'kill -TERM "$WORKER_PID" 2>/dev/null || true' INT TERM  # again: cold shutdown
    if [[ -n $WEB_PID ]] && kill -0 "$WEB_PID" 2>/dev/null; then
        kill -TERM "$WEB_PID" 2>/dev/null || true
    fi
    [[ -z $WEB_PID ]] || wait "$WEB_PID" 2>/dev/null || true
    if [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        echo "Stopping the worker (running tasks finish first) ..."
        kill -TERM "$WORKER_PID"
    fi
    while [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; do
        wait "$WORKER_PID" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOG COMMAND...: run COMMAND in the background, its output in LOG and
# here, each line prefixed with NAME.
start() {
    local name=$1 log=$2
    shift 2
    "$@" </dev/null > >(exec tee "$log" | exec sed -u "s/^/$name | /") 2>&1 &
}

# Both run in their own process groups (set -m): a Ctrl-C reaches only this script,
# which then stops each of them once, with SIGTERM.
set -m
start "worker" "$WORKER_LOG" "$PYTHON" -m flask --app example_app tasks worker -c 2
WORKER_PID=$!
start "web   " "$WEB_LOG" "$PYTHON" -m flask --app example_app run --port "$PORT"
WEB_PID=$!
set +m

# died: if the worker or the web app has exited, say which and exit non-zero
# (the EXIT trap then stops the other one).
died() {
    local name pid log status how
    for name in worker "web app"; do
        if [[ $name == worker ]]; then pid=$WORKER_PID log=$WORKER_LOG
        else pid=$WEB_PID log=$WEB_LOG; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            if [[ $name == worker ]]; then WORKER_PID=; else WEB_PID=; fi
            how="status $status"
            if ((status > 128)); then how="killed by SIG$(kill -l $((status - 128)))"; fi
            echo >&2
            echo "The $name exited ($how), so the example is stopped." >&2
            echo "Its log: $log" >&2
            exit 1
        fi
    done
}

# Wait until the web app answers and the worker is ready (or one of them dies).
for _ in $(seq 600); do
    died
    if grep -q " ready\.$" "$WORKER_LOG" 2>/dev/null \
            && grep -q "Running on http" "$WEB_LOG" 2>/dev/null; then
        break
    fi
    sleep 0.1
done

cat <<EOF

  Ready. Open http://127.0.0.1:$PORT/ in a browser, or try:

    curl -F file=@example_app/sample.csv localhost:$PORT/analyze
    curl localhost:$PORT/tasks/<task_id>

  worker: pid $WORKER_PID, log $WORKER_LOG
  web:    pid $WEB_PID, log $WEB_LOG
  Ctrl-C stops the web app and the worker.

EOF
while true; do
    wait -n "$WORKER_PID" "$WEB_PID" 2>/dev/null || true
    died
done
