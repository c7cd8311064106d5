"""The :class:`Task`: a function the worker runs, plus how to call it.

``@tasks.task`` turns a function into a ``Task[P, R]`` (an instance of the
task's ``base`` class, :class:`Task` by default), typed with the function's
own signature so ``add.delay("x")`` is a type error and
``add.delay(2, 3).get()`` is an ``int``.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any, Generic, ParamSpec, Protocol, TypeVar, Unpack

from flask import Flask, has_app_context

from .backends.base import Backend
from .canvas.task_methods import CanvasMethods
from .config import Config
from .exceptions import ImproperlyConfigured, MaxRetriesExceededError, Retry
from .options import CallOptions, RetryOptions, check_task_options, retry_options
from .protocol import Context
from .result import AsyncResult, EagerResult

P = ParamSpec("P")
R = TypeVar("R")

#: The request of the task running in this thread/context, if any.
current_request: ContextVar[Context | None] = ContextVar("flask_tasks_request", default=None)
#: The app state that runs the current task (set by :func:`flask_tasks.trace.trace_task`):
#: :meth:`Task.retry` and :meth:`Task.update_state` go through it.
current_state: ContextVar[TaskApp | None] = ContextVar("flask_tasks_state", default=None)


class TaskApp(Protocol):
    """What a task needs from its app: settings, a result backend, and ways to send.

    :class:`flask_tasks.app_state.AppState` is one; see its methods for the details.
    """

    @property
    def config(self) -> Config: ...
    @property
    def backend(self) -> Backend: ...
    def send_task(self, name: str, args: Sequence[Any] | None = None,
                  kwargs: Mapping[str, Any] | None = None, *, task: Task[Any, Any] | None = None,
                  **options: Unpack[CallOptions]) -> AsyncResult[Any]: ...
    def send_on_commit(self, name: str, args: Sequence[Any] | None = None,
                       kwargs: Mapping[str, Any] | None = None, *,
                       task: Task[Any, Any] | None = None,
                       **options: Unpack[CallOptions]) -> AsyncResult[Any]: ...
    def send_many(self, calls: Sequence[tuple[str, Sequence[Any], Mapping[str, Any],
                                              Task[Any, Any] | None, CallOptions]]
                  ) -> list[AsyncResult[Any]]: ...
    def apply_eagerly(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                      *, task_id: str | None = None, throw: bool | None = None,
                      **options: Any) -> EagerResult[Any]: ...
    def result(self, task_id: str, task_name: str | None = None) -> AsyncResult[Any]: ...
    def get_task(self, name: str) -> Task[Any, Any] | None: ...


class TaskOwner(Protocol):
    """What a task needs from the extension it is sent through.

    :class:`~flask_tasks.Tasks` for ``@tasks.task``; for ``@shared_task``,
    the ``Tasks`` of the current app (outside an app context, of the only
    app in the process that has one).
    """

    @property
    def default_app(self) -> Flask | None:
        """The app to use outside an app context (``None``: none, or not one alone)."""

    def state(self, app: Flask | None = None) -> TaskApp:
        """The app's state (``None``: the current app, else :attr:`default_app`).

        :raises RuntimeError: no app context and no single app to use.
        """


class Task(CanvasMethods, Generic[P, R]):
    """A task. Subclass it and pass ``base=MySubclass`` to share handlers.

    Signatures (``add.s(2)``, ``si``, ``signature``, ``map``, ``starmap``,
    ``chunks``) come from :class:`~flask_tasks.canvas.task_methods.CanvasMethods`.

    Class attributes are the defaults every task of that class gets; each
    ``@tasks.task(...)`` option overrides one. ``None`` means "use the app's
    ``TASKS_*`` setting".

    Handlers (override in a subclass; they run in the worker, inside the app
    context, and an exception in one is logged, not raised):
    :meth:`before_start`, :meth:`on_success`, :meth:`on_failure`,
    :meth:`on_retry`, :meth:`after_return`.
    """

    name: str = ""
    #: Pass the task itself as the first argument (``self``).
    bind: bool = False
    #: Store no result (None: ``TASKS_IGNORE_RESULT``).
    ignore_result: bool | None = None
    #: Acknowledge after running (None: ``TASKS_ACKS_LATE``).
    acks_late: bool | None = None
    #: Store RECEIVED and STARTED (None: ``TASKS_TRACK_STARTED``).
    track_started: bool | None = None
    #: Queue name (None: routes, then ``TASKS_DEFAULT_QUEUE``).
    queue: str | None = None
    priority: int | None = None
    serializer: str | None = None
    compression: str | None = None
    max_retries: int | None = 3
    #: Seconds before a retry when ``retry()`` gives no countdown.
    default_retry_delay: float = 180.0
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    retry_kwargs: Mapping[str, Any] | None = None
    rate_limit: str | None = None
    #: Hard and soft time limits, seconds (None: no limit).
    time_limit: float | None = None
    soft_time_limit: float | None = None
    #: Default ``expires`` for calls, seconds or datetime.
    expires: float | datetime | None = None
    #: Expected exceptions: logged briefly, without a traceback.
    throws: tuple[type[BaseException], ...] = ()
    reject_on_worker_lost: bool | None = None
    #: Check call arguments against the function's signature in the caller.
    typing: bool = True

    #: What sends this task: the ``Tasks`` that defined it, or, for shared
    #: tasks, the current app's. Set by :func:`flask_tasks.registry.make_task`.
    _tasks: TaskOwner
    _fn: Callable[..., Any] | None = None
    _signature: inspect.Signature | None = None

    def __init__(self) -> None:
        self.origin = f"{type(self).__module__}.{type(self).__qualname__}"

    # -- definition ------------------------------------------------------------
    def _bind_function(self, fn: Callable[..., Any], options: Mapping[str, Any]) -> None:
        check_task_options(options, fn.__qualname__)
        for key, value in options.items():
            if key not in ("base", "name"):
                setattr(self, key, value)
        self._fn = fn
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        self.__module__ = fn.__module__
        self.__name__ = fn.__name__
        self.__qualname__ = fn.__qualname__
        self.origin = f"{fn.__module__}.{fn.__qualname__}"
        name = options.get("name")
        if not name:
            if fn.__module__ == "__main__" or "<locals>" in fn.__qualname__:
                raise ImproperlyConfigured(
                    f"Task {fn.__qualname__!r} is defined in {fn.__module__!r} or inside a "
                    f"function, where a worker cannot find it by name. Give it a name: "
                    f"@tasks.task(name='myapp.{fn.__name__}')."
                )
            name = f"{fn.__module__}.{fn.__name__}"
        self.name = name
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # pragma: no cover - builtins
            signature = None
        if signature is not None and self.bind:
            params = list(signature.parameters.values())[1:]
            signature = signature.replace(parameters=params)
        self._signature = signature

    def __repr__(self) -> str:
        return f"<@task: {self.name}>"

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The task body: the decorated function (override it in class-based tasks)."""
        if self._fn is None:
            raise NotImplementedError(f"{type(self).__name__} defines no run() method")
        if self.bind:
            return self._fn(self, *args, **kwargs)
        return self._fn(*args, **kwargs)

    # -- app state -------------------------------------------------------------
    def _state(self) -> TaskApp:
        return self._tasks.state()

    def _running_state(self) -> TaskApp:
        """The state that runs this call (see :data:`current_state`), else :meth:`_state`."""
        state = current_state.get()
        return state if state is not None else self._state()

    # -- calling ---------------------------------------------------------------
    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the task here and now, in this process; nothing is sent.

        Outside an app context it runs in an app context of the app the task
        would be sent with (``Tasks(app)``, or a single ``init_app``); when
        there is no single such app, without an app context.
        """
        token = current_request.set(Context(id=str(uuid.uuid4()), task=self.name, args=list(args),
                                            kwargs=dict(kwargs), called_directly=True))
        try:
            app = None if has_app_context() else self._tasks.default_app
            if app is not None:
                with app.app_context():
                    return self.run(*args, **kwargs)  # type: ignore[no-any-return]
            return self.run(*args, **kwargs)  # type: ignore[no-any-return]
        finally:
            current_request.reset(token)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task to a worker: ``apply_async(args, kwargs)`` with default options.

        :returns: an :class:`AsyncResult` for the new task id.
        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized.
        :raises TypeError: the arguments do not fit the function's signature.
        :raises kombu.exceptions.OperationalError: the broker stayed unreachable
            after ``TASKS_PUBLISH_RETRY_POLICY``.
        """
        return self.apply_async(args, kwargs)

    def delay_on_commit(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Like :meth:`delay`, but publish only once the current database transaction commits.

        See ``apply_async(..., on_commit=True)``.
        """
        return self.apply_async(args, kwargs, on_commit=True)

    def apply_async(self, args: Sequence[Any] | None = None,
                    kwargs: Mapping[str, Any] | None = None, *, on_commit: bool = False,
                    **options: Unpack[CallOptions]) -> AsyncResult[R]:
        """Send the task to a worker with options.

        The options are declared in :class:`flask_tasks.options.CallOptions`:
        ``countdown`` (seconds), ``eta``, ``expires`` (seconds or datetime),
        ``queue``, ``priority``, ``task_id``, ``link``, ``link_error``,
        ``retry``, ``retry_policy``, ``serializer``, ``compression``,
        ``headers``, ``ignore_result``, ``time_limit`` and ``soft_time_limit``
        (seconds). One not given is the task's attribute of the same name,
        else the app's ``TASKS_*`` setting.

        :param args: positional arguments (a list or tuple).
        :param kwargs: keyword arguments.
        :param on_commit: publish only after the app's Flask-SQLAlchemy session
            commits its current transaction, and not at all if it rolls back,
            so the task never runs before the rows it needs exist (outside a
            transaction: at once). The returned result's id is the one that
            will be used; arguments are checked and encoded now.
        :returns: an :class:`AsyncResult` (an :class:`EagerResult` in eager mode;
            with ``on_commit`` a plain :class:`AsyncResult`).
        :raises flask_tasks.exceptions.EncodeError: an argument cannot be
            serialized; nothing was sent.
        :raises TypeError: the arguments do not fit the function's signature,
            or an option is unknown (the message names it).
        :raises kombu.exceptions.OperationalError: the broker stayed unreachable.
        """
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        self.check_arguments(args, kwargs)
        state = self._state()
        send = state.send_on_commit if on_commit else state.send_task
        return send(self.name, args, kwargs, task=self, **options)

    def apply(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              *, task_id: str | None = None, throw: bool | None = None,
              **options: Any) -> EagerResult[R]:
        """Run the task in this process, as a worker would, and return an :class:`EagerResult`.

        The call is encoded and decoded like a real message (a value the
        serializer cannot carry fails here too), runs inside the app context
        with handlers and signals, and stores nothing.

        :param throw: re-raise the task's exception (default ``TASKS_EAGER_PROPAGATES``).
        :raises flask_tasks.exceptions.EncodeError: an argument cannot be serialized.
        """
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        self.check_arguments(args, kwargs)
        state = self._state()
        return state.apply_eagerly(self, args, kwargs, task_id=task_id, throw=throw, **options)

    def AsyncResult(self, task_id: str) -> AsyncResult[R]:  # noqa: N802 - Celery's name
        """An :class:`AsyncResult` for ``task_id`` on the current app's backend."""
        return self._state().result(task_id, self.name)

    # -- inside a running task -------------------------------------------------
    @property
    def request(self) -> Context:
        """The current call's :class:`~flask_tasks.protocol.Context`.

        Outside a worker, one with ``called_directly`` set.
        """
        request = current_request.get()
        if request is None:
            return Context(id="", task=self.name, called_directly=True)
        return request

    def update_state(self, task_id: str | None = None, state: str | None = None,
                     meta: Any = None) -> None:
        """Store a state for this task (e.g. ``"PROGRESS"`` with ``{"done": 3, "total": 10}``).

        :param task_id: the task id (default: the running task's).
        :param state: the state name (default ``"PENDING"``); any string works.
        :param meta: a value the result serializer can encode; readers see it
            as ``AsyncResult.info``.
        :raises flask_tasks.exceptions.EncodeError: ``meta`` cannot be encoded.
        """
        task_id = task_id or self.request.id
        if not task_id:
            raise RuntimeError("update_state() needs a task_id outside a running task")
        request = current_request.get()
        app_state = self._running_state()
        if request is not None and request.is_eager and not app_state.config.store_eager_result:
            return
        app_state.backend.store_result(task_id, meta, state or "PENDING", request=request)

    def retry(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None,
              exc: BaseException | None = None, throw: bool = True,
              eta: datetime | None = None, countdown: float | None = None,
              max_retries: int | None = None, **options: Unpack[RetryOptions]) -> Retry:
        """Run this task again later, with the same id; call it inside the running task.

        Publishes the call again (``request.retries`` one higher) to run after
        ``countdown`` seconds (default :attr:`default_retry_delay`) or at
        ``eta``, then raises :class:`~flask_tasks.exceptions.Retry`, which
        the worker turns into the RETRY state, ``on_retry`` and ``task_retry``::

            @tasks.task(bind=True, max_retries=5)
            def fetch(self, url):
                try:
                    return download(url)
                except ConnectionError as exc:
                    raise self.retry(exc=exc, countdown=10)

        :param args: new positional arguments (default: the current ones).
        :param kwargs: new keyword arguments (default: the current ones).
        :param exc: the exception that caused the retry; re-raised as is once
            ``max_retries`` is exceeded.
        :param throw: raise the :class:`Retry` (default); ``False`` returns it.
        :param eta: run no earlier than this datetime (naive means UTC).
        :param countdown: seconds to wait (default :attr:`default_retry_delay`).
        :param max_retries: overrides :attr:`max_retries` (None: no limit
            when the task's is None too).
        :param options: more :meth:`apply_async` options (``queue``, ``priority``...).
            The retry is published through the state of the worker running
            the task (see :data:`current_state`).
        :raises Retry: the retry was scheduled (with ``throw``).
        :raises MaxRetriesExceededError: no retries left and no ``exc`` given.
        """
        request = self.request
        if request.called_directly:  # not run by a worker: nothing to retry
            raise exc if exc is not None else Retry("Task can be retried", None)
        retries = request.retries + 1
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and retries > limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{request.id}]: it ran {retries} times "
                f"(max_retries={limit})."
            )
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        signal = Retry(exc=exc, when=eta if eta is not None else countdown)
        if not request.is_eager:  # eager mode runs the retry at once, in apply()
            self._running_state().send_task(
                self.name, request.args if args is None else args,
                request.kwargs if kwargs is None else kwargs, task=self,
                **retry_options(request, retries, countdown if eta is None else None, eta, options))
        if throw:
            raise signal
        return signal

    # -- handlers (override in a base class) -------------------------------------
    def before_start(self, task_id: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Called in the worker just before the task body runs."""

    def on_success(self, retval: Any, task_id: str, args: Sequence[Any],
                   kwargs: Mapping[str, Any]) -> None:
        """Called in the worker after the task returned ``retval``."""

    def on_failure(self, exc: BaseException, task_id: str, args: Sequence[Any],
                   kwargs: Mapping[str, Any], einfo: str) -> None:
        """Called in the worker after the task raised ``exc``; ``einfo`` is the traceback text."""

    def on_retry(self, exc: BaseException, task_id: str, args: Sequence[Any],
                 kwargs: Mapping[str, Any], einfo: str) -> None:
        """Called in the worker when the task is to be retried."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Sequence[Any],
                     kwargs: Mapping[str, Any], einfo: str | None) -> None:
        """Called in the worker after the task ran, whatever the outcome."""

