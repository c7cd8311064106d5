"""Canvas in-process: signatures as Celery's dicts, partials, composition, argument
checks, the wire fields of built messages, and eager mode through encoded messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from kombu.serialization import loads

from flask_tasks import (
    EagerResult,
    GroupResult,
    Signature,
    Task,
    Tasks,
    chain,
    chord,
    group,
    signature,
    states,
)
from flask_tasks.canvas.callbacks import takes_request
from flask_tasks.protocol import Context

tasks = Tasks()
seen: list[Any] = []


@tasks.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@tasks.task(name="canvas.mul")
def mul(x: int, y: int) -> int:
    return x * y


@tasks.task(name="canvas.xsum")
def xsum(numbers: list[int]) -> int:
    return sum(numbers)


@tasks.task(name="canvas.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@tasks.task(name="canvas.record")
def record(value: Any, tag: str = "") -> None:
    seen.append(("record", value, tag))


@tasks.task(name="canvas.on_error")
def on_error(request: Any, exc: BaseException, traceback: str) -> None:
    seen.append(("on_error", request.id, type(exc).__name__, "ValueError" in traceback))


@tasks.task(name="canvas.on_error_id")
def on_error_id(task_id: str) -> None:
    seen.append(("on_error_id", task_id))


@tasks.task(name="canvas.bound_errback", bind=True)
def bound_errback(self: Task, task_id: str) -> None:
    seen.append(("bound_errback", task_id))


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """Publishes nowhere: each message is kept (encoded) for :func:`sent` to read."""
    app = Flask("canvas_app", instance_path=str(tmp_path))
    app.config.update(BROKER_URL="memory://canvas", RESULT_BACKEND="disabled")
    tasks.init_app(app)
    published: list[Any] = []
    monkeypatch.setattr(tasks.state(app).publisher, "publish",
                        lambda message, queue, **kw: published.append(message))
    app.extensions["published"] = published
    seen.clear()
    with app.app_context():
        yield app


@pytest.fixture()
def eager(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("canvas_eager", instance_path=str(tmp_path))
    app.config.update(TASKS_ALWAYS_EAGER=True, RESULT_BACKEND="disabled")
    tasks.init_app(app)
    seen.clear()
    with app.app_context():
        yield app


def sent(app: Flask) -> list[tuple[dict[str, Any], list[Any]]]:
    """(headers, decoded body) of every message published since the last call, in order."""
    published = app.extensions["published"]
    out = [(m.headers, loads(m.body, m.content_type, m.content_encoding)) for m in published]
    published.clear()
    return out


# -- signatures as Celery's dicts ---------------------------------------------------


def test_signature_is_celerys_dict() -> None:
    sig = add.s(2, 2)
    assert isinstance(sig, dict) and isinstance(sig, Signature)
    assert dict(sig) == {"task": "canvas.add", "args": (2, 2), "kwargs": {}, "options": {},
                         "subtask_type": None, "immutable": False}
    assert add.si(1, 2)["immutable"] is True
    assert add.signature((2, 5), countdown=10).options == {"countdown": 10}
    assert signature("canvas.add", args=(2, 2), queue="q") == {
        "task": "canvas.add", "args": (2, 2), "kwargs": {}, "options": {"queue": "q"},
        "subtask_type": None, "immutable": False}


def test_json_round_trip_keeps_the_class() -> None:
    flow = add.s(2, 2) | mul.s(8)
    flow.link_error(on_error.s())
    back = signature(json.loads(json.dumps(flow)))
    assert isinstance(back, chain) and [t.task for t in back.tasks] == ["canvas.add", "canvas.mul"]
    assert back.tasks[0].args == (2, 2)
    g = signature(json.loads(json.dumps(group(add.s(1, 1), add.s(2, 2)))))
    assert isinstance(g, group) and len(g.tasks) == 2 and isinstance(g.tasks[0], Signature)
    m = signature(json.loads(json.dumps(xsum.map([[1, 2]]))))
    assert m.task == "celery.map" and m.subtask_type == "xmap"


def test_partials_immutable_clone_set() -> None:
    sig = add.s(2)
    assert sig._merge((5,), {})[0] == (5, 2)  # call-time arguments first, as Celery
    clone = sig.clone((1,), queue="q")
    assert clone.args == (1, 2) and clone.options == {"queue": "q"} and sig.args == (2,)
    imm = add.si(2, 3)
    assert imm._merge((99,), {})[0] == (2, 3)
    assert sig.set(countdown=3) is sig and sig.options == {"countdown": 3}
    sig.set(immutable=True)
    assert sig.immutable
    assert repr(add.s(1, y=2)) == "canvas.add(1, y=2)"


def test_link_and_freeze() -> None:
    sig = add.s(1, 1)
    callback = mul.s(3)
    assert sig.link(callback) is callback and sig.options["link"] == [callback]
    sig.link_error(on_error.s())
    assert sig.options["link_error"][0]["task"] == "canvas.on_error"
    result = add.s(1, 1).freeze()
    assert result.id  # an id now, fixed in the options
    frozen = add.s(1, 1)
    frozen.freeze("abc")
    assert frozen.id == "abc" and frozen.freeze("other").id == "abc"


def test_or_composes_flat_chains() -> None:
    flow = add.s(1, 1) | mul.s(2) | mul.s(3)
    assert isinstance(flow, chain) and [t.task for t in flow.tasks] == [
        "canvas.add", "canvas.mul", "canvas.mul"]
    both = (add.s(1, 1) | mul.s(2)) | (mul.s(3) | mul.s(4))
    assert len(both.tasks) == 4
    assert chain([add.s(1, 1), mul.s(2)]) == chain(add.s(1, 1), mul.s(2))


def test_arguments_are_checked_as_delay_checks_them(app: Flask) -> None:
    with pytest.raises(TypeError, match="canvas.add"):
        add.s(1, 2, 3)  # too many, whatever comes later
    with pytest.raises(TypeError, match="canvas.add"):
        add.s(z=1)
    with pytest.raises(TypeError, match="canvas.add"):
        add.si(1)  # immutable: complete now
    with pytest.raises(TypeError, match="canvas.add"):
        add.s(1).delay()  # completed at call time, still one short
    with pytest.raises(TypeError, match="canvas.add"):
        signature("canvas.add", args=(1,)).delay()  # by name: the registered task checks
    with pytest.raises(TypeError, match="link"):
        add.apply_async((1, 2), link="canvas.mul")  # type: ignore[typeddict-item]
    with pytest.raises(TypeError, match="quue"):
        add.s(1, 2).set(quue="x").delay()


def test_chord_travels_in_the_chord_field(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    published = app.extensions["published"]
    sizes: list[tuple[str, int, int]] = []
    monkeypatch.setattr(tasks.state(app).backend, "set_chord_size",
                        lambda gid, n: sizes.append((gid, n, len(published))))
    result = chord([add.s(1, 1), add.s(2, 2)])(xsum.s())
    gid = result.parent.id
    assert isinstance(result.parent, GroupResult) and sizes == [(gid, 2, 0)]  # before sending
    messages = sent(app)
    assert [h["task"] for h, _ in messages] == ["canvas.add", "canvas.add"]
    for index, (headers, (_, _, embed)) in enumerate(messages):
        assert headers["group"] == gid and headers["group_index"] == index
        assert headers["id"] == result.parent.results[index].id
        assert embed["chord"]["task"] == "canvas.xsum"
        assert embed["chord"]["options"]["task_id"] == result.id
        assert embed["chain"] is None
    again = chord([add.s(1, 1)], xsum.s())()  # chord(header, body)()
    [(_, (_, _, embed))] = sent(app)
    assert embed["chord"]["options"]["task_id"] == again.id != result.id
    with pytest.raises(NotImplementedError, match="chord"):
        group(add.s(1, 1)).link(xsum.s())


def test_group_then_task_in_a_chain_sends_a_chord(app: Flask,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks.state(app).backend, "set_chord_size", lambda gid, n: None)
    result = (group(add.s(1, 1), add.s(2, 2)) | xsum.s() | mul.s(2)).delay()
    messages = sent(app)
    assert len(messages) == 2
    body = messages[0][1][2]["chord"]
    assert body["subtask_type"] == "chain"
    assert [t["task"] for t in body["kwargs"]["tasks"]] == ["canvas.xsum", "canvas.mul"]
    assert body["kwargs"]["tasks"][-1]["options"]["task_id"] == result.id


def test_eager_chord(eager: Flask) -> None:
    assert chord(add.s(i, i) for i in range(10))(xsum.s()).get() == 90
    assert (group(add.s(1, 1), add.s(2, 2)) | xsum.s() | mul.s(2))().get() == 12
    failed = chord([add.s(1, 1), fail.s("boom")], xsum.s())()
    with pytest.raises(ValueError, match="boom"):
        failed.get()


# -- the wire -------------------------------------------------------------------------


def test_partial_delay_and_link_fields(app: Flask) -> None:
    result = add.s(2).delay(5)
    [(headers, body)] = sent(app)
    assert headers["id"] == result.id and body[0] == [5, 2]
    add.apply_async((1, 2), link=mul.s(3), link_error=on_error.s())
    [(_, (_, _, embed))] = sent(app)
    assert embed["callbacks"][0]["task"] == "canvas.mul" and embed["callbacks"][0]["args"] == [3]
    assert embed["errbacks"][0]["task"] == "canvas.on_error"
    assert embed["chain"] is None and embed["chord"] is None


def test_chain_travels_reversed_in_the_chain_field(app: Flask) -> None:
    result = chain(add.s(4, 4), mul.s(8), mul.s(2))()
    [(headers, (args, _, embed))] = sent(app)
    assert headers["task"] == "canvas.add" and args == [4, 4]
    steps = embed["chain"]
    assert [s["task"] for s in steps] == ["canvas.mul", "canvas.mul"]
    assert steps[0]["args"] == [2] and steps[1]["args"] == [8]  # reversed: the worker pops
    # the result is the LAST task's, parents lead back to the first (celery#3137)
    assert result.id == steps[0]["options"]["task_id"]
    assert result.parent.id == steps[1]["options"]["task_id"]
    assert result.parent.parent.id == headers["id"] and result.parent.parent.parent is None


def test_group_sets_group_id_and_index(app: Flask) -> None:
    result = group(add.s(i, i) for i in range(3))()
    assert isinstance(result, GroupResult) and len(result.results) == 3
    messages = sent(app)
    assert [h["group"] for h, _ in messages] == [result.id] * 3
    assert [h["group_index"] for h, _ in messages] == [0, 1, 2]
    assert [h["id"] for h, _ in messages] == [r.id for r in result.results]
    partial = group(add.s(1), add.s(2)).delay(10)
    assert [b[0] for _, b in sent(app)] == [[10, 1], [10, 2]] and len(partial) == 2


def test_map_starmap_chunks_use_celerys_task_names(app: Flask) -> None:
    xsum.map([[1, 2], [3, 4]]).delay()
    [(headers, (args, kwargs, _))] = sent(app)
    assert headers["task"] == "celery.map" and args == []
    assert kwargs["task"]["task"] == "canvas.xsum" and kwargs["it"] == [[1, 2], [3, 4]]
    add.starmap([(1, 2)]).delay()
    assert sent(app)[0][0]["task"] == "celery.starmap"
    result = add.chunks(zip(range(5), range(5), strict=True), 2).delay()
    messages = sent(app)
    assert [h["task"] for h, _ in messages] == ["celery.starmap"] * 3
    assert [b[1]["it"] for _, b in messages] == [[[0, 0], [1, 1]], [[2, 2], [3, 3]], [[4, 4]]]
    assert isinstance(result, GroupResult)


def test_builtins_are_registered_in_every_app(app: Flask) -> None:
    state = tasks.state(app)
    assert {"celery.map", "celery.starmap", "celery.chunks"} <= {
        n for n in ("celery.map", "celery.starmap", "celery.chunks") if state.get_task(n)}
    assert "celery.map" not in state.task_names()  # not listed with the app's own


# -- eager mode ----------------------------------------------------------------------


def test_eager_chain_group_and_maps(eager: Flask) -> None:
    result = chain(add.s(4, 4), mul.s(8))()
    assert isinstance(result, EagerResult) and result.get() == 64
    assert result.parent is not None and result.parent.get() == 8
    assert (add.s(2, 2) | mul.s(8) | mul.s(2)).delay().get() == 64
    assert group(add.s(i, i) for i in range(10))().get() == [i + i for i in range(10)]
    assert xsum.map([[1, 2], [3, 4]]).delay().get() == [3, 7]
    assert add.starmap(zip(range(3), range(3), strict=True)).delay().get() == [0, 2, 4]
    assert add.chunks(zip(range(6), range(6), strict=True), 2).delay().get() == [
        [0, 2], [4, 6], [8, 10]]
    assert add.s(2).delay(5).get() == 7
    assert add.s(2).apply((5,)).get() == 7


def test_eager_link_and_both_errback_conventions(eager: Flask) -> None:
    add.apply_async((2, 2), link=record.s(tag="linked"))
    assert seen == [("record", 4, "linked")]
    seen.clear()
    add.apply_async((2, 2), link=record.si("fixed"))
    assert seen == [("record", "fixed", "")]
    seen.clear()
    result = fail.apply_async(("boom",), link=record.s(),
                              link_error=[on_error.s(), on_error_id.s(), bound_errback.s()])
    assert result.state == states.FAILURE
    assert ("on_error", result.id, "ValueError", True) in seen
    assert ("on_error_id", result.id) in seen and ("bound_errback", result.id) in seen
    assert not [s for s in seen if s[0] == "record"]


def test_eager_chain_stops_at_a_failed_step(eager: Flask) -> None:
    result = (add.s(1, 1) | fail.si("stop") | record.s()).delay()
    assert result.state == states.FAILURE and not seen
    with pytest.raises(ValueError, match="stop"):
        result.get()


def test_errback_convention() -> None:
    assert takes_request(on_error) and not takes_request(on_error_id)
    assert not takes_request(bound_errback)


def test_trace_sends_callbacks_and_the_next_step(app: Flask) -> None:
    """What the worker does on success: link callbacks and the popped chain step."""
    from flask_tasks.trace import trace_task

    state = tasks.state(app)
    rest = [mul.s(2), mul.s(3)]
    request = Context(id="t1", task="canvas.add", args=[1, 2], root_id="r0",
                      callbacks=[record.s(tag="cb")], chain=[dict(s) for s in rest])
    outcome = trace_task(app, state, add, request)
    assert outcome.state == states.SUCCESS and len(request.children) == 2
    (h1, b1), (h2, b2) = sent(app)
    assert h1["task"] == "canvas.record" and b1[0] == [3] and b1[1] == {"tag": "cb"}
    assert h1["parent_id"] == "t1" and h1["root_id"] == "r0"
    assert h2["task"] == "canvas.mul" and b2[0] == [3, 3]  # the LAST item is next
    assert [s["args"] for s in b2[2]["chain"]] == [[2]]
    assert h2["parent_id"] == "t1" and h2["root_id"] == "r0"


def test_trace_sends_old_style_errbacks_with_the_task_id(app: Flask) -> None:
    from flask_tasks.trace import trace_task

    state = tasks.state(app)
    request = Context(id="t2", task="canvas.fail", args=["x"],
                      errbacks=[on_error.s(), on_error_id.s(), signature("elsewhere.report")])
    outcome = trace_task(app, state, fail, request)
    assert outcome.state == states.FAILURE
    assert seen == [("on_error", "t2", "ValueError", True)]  # called here, in the worker
    messages = sent(app)
    assert [(h["task"], b[0]) for h, b in messages] == [("canvas.on_error_id", ["t2"]),
                                                       ("elsewhere.report", ["t2"])]


def test_trace_runs_a_group_as_the_next_step(app: Flask) -> None:
    """A group as a chain's last step: its members go out with the frozen ids, in order."""
    from flask_tasks.trace import trace_task

    result = chain(add.s(1, 1), group(mul.s(2), mul.s(3)))()
    assert isinstance(result, GroupResult)
    [(headers, (args, kwargs, embed))] = sent(app)
    assert embed["chain"][0]["subtask_type"] == "group"
    request = Context(id=headers["id"], task="canvas.add", args=args, kwargs=kwargs,
                      chain=embed["chain"])
    assert trace_task(app, tasks.state(app), add, request).state == states.SUCCESS
    members = sent(app)
    assert [(h["task"], b[0], h["group"], h["group_index"], h["parent_id"])
            for h, b in members] == [("canvas.mul", [2, 2], result.id, 0, headers["id"]),
                                     ("canvas.mul", [2, 3], result.id, 1, headers["id"])]
    assert [h["id"] for h, _ in members] == [r.id for r in result.results]
    assert result.parent is not None and result.parent.id == headers["id"]


