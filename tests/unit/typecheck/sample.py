# Checked by tests/unit/test_typing.py with mypy; never imported. Lines marked
# "error" must be reported, every other line must type-check.
from flask_tasks import Tasks, shared_task

tasks = Tasks()


@tasks.task
def add(x: int, y: int) -> int:
    return x + y


@tasks.task(bind=True, name="sample.bound")
def bound(self, n: int) -> str:  # type: ignore[no-untyped-def]
    return str(n)


total: int = add.delay(1, 2).get()
text: str = bound.delay(3).get(timeout=1.0)
direct: int = add(1, 2)
add.delay("x", 2)  # error
bound.delay("no")  # error
add.apply_async((1, 2), countdown=1.0)


@shared_task(name="sample.shared")
def shared(flag: bool) -> bool:
    return flag


shared.delay(True)
shared.delay(1, 2)  # error
add.delay_on_commit(1, 2)
add.delay_on_commit("x", 2)  # error
add.apply_async((1, 2), contdown=1.0)  # error
add.apply_async((1, 2), priority="high")  # error
tasks.send_task("sample.add", (1, 2), queue="hipri", expires=60)
tasks.send_task("sample.add", (1, 2), qeue="hipri")  # error
add.s(1)
add.si(1, 2)
add.si("x", 2)  # error
chained = add.s(1, 2) | add.s(3)
