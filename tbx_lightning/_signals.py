"""Signal handlers that call into a run: the lock that lets them, safely.

Lightning's SLURM requeue handler calls ``logger.finalize()`` inside a signal
handler, which Python runs on the main thread between two bytecodes of whatever
that thread was doing, possibly in the middle of one of the run's own calls. The
handler must neither wait on a lock the interrupted call holds (it would wait
forever) nor close what that call is using (the call would fail when it resumes).

:class:`CallLock` is the run's lock: re-entrant, so the handler gets it at once; it
tells whether the current thread is already inside a call (:meth:`CallLock.held_here`),
and runs what the handler deferred (:meth:`CallLock.defer`) as soon as the outermost
call of the thread lets go of it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["CallLock"]


class CallLock:
    """A re-entrant lock that knows its holder and runs deferred work at the outermost release.

    Example:
        >>> lock = CallLock()
        >>> with lock:
        ...     lock.held_here()
        True
        >>> done = []
        >>> with lock:
        ...     lock.defer(lambda: done.append(1))
        ...     done
        []
        >>> done
        [1]
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0
        self._deferred: list[Callable[[], Any]] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        # Set after the acquire: a handler that runs before these lines sees no call in
        # progress, and none holds anything but this lock yet.
        self._depth += 1
        self._owner = threading.get_ident()
        return True

    def release(self) -> None:
        self._depth -= 1
        last = self._depth == 0
        if last:
            self._owner = None
        self._lock.release()
        if last and self._deferred:
            self._run_deferred()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held_here(self) -> bool:
        """True when the current thread is inside a call that holds this lock."""
        return self._owner == threading.get_ident()

    def defer(self, func: Callable[[], Any]) -> None:
        """Runs ``func`` once the outermost holder on this thread has let go of the lock."""
        self._deferred.append(func)

    def _run_deferred(self) -> None:
        while self._deferred:
            func = self._deferred.pop(0)
            try:
                func()
            except Exception as error:  # the interrupted call is not where this failed
                warnings.warn(
                    f"tbx_lightning: work deferred from a signal handler failed: "
                    f"{type(error).__name__}: {error}",
                    stacklevel=3,
                )