def test_group_result_tuple_round_trip() -> None:
    from flask_tasks.result import AsyncResult, result_from_tuple

    first = AsyncResult("a", None)  # type: ignore[arg-type]
    grouped = GroupResult("g", [AsyncResult("b", None), AsyncResult("c", None)],  # type: ignore[arg-type]
                          parent=first)
    value = json.loads(json.dumps(grouped.as_tuple()))
    assert value == [["g", [["a", None], None]], [[["b", None], None], [["c", None], None]]]
    back = result_from_tuple(value, lambda i: AsyncResult(i, None))  # type: ignore[arg-type]
    assert isinstance(back, GroupResult) and [r.id for r in back.results] == ["b", "c"]
    assert back.parent.id == "a"


def test_sending_never_changes_the_signatures_given(app: Flask) -> None:
    members = group(mul.s(2), mul.s(3))
    flow = chain(add.s(1, 1), members)
    first, second = flow(), flow()
    assert first.id != second.id and not members.options and not members.tasks[0].options
    assert first.results[0].id != second.results[0].id
    sig = add.s(1, 1)
    sig.delay()
    sig.delay()
    assert sig.options == {} and len({h["id"] for h, _ in sent(app)}) == 4


def test_a_group_of_chains_gives_each_its_arguments(app: Flask) -> None:
    result = group(chain(add.s(1), mul.s(2)), add.s(1)).delay(10)
    messages = sent(app)
    assert [(h["task"], b[0], h["group_index"]) for h, b in messages] == [
        ("canvas.add", [10, 1], None), ("canvas.add", [10, 1], 1)]
    # the chain's LAST step carries the group's id and index, and is the member's result
    step = messages[0][1][2]["chain"][0]
    assert step["options"]["group_id"] == result.id and step["options"]["group_index"] == 0
    assert result.results[0].id == step["options"]["task_id"]


