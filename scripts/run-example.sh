#!/usr/bin/env bash
# Run the example app: a flask_tasks worker and the web app, both on the embedded
# broker and result backend (no Redis needed). The script lasts as long as the web
# app; on exit or Ctrl-C it stops the web app and warm-stops the worker (SIGTERM:
# running tasks finish first; a second Ctrl-C stops it at once).
#
# Environment: PORT (default 5000), PYTHON (default python3),
# EXAMPLE_INSTANCE_PATH (default ./instance: the app database and the queue files).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
PORT=${PORT:-5000}
unset BROKER_URL RESULT_BACKEND  # always the embedded default here

if ! "$PYTHON" -c "import flask_tasks, flask_sqlalchemy" 2>/dev/null; then
    echo "Installing flask_tasks and its dependencies (pip install -e .) ..."
    "$PYTHON" -m pip install --quiet -e . || {
        echo "pip install failed; try it in a virtualenv:" >&2
        echo "  $PYTHON -m venv .venv && . .venv/bin/activate && $0" >&2
        exit 1
    }
fi

WORKER_PID= WEB_PID=
stop() {
    trap - EXIT
    trap 'kill -TERM "$WORKER_PID" 2>/dev/null || true' INT TERM  # again: cold shutdown
    if [[ -n $WEB_PID ]]; then
        kill -TERM "$WEB_PID" 2>/dev/null || true
        wait "$WEB_PID" 2>/dev/null || true
    fi
    if [[ -n $WORKER_PID ]] && kill -0 "$WORKER_PID" 2>/dev/null; then
        echo "Stopping the worker (running tasks finish first) ..."
        kill -TERM "$WORKER_PID"
        while kill -0 "$WORKER_PID" 2>/dev/null; do wait "$WORKER_PID" || true; done
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Both run in their own process groups (set -m): a Ctrl-C reaches only this script,
# which then stops each of them once, with SIGTERM.
set -m
"$PYTHON" -m flask --app example_app tasks worker -c 2 </dev/null &
WORKER_PID=$!
"$PYTHON" -m flask --app example_app run --port "$PORT" </dev/null &
WEB_PID=$!
set +m

cat <<EOF

  Open http://127.0.0.1:$PORT/ in a browser, or try:

    curl -F file=@example_app/sample.csv localhost:$PORT/analyze
    curl localhost:$PORT/tasks/<task_id>

  Ctrl-C stops the web app and the worker.

EOF
wait "$WEB_PID"
