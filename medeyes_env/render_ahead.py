"""Load the next episode's case while the current one runs, so a reset finds its image ready.

A procedural source renders a new image at every reset (tens of milliseconds, most of an episode's CPU on a
phantom). When the environment draws its cases itself (``reset()`` without options), the next index is known
from the generator's state before it is drawn, so the next case can be rendered in a background thread while
the agent thinks: numpy and Pillow release the GIL, and an environment in a vector worker spends most of its
wall time waiting for the next action (a lockstep step waits for the slowest worker). The image is made by the
same call as without render-ahead, so it is the same bytes; only when it is made changes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RenderAhead(Generic[T]):
    """One load in flight at a time, in one background thread started on first use."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[Hashable, Future[T]] | None = None

    def submit(self, key: Hashable, load: Callable[[], T]) -> None:
        """Start ``load()`` in the background for the episode ``key``; an earlier load not yet taken is dropped."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medeyes-render-ahead")
        self._pending = (key, self._executor.submit(load))

    def take(self, key: Hashable) -> T | None:
        """What was loaded for ``key``; the load in flight is waited for even when it is for another key.

        Waiting either way means the caller's own load never runs beside the background one: a source need not be
        safe to read from two threads at once (a parquet source's row-group cache is not). ``None`` when nothing
        was loaded for ``key`` (another case was asked for) or the load raised: the caller then loads the case
        itself, so an error surfaces where it would without render-ahead, with its own message.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        loaded_key, future = pending
        try:
            loaded = future.result()
        except Exception:  # the caller's own load raises it again
            return None
        return loaded if loaded_key == key else None

    def close(self) -> None:
        """Stop the background thread; a load in flight finishes, none is started."""
        self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # A thread cannot be pickled or copied: a copy (pickle, deepcopy, a vector env's worker) starts with none.
    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        RenderAhead.__init__(self)
