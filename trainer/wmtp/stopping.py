"""Stopping on request: SIGTERM (what Kubernetes sends on eviction, and `wmtp launch` passes on to each worker)
asks training to stop at the next step boundary, after a checkpoint, and `Preempted` says it did."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on request after saving a checkpoint; resuming continues exactly where it stopped."""


class StopRequest:
    """SIGTERM (what Kubernetes sends on eviction, and `wmtp launch` passes on to each worker) asks training to
    stop at the next step boundary, after a checkpoint. Installed for as long as `installed` lasts, in the main
    thread, by the command that owns the process: a library call never takes over its caller's signals."""

    def __init__(self) -> None:
        self.requested = False

    def _request(self, signum: int, _frame: Any) -> None:
        log.warning("signal=%d received: saving a checkpoint at the end of this step, then stopping", signum)
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = signal.signal(signal.SIGTERM, self._request)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
