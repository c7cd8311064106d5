"""Canvas through real workers: chain, group, map/starmap/chunks, link and link_error
(both errback conventions), a chain's result is its last task's with parents.

On each broker (``broker``: Redis and RabbitMQ, results in Redis), with the
prefork and the threads pool, and on the embedded default.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from flask import Flask

from flask_tasks import GroupResult, chain, group, signature, states
from tests.apps import basic
from tests.helpers import wait_for

APP = "tests.apps.basic:create_app"


def canvas_lines(app: Flask) -> list[str]:
    path = os.path.join(app.instance_path, "canvas.txt")
    if not os.path.exists(path):
        return []
    with open(path) as lines:
        return [line.strip() for line in lines]


def run_the_primitives(app: Flask) -> None:
    # chain: the result is the last task's, .parent leads back (celery#3137)
    result = chain(basic.add.s(4, 4), basic.mul.s(8), basic.mul.s(2))()
    assert result.get(timeout=20) == 128
    assert result.parent.get(timeout=5) == 64 and result.parent.parent.get(timeout=5) == 8
    assert result.parent.parent.parent is None
    assert (basic.add.s(2, 2) | basic.mul.s(8)).delay().get(timeout=20) == 32
    assert basic.add.s(2).delay(5).get(timeout=20) == 7
    # group: values in order
    grouped = group(basic.add.s(i, i) for i in range(10))()
    assert isinstance(grouped, GroupResult)
    assert grouped.get(timeout=20) == [i + i for i in range(10)]
    assert grouped.ready() and grouped.successful() and grouped.completed_count() == 10
    # a group as a chain's last step
    tail = (basic.add.s(1, 1) | group(basic.mul.s(2), basic.mul.s(3)))()
    assert tail.get(timeout=20) == [4, 6]
    # map / starmap / chunks, run by the built-in celery.* tasks
    assert basic.xsum.map([[1, 2], [3, 4]]).delay().get(timeout=20) == [3, 7]
    assert basic.add.starmap(zip(range(3), range(3), strict=True)).delay().get(
        timeout=20) == [0, 2, 4]
    assert basic.add.chunks(zip(range(6), range(6), strict=True), 2).delay().get(
        timeout=20) == [[0, 2], [4, 6], [8, 10]]


def run_the_callbacks(app: Flask) -> None:
    parent = basic.add.apply_async((2, 3), link=basic.note.s("linked"))
    assert parent.get(timeout=20) == 5
    failed = basic.fail.apply_async(("boom",), link=basic.note.s("never"),
                                    link_error=[basic.on_error.s(), basic.on_error_id.s()])
    with pytest.raises(ValueError, match="boom"):
        failed.get(timeout=20)
    expected = {"note linked 5", f"on_error {failed.id} ValueError True",
                f"on_error_id {failed.id}"}
    wait_for(lambda: expected <= set(canvas_lines(app)), timeout=20,
             message=f"callbacks; seen {canvas_lines(app)}")
    assert not [line for line in canvas_lines(app) if "never" in line]
    # a signature by name, with options, linked from a signature
    sig = signature("tests.apps.basic.mul", args=(3,))
    assert (basic.add.si(1, 1) | sig).delay().get(timeout=20) == 6
    # a failing chain step: the errback of the chain runs, later steps never do
    flow = chain(basic.add.s(1, 1), basic.fail.si("step"), basic.note.s("after"))
    flow.link_error(basic.on_error_id.s())
    last = flow.delay()
    failed_step = last.parent
    wait_for(lambda: f"on_error_id {failed_step.id}" in canvas_lines(app), timeout=20,
             message=f"the chain's errback; seen {canvas_lines(app)}")
    assert failed_step.state == states.FAILURE and last.state == states.PENDING


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_primitives_and_callbacks(broker_app: Flask, broker_env: dict[str, str], start_worker,
                                  pool: str) -> None:
    start_worker(APP, "-P", pool, "-c", "2", env=broker_env)
    run_the_primitives(broker_app)
    run_the_callbacks(broker_app)


def test_primitives_and_callbacks_on_the_embedded_default(embedded_app: Flask, tmp_path: Path,
                                                          start_worker) -> None:
    start_worker(APP, "-c", "2")
    run_the_primitives(embedded_app)
    run_the_callbacks(embedded_app)


def test_group_save_and_restore(basic_app: Flask, redis_env: dict[str, str],
                                start_worker) -> None:
    start_worker(APP, "-c", "2", env=redis_env)
    grouped = group(basic.add.s(i, 1) for i in range(3))().save()
    restored = basic.tasks.GroupResult(grouped.id)
    assert [r.id for r in restored.results] == [r.id for r in grouped.results]
    assert restored.get(timeout=20) == [1, 2, 3]
    with pytest.raises(LookupError):
        basic.tasks.GroupResult("no-such-group")


def test_children_are_recorded(basic_app: Flask, redis_env: dict[str, str],
                               start_worker) -> None:
    start_worker(APP, "-c", "1", env=redis_env)
    result = chain(basic.add.s(1, 1), basic.mul.s(3))()
    assert result.get(timeout=20) == 6
    first = result.parent
    assert [child.id for child in first.children] == [result.id]


def test_a_chain_and_a_group_over_rpc(rabbitmq_vhost: str, basic_app_on, start_worker) -> None:
    """``rpc://``: every step's states come back to the caller (frozen with its reply queue)."""
    basic_app_on(rabbitmq_vhost, "rpc://")
    start_worker(APP, "-c", "2", env={"TEST_BROKER_URL": rabbitmq_vhost,
                                      "TEST_RESULT_BACKEND": "rpc://"})
    result = chain(basic.add.s(4, 4), basic.mul.s(8), basic.mul.s(2))()
    assert result.get(timeout=20) == 128 and result.parent.get(timeout=5) == 64
    assert group(basic.add.s(i, i) for i in range(4))().get(timeout=20) == [0, 2, 4, 6]


def test_a_group_to_an_unreachable_broker_is_retried_then_reported(tmp_path: Path) -> None:
    from kombu.exceptions import OperationalError

    from flask_tasks import Tasks
    from tests.helpers import free_port

    app = Flask("unreachable_group", instance_path=str(tmp_path))
    app.config.update(BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", RESULT_BACKEND="disabled",
                      TASKS_PUBLISH_RETRY_POLICY={"max_retries": 2, "interval_start": 0.05,
                                                  "interval_step": 0.05, "interval_max": 0.05})
    tasks = Tasks(app)

    @tasks.task(name="unreachable_group.noop")
    def noop(n: int) -> None: ...

    with app.app_context(), pytest.raises(OperationalError):
        group(noop.s(i) for i in range(3))()


def test_a_big_group_in_batches(basic_app: Flask, redis_env: dict[str, str],
                                start_worker) -> None:
    """More members than one Redis pipeline holds: every one is sent once, in order."""
    start_worker(APP, "-P", "threads", "-c", "2", env=redis_env)
    grouped = group(basic.add.s(i, 1) for i in range(2500))()
    assert grouped.get(timeout=60) == [i + 1 for i in range(2500)]
