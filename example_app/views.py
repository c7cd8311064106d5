"""HTTP endpoints: the upload page, start an analysis, poll its state, list reports."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, current_app, request
from sqlalchemy import select
from werkzeug.exceptions import RequestEntityTooLarge

from flask_tasks import states

from .extensions import db, tasks
from .models import Report
from .tasks import analyze_csv, read_header

logger = logging.getLogger(__name__)

bp = Blueprint("example", __name__)

#: Largest ``delay_per_chunk`` (seconds) a client may ask for.
MAX_DELAY = 1.0


def _read_request() -> tuple[str, str, float]:
    """``(text, filename, delay_per_chunk)`` from a file upload, a form or JSON.

    :raises ValueError: with a message for the client.
    """
    if request.is_json:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ValueError("Send a JSON object: {\"text\": \"a,b\\n1,2\", \"filename\": ...}.")
    else:
        data = request.form.to_dict()
        upload = request.files.get("file")
        if upload is not None and upload.filename:
            try:
                data["text"] = upload.read().decode("utf-8-sig")
            except UnicodeDecodeError:
                raise ValueError("The file is not UTF-8 text.") from None
            data.setdefault("filename", upload.filename)
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("No CSV given: upload a 'file', or send 'text' (form field or JSON).")
    read_header(text)  # the task checks it too; checking here answers 400 at once
    filename = str(data.get("filename") or "pasted.csv")[:255]
    try:
        delay = float(data.get("delay_per_chunk") or 0)
    except (TypeError, ValueError):
        delay = -1.0
    if not 0 <= delay <= MAX_DELAY:
        raise ValueError(f"delay_per_chunk must be a number of seconds from 0 to {MAX_DELAY}.")
    return text, filename, delay


@bp.errorhandler(RequestEntityTooLarge)
def too_large(exc: RequestEntityTooLarge) -> tuple[dict[str, str], int]:
    """Uploads over ``MAX_CONTENT_LENGTH`` get a JSON error, like every other error here."""
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    return {"error": f"The upload is too large (the limit is {limit:,} bytes)."}, 413


@bp.get("/")
def index() -> str:
    """The upload page."""
    return PAGE


@bp.post("/analyze")
def analyze() -> tuple[dict[str, Any], int]:
    """Start ``analyze_csv``; reply 202 with the task id to poll."""
    try:
        text, filename, delay = _read_request()
    except ValueError as exc:
        return {"error": str(exc)}, 400
    result = analyze_csv.delay(text, filename, delay_per_chunk=delay)
    logger.info("Started analysis of %s (%d characters): task %s", filename, len(text), result.id)
    return {"task_id": result.id}, 202


@bp.get("/tasks/<task_id>")
def task_status(task_id: str) -> dict[str, Any]:
    """The state of a task, with its progress, result or error."""
    result = tasks.AsyncResult(task_id)
    state = result.state
    body: dict[str, Any] = {"task_id": task_id, "state": state,
                            "progress": None, "result": None, "error": None}
    if state == "PROGRESS":
        info = result.info  # the meta given to update_state()
        if isinstance(info, dict):
            body["progress"] = {"done": info.get("done"), "total": info.get("total")}
    elif state == states.SUCCESS:
        body["result"] = result.result
    elif state in states.PROPAGATE_STATES:  # FAILURE, REVOKED: the result is the exception
        exc = result.result
        body["error"] = (f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException)
                         else str(exc))
    elif state == states.PENDING:
        # Stored results expire (TASKS_RESULT_EXPIRES, a day by default), but the
        # report the task wrote stays: it is the task's result.
        report = db.session.scalars(select(Report).filter_by(task_id=task_id)).first()
        if report is not None:
            body.update(state=states.SUCCESS, result=report.to_dict())
    return body


@bp.get("/reports")
def reports() -> dict[str, Any]:
    """The stored reports, newest first."""
    rows = db.session.scalars(select(Report).order_by(Report.id.desc()).limit(100))
    return {"reports": [report.to_dict() for report in rows]}


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>CSV analysis — flask_tasks example</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
         padding: 0 1rem; }
  textarea { width: 100%; height: 8rem; font-family: monospace; }
  progress { width: 100%; height: 1.2rem; }
  table { border-collapse: collapse; margin-top: .5rem; }
  th, td { border: 1px solid #ccc; padding: .2rem .6rem; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  .error { color: #b00; }
</style>
</head>
<body>
<h1>CSV analysis</h1>
<p>Upload a CSV file (or paste CSV text); a background task computes statistics of its
numeric columns while this page polls <code>/tasks/&lt;id&gt;</code>.
Past results: <a href="reports">/reports</a>.</p>
<form id="form">
  <p><input type="file" name="file" accept=".csv,text/csv"></p>
  <p><textarea name="text"
      placeholder="…or paste CSV here: a header line, then rows"></textarea></p>
  <p><label>Slow motion: <input type="number" name="delay_per_chunk" value="0.2" min="0"
     max="1" step="0.1"> seconds per 200 rows</label>
     <button type="submit">Analyze</button></p>
</form>
<p id="state"></p>
<progress id="bar" max="1" value="0" hidden></progress>
<div id="output"></div>
<script>
const form = document.getElementById("form");
const stateLine = document.getElementById("state");
const bar = document.getElementById("bar");
const output = document.getElementById("output");

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

function showError(text) {
  bar.hidden = true;
  output.replaceChildren(cell("p", text));
  output.firstChild.className = "error";
}

function showStats(result) {
  output.replaceChildren(cell("p", `${result.filename}: ${result.rows} rows, ` +
    `${result.columns.length} columns (report #${result.report_id}).`));
  if (Object.keys(result.stats).length === 0) {
    output.appendChild(cell("p", "No statistics: no column holds numbers " +
      `(${result.columns.join(", ")}). Statistics are computed for numeric columns only.`));
    output.lastChild.id = "no-stats";
    return;
  }
  const names = ["column", "count", "sum", "min", "max", "mean", "non-numeric"];
  const table = document.createElement("table");
  const head = table.insertRow();
  names.forEach(name => head.appendChild(cell("th", name)));
  for (const column of result.columns.filter(name => name in result.stats)) {  // file order
    const s = result.stats[column];
    const row = table.insertRow();
    [column, s.count, s.sum, s.min, s.max, s.mean.toFixed(3), s.non_numeric]
      .forEach(value => row.appendChild(cell("td", String(value))));
  }
  output.appendChild(table);
}

async function getJson(url, options) {
  const reply = await fetch(url, options);
  try {
    return [reply, await reply.json()];
  } catch {
    return [reply, {error: `The server answered ${reply.status} ${reply.statusText}.`}];
  }
}

async function poll(taskId) {
  let reply;
  try {
    reply = (await getJson(`tasks/${taskId}`))[1];
  } catch (error) {
    stateLine.textContent = `Task ${taskId}: state unknown`;
    showError(`Lost contact with the web app (${error.message}); is it still running?`);
    return;
  }
  stateLine.textContent = `Task ${taskId}: ${reply.state}`;
  if (reply.progress && reply.progress.total) {
    bar.max = reply.progress.total;
    bar.value = reply.progress.done;
    stateLine.textContent += ` (${reply.progress.done} / ${reply.progress.total} rows)`;
  }
  if (reply.state === "SUCCESS") {
    bar.max = 1; bar.value = 1;
    showStats(reply.result);
  } else if (reply.error) {
    showError(reply.error);
  } else {
    setTimeout(() => poll(taskId), 300);
  }
}

form.addEventListener("submit", async event => {
  event.preventDefault();
  const data = new FormData(form);
  const file = data.get("file");
  const body = file && file.name ? data : JSON.stringify({
    text: data.get("text"), filename: "pasted.csv", delay_per_chunk: data.get("delay_per_chunk")});
  const headers = body === data ? {} : {"Content-Type": "application/json"};
  output.replaceChildren();
  bar.hidden = false; bar.max = 1; bar.value = 0;
  let reply, json;
  try {
    [reply, json] = await getJson("analyze", {method: "POST", body, headers});
  } catch (error) {
    showError(`Could not reach the web app (${error.message}); is it still running?`);
    return;
  }
  if (!reply.ok) {
    stateLine.textContent = "";
    showError(json.error);
    return;
  }
  poll(json.task_id);
});
</script>
</body>
</html>
"""
