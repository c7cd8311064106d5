"""Call options: declared once, resolved once (the call's, else the task's, else the config's)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_tasks import Task, Tasks
from flask_tasks.config import Config
from flask_tasks.options import (
    CALL_OPTIONS,
    ResolvedOptions,
    check_call_options,
    resolve,
    retry_options,
    time_limits,
)
from flask_tasks.protocol import Context

CONFIG = Config(serializer="json", compression="zlib", default_priority=9, ignore_result=False,
                publish_retry=True, time_limit=30.0, soft_time_limit=20.0)


def task_with(**attrs: Any) -> Task[Any, Any]:
    task: Task[Any, Any] = Task()
    for name, value in attrs.items():
        setattr(task, name, value)
    return task


#: option, the call's value, the task's value, the field it ends in, what the config gives.
FALLBACKS = [
    ("serializer", "yaml", "msgpack", "serializer", "json"),
    ("compression", "gzip", "bzip2", "compression", "zlib"),
    ("priority", 1, 5, "priority", 9),
    ("ignore_result", False, True, "ignore_result", False),
    ("queue", "call-q", "task-q", "queue", None),
    ("time_limit", 3.0, 4.0, "time_limit", None),  # the worker applies the config's
    ("soft_time_limit", 1.0, 2.0, "soft_time_limit", None),
]


@pytest.mark.parametrize(("option", "call", "task", "field", "config"), FALLBACKS)
def test_call_beats_task_beats_config(option: str, call: Any, task: Any, field: str,
                                      config: Any) -> None:
    def resolved(options: dict[str, Any], attrs: dict[str, Any]) -> Any:
        return getattr(resolve(options, task_with(**attrs), CONFIG), field)  # type: ignore[arg-type]

    assert resolved({option: call}, {option: task}) == call
    assert resolved({}, {option: task}) == task
    assert resolved({option: None}, {option: task}) == task  # None means "not given"
    assert resolved({}, {}) == config
    assert getattr(resolve({}, None, CONFIG), field) == config  # sent by name: no task


def test_ignore_result_false_in_the_call_beats_true_in_the_task() -> None:
    config = CONFIG.replace(ignore_result=True)
    assert resolve({"ignore_result": False}, task_with(ignore_result=True), config) \
        .ignore_result is False
    assert resolve({}, task_with(ignore_result=False), config).ignore_result is False
    assert resolve({}, None, config).ignore_result is True


def test_expires_call_beats_task() -> None:
    now = datetime.now(UTC)
    called = resolve({"expires": 10}, task_with(expires=1000), CONFIG).expires
    from_task = resolve({}, task_with(expires=1000), CONFIG).expires
    assert called is not None and from_task is not None
    assert now + timedelta(seconds=9) < called < now + timedelta(seconds=60) < from_task
    assert resolve({}, None, CONFIG).expires is None


def test_publish_retry_and_policy_over_config() -> None:
    assert resolve({"retry": False}, None, CONFIG).retry is False
    assert resolve({}, None, CONFIG).retry is True
    policy = resolve({"retry_policy": {"max_retries": 9}}, None, CONFIG).retry_policy
    assert policy == {**CONFIG.publish_retry_policy, "max_retries": 9}


def test_countdown_beats_eta_and_links_become_lists() -> None:
    eta = datetime(2030, 1, 1, tzinfo=UTC)
    soon = resolve({"countdown": 5, "eta": eta}, None, CONFIG).eta
    assert soon is not None and soon < eta
    assert resolve({"eta": datetime(2030, 1, 1)}, None, CONFIG).eta == eta  # naive is UTC
    call = resolve({"link": {"task": "a"}, "link_error": [{"task": "b"}]}, None, CONFIG)
    assert call.callbacks == [{"task": "a"}] and call.errbacks == [{"task": "b"}]


def test_parent_and_root_come_from_the_running_request() -> None:
    parent = Context(id="p", task="t", root_id="r")
    call = resolve({}, None, CONFIG, parent)
    assert (call.parent_id, call.root_id) == ("p", "r")
    assert resolve({"parent_id": "x", "root_id": "y"}, None, CONFIG, parent).parent_id == "x"
    direct = Context(id="d", task="t", called_directly=True)
    assert resolve({}, None, CONFIG, direct).parent_id is None


def test_the_message_carries_the_resolved_options() -> None:
    call = resolve({"task_id": "abc", "time_limit": 3.0, "headers": {"x-a": 1}},
                   task_with(ignore_result=True, soft_time_limit=2.0), CONFIG)
    assert isinstance(call, ResolvedOptions)
    message = call.message("t.name", (1,), {})
    assert message.task_id == "abc" and message.headers["timelimit"] == [3.0, 2.0]
    assert message.headers["ignore_result"] is True and message.headers["x-a"] == 1


def test_unknown_option_is_a_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match=r"Unknown apply_async option\(s\): \['contdown'\] "
                                        r"\(did you mean 'countdown'\?\)"):
        resolve({"contdown": 5}, None, CONFIG)  # type: ignore[typeddict-unknown-key]
    with pytest.raises(TypeError, match=r"\['zzz'\]$"):
        check_call_options({"zzz": 1})
    check_call_options({name: None for name in CALL_OPTIONS})


def test_apply_async_and_send_task_refuse_unknown_options(tmp_path: Path) -> None:
    tasks = Tasks()
    app = Flask("options_app", instance_path=str(tmp_path))
    app.config.update(RESULT_BACKEND="disabled", BROKER_URL="memory://")
    tasks.init_app(app)
    sent: list[Any] = []
    tasks.state(app).publisher.publish = (  # type: ignore[method-assign]
        lambda message, queue, **kw: sent.append(kw))

    @tasks.task(name="options.one")
    def one(x: int) -> int:
        return x

    with app.app_context():
        with pytest.raises(TypeError, match="'qeue'"):
            one.apply_async((1,), qeue="hipri")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="'prio'"):
            tasks.send_task("options.one", (1,), prio=3)  # type: ignore[call-arg]
        assert sent == []
        one.apply_async((1,), priority=2, retry=False)
        tasks.send_task("options.one", (1,))
    assert [(kw["priority"], kw["retry"]) for kw in sent] == [(2, False), (None, True)]


def test_retry_options_keep_the_call_and_refuse_their_own_keys() -> None:
    request = Context(id="i", task="t", retries=1, root_id="r", parent_id="p",
                      timelimit=(9.0, 8.0), delivery_info={"routing_key": "hipri"},
                      reply_to="caller-oid")
    again = retry_options(request, 2, 10.0, None, {"priority": 3})
    assert again == {"task_id": "i", "retries": 2, "expires": None, "time_limit": 9.0,
                     "soft_time_limit": 8.0, "root_id": "r", "parent_id": "p",
                     "reply_to": "caller-oid",  # rpc:// states still go to the first caller
                     "queue": "hipri", "priority": 3, "countdown": 10.0, "eta": None}
    assert retry_options(request, 2, 10.0, None, {"queue": "other"})["queue"] == "other"
    with pytest.raises(TypeError, match=r"\['task_id'\]"):
        retry_options(request, 2, 10.0, None, {"task_id": "other"})


def test_time_limits_message_beats_task_beats_worker() -> None:
    task = task_with(time_limit=5.0, soft_time_limit=4.0)
    assert time_limits(task, [7, 6], CONFIG) == (7.0, 6.0)
    assert time_limits(task, [None, None], CONFIG) == (5.0, 4.0)
    assert time_limits(task_with(), None, CONFIG) == (30.0, 20.0)
    assert time_limits(task_with(), None, Config()) == (None, None)
