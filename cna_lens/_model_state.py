"""Which thread is using a model: steering contexts are per model and not thread-safe.

Hooks and baked weights live on the model, so every thread that runs the model sees them.
:func:`hold` records, per model (in a ``weakref.WeakKeyDictionary``, nothing is patched
onto the model), the thread inside a steering, baking or generation context, and refuses a
second thread while the first is inside one. Nesting in one thread is fine.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cna_lens.errors import CNAError

__all__ = ["acquire", "hold", "release"]


@dataclass
class _Use:
    thread: int
    thread_name: str
    what: str
    depth: int


_USES: weakref.WeakKeyDictionary[Any, _Use] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def acquire(model: Any, what: str) -> None:
    """Mark ``model`` as used by this thread for ``what`` (re-entrant within the thread).

    Raises:
        CNAError: another thread holds a steering, baking or generation context on it.
    """
    me = threading.current_thread()
    with _LOCK:
        try:
            use = _USES.get(model)
        except TypeError:  # not weak-referenceable: cannot be tracked
            return
        if use is None:
            _USES[model] = _Use(me.ident or 0, me.name, what, 1)
        elif use.thread == me.ident:
            use.depth += 1
        else:
            raise CNAError(
                f"cannot enter {what} on this model from thread {me.name!r}: thread "
                f"{use.thread_name!r} is inside {use.what} on the same model. Steering "
                "contexts are per model and not thread-safe (hooks and baked weights are seen "
                "by every thread); use one model per thread"
            )


def release(model: Any, thread: int | None = None) -> None:
    """Undo one :func:`acquire` of this thread (or of the thread with ident ``thread``)."""
    with _LOCK:
        try:
            use = _USES.get(model)
        except TypeError:
            return
        ident = threading.get_ident() if thread is None else thread
        if use is not None and use.thread == ident:
            use.depth -= 1
            if use.depth == 0:
                del _USES[model]


@contextmanager
def hold(model: Any, what: str) -> Iterator[None]:
    """:func:`acquire` for the ``with`` block."""
    acquire(model, what)
    try:
        yield
    finally:
        release(model)