def test_eager_group_of_chains(eager: Flask) -> None:
    assert group(chain(add.s(1), mul.s(2)), add.s(1)).delay(10).get() == [22, 11]


def test_group_result_save_needs_a_backend_that_stores_groups() -> None:
    with pytest.raises(NotImplementedError, match="cannot store groups"):
        GroupResult("g", [], backend=object()).save()

    class Groups:
        saved: dict[str, Any] = {}

        def save_group(self, group_id: str, value: Any) -> None:
            self.saved[group_id] = json.loads(json.dumps(value))

        def restore_group(self, group_id: str) -> Any:
            return self.saved.get(group_id)

    from flask_tasks.result import AsyncResult

    store = Groups()
    GroupResult("g", [AsyncResult("a", store), AsyncResult("b", store)],  # type: ignore[arg-type]
                backend=store).save()
    back = GroupResult.restore("g", store)
    assert back is not None and [r.id for r in back.results] == ["a", "b"]
    assert GroupResult.restore("other", store) is None


def test_eager_chain_raises_with_throw(eager: Flask) -> None:
    with pytest.raises(ValueError, match="stop"):
        (add.s(1, 1) | fail.si("stop") | record.s()).apply(throw=True)
    assert not seen


def test_a_group_is_checked_whole_before_anything_is_sent(app: Flask) -> None:
    with pytest.raises(TypeError, match="canvas.add"):
        group(add.s(1, 1), add.s(1), add.s(2, 2))()
    assert sent(app) == []


def test_a_chord_survives_json(app: Flask) -> None:
    original = chord([add.s(1, 1), add.s(2, 2)], xsum.s())
    again = signature(json.loads(json.dumps(original)))
    assert isinstance(again, chord) and isinstance(again.header, group)
    assert [t.task for t in again.tasks] == ["canvas.add", "canvas.add"]
    assert again.body is not None and again.body.task == "canvas.xsum"
    as_list = dict(json.loads(json.dumps(original)))
    as_list["kwargs"]["header"] = as_list["kwargs"]["header"]["kwargs"]["tasks"]
    assert [t.task for t in signature(as_list).tasks] == ["canvas.add", "canvas.add"]
