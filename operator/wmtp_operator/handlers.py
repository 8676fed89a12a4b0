"""kopf handlers: thin glue that triggers one reconcile pass of a run and posts its events.

Every trigger — the run created, changed or found at start-up, an event on one of its Jobs or pods, a timer —
does the same thing: read the run and its children, `reconcile`, apply, patch the status if it changed.
Passes of one run never overlap, and a burst of triggers collapses into one pass that reads after all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import zlib
from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from wmtp.contract import GROUP, PLURAL, VERSION
from wmtp_operator.kube import Kube
from wmtp_operator.reconcile import Plan, reconcile
from wmtp_operator.render import MANAGED_BY, OPERATOR, RUN_LABEL
from wmtp_operator.spec import TERMINAL, Defaults

RESYNC_SECONDS = 60.0  # the safety net: a missed watch event is noticed within this


class Supervisor:
    """Runs reconcile passes: one at a time per run, with triggers that arrive while one waits folded into it."""

    def __init__(self, kube: Kube, defaults: Defaults) -> None:
        self.kube, self.defaults = kube, defaults
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._waiting: set[tuple[str, str]] = set()
        self._last_pass: dict[tuple[str, str], float] = {}

    def idle_seconds(self, namespace: str, name: str) -> float:
        """Seconds since the run's last reconcile pass in this process (infinite if none)."""
        return time.monotonic() - self._last_pass.get((namespace, name), -math.inf)

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self._waiting:
            return  # that pass has not read the cluster yet, so it will see whatever caused this trigger
        self._waiting.add(key)
        async with self._locks[key]:
            self._waiting.discard(key)
            result = await asyncio.to_thread(self.reconcile_now, namespace, name)
            self._last_pass[key] = time.monotonic()
        if result is None:
            self._locks.pop(key, None)
            self._last_pass.pop(key, None)
            return
        body, plan = result
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)

    def reconcile_now(self, namespace: str, name: str) -> tuple[dict[str, Any], Plan] | None:
        body = self.kube.get("WMTPRun", namespace, name)
        if body is None:
            return None  # deleted: its children go with it through their ownerReferences
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        plan = reconcile(body, self.kube.observe(body), now, self.defaults)
        self.kube.apply(namespace, name, plan)
        return body, plan


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Annotations, not status: the CRD's structural schema would prune kopf's bookkeeping from the status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Transitions are posted as Events explicitly; kopf's own per-handler chatter is not.
    settings.posting.level = logging.WARNING
    memo.supervisor = Supervisor(Kube.from_environment(), Defaults.from_env(os.environ))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def run_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.reconcile(namespace, name)


def unfinished(status: Mapping[str, Any], **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


def _resync_offset(uid: str) -> float:
    """A stable offset in [0, RESYNC_SECONDS): runs created together must not all resync at the same moment."""
    return RESYNC_SECONDS * zlib.crc32(uid.encode()) / 2**32


@kopf.daemon(GROUP, VERSION, PLURAL, when=unfinished, cancellation_timeout=1.0)
async def resync(namespace: str, name: str, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """The safety net, a timer with a per-run phase: a pass for runs that nothing has triggered for a while."""
    await stopped.wait(_resync_offset(uid))
    while not stopped:
        if memo.supervisor.idle_seconds(namespace, name) >= RESYNC_SECONDS:
            await memo.supervisor.reconcile(namespace, name)
        await stopped.wait(RESYNC_SECONDS)


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT})
async def child_changed(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.reconcile(namespace, labels[RUN_LABEL])
