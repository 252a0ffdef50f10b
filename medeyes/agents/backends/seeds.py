"""How a backend seeds its sampling: a per-call counter, and one seed per conversation of a call.

Every backend counts its ``generate`` calls (:class:`SeededCalls`): call ``n`` (counted from 0) with sampling
base seed ``s`` samples reproducibly from ``s`` and ``n``. The trainer re-seeds sampling at each step and
calls :meth:`SeededCalls.reset_calls`, so a step's seeds do not depend on how many calls came before it
(a resumed run samples what the uninterrupted one did).

The vLLM backends (in process and over HTTP) give conversation ``i`` of call ``n`` its own seed,
:func:`request_seed` = ``(s + n) * 1_000_003 + i`` (mod 2^31), so the rollouts of one prompt differ and each is
reproducible whatever the server batched it with (docs/vllm.md). The transformers backend seeds torch's
generator once per call with ``s + n``.
"""

from __future__ import annotations

import threading

SEED_STRIDE = 1_000_003
"""Distance between the seeds of consecutive calls: more conversations than this per call would overlap."""


def request_seed(seed: int | None, call: int, index: int) -> int | None:
    """The seed of conversation ``index`` in call ``call`` of a backend whose sampling base seed is ``seed``.

    Distinct per conversation (the rollouts of one prompt differ), reproducible whatever the server batches a
    request with, and the same for every vLLM backend.

    >>> request_seed(3, 0, 0), request_seed(3, 0, 1), request_seed(3, 1, 0), request_seed(None, 5, 5)
    (3000009, 3000010, 4000012, None)
    """
    return None if seed is None else ((seed + call) * SEED_STRIDE + index) % 2**31


class SeededCalls:
    """A backend's ``generate`` call counter, safe across threads (the OpenAI backend's requests run in a pool).

    >>> calls = SeededCalls()
    >>> calls.next_call(), calls.next_call(), calls.calls
    (0, 1, 2)
    >>> calls.reset_calls(); calls.next_call()
    0
    """

    def __init__(self) -> None:
        """Start at call 0."""
        self._calls = 0
        self._calls_lock = threading.Lock()

    @property
    def calls(self) -> int:
        """How many calls were counted since the start or the last :meth:`reset_calls`."""
        return self._calls

    def next_call(self) -> int:
        """The index of this call (0 for the first), counting it."""
        with self._calls_lock:
            call = self._calls
            self._calls += 1
        return call

    def reset_calls(self) -> None:
        """Count from 0 again: the next call samples as the first one did (the trainer does this every step)."""
        with self._calls_lock:
            self._calls = 0
