"""Exceptions as Celery encodes them in stored results and errback arguments."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping
from typing import Any

#: Exception classes made for types this process cannot import, by (module, name).
_rebuilt: dict[tuple[str, str], type[BaseException]] = {}


def exception_to_dict(exc: BaseException) -> dict[str, Any]:
    """Encode ``exc`` the way Celery does (type name, args, module)."""
    cls = type(exc)
    args: list[Any] = []
    for arg in exc.args:
        args.append(arg if isinstance(arg, (str, int, float, bool, type(None))) else repr(arg))
    return {"exc_type": cls.__qualname__, "exc_message": args, "exc_module": cls.__module__}


def exception_from_dict(data: Mapping[str, Any]) -> BaseException:
    """Rebuild an exception stored by :func:`exception_to_dict` (or by Celery).

    The original class is used when its module is already imported and the
    name is an exception class there (modules are never imported on the
    say-so of stored data); otherwise a stand-in class with the same name and
    module is made, so ``type(exc).__name__`` still tells what happened.
    """
    name = str(data.get("exc_type") or "Exception")
    module_name = str(data.get("exc_module") or "builtins")
    message = data.get("exc_message", ())
    args = tuple(message) if isinstance(message, (list, tuple)) else (message,)
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    cls: Any = module
    for part in name.split("."):
        cls = getattr(cls, part, None) if cls is not None else None
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        key = (module_name, name)
        cls = _rebuilt.get(key)
        if cls is None:
            cls = type(name.rsplit(".", 1)[-1], (Exception,), {"__module__": module_name})
            _rebuilt[key] = cls
    try:
        exc: BaseException = cls(*args)
    except Exception:
        fallback: type[BaseException] = type(name.rsplit(".", 1)[-1], (Exception,),
                                             {"__module__": module_name})
        exc = fallback(*args)
    return exc
