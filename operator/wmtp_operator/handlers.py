"""kopf handlers: thin glue that triggers one reconcile pass of a run and posts its events.

Every trigger — any change of the run (its status included: that is where rank 0 reports), an event on one of
its Jobs or pods, a requeue a pass asked for, the periodic resync — does the same thing: read the run and its
children, `reconcile`, apply, patch the status if it changed. Passes of one run never overlap, and a burst of
triggers collapses into one pass that reads after all of them.

Only event handlers: kopf adds a finalizer for daemons, timers and deletion handlers, and a run must be deletable
while the operator is down. The resync and the requeues are this module's own loop.
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
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf

from wmtp.contract import GROUP, PLURAL, VERSION
from wmtp_operator.kube import Kube
from wmtp_operator.metrics import Metrics
from wmtp_operator.plan import Plan, say
from wmtp_operator.reconcile import reconcile, refused
from wmtp_operator.render import MANAGED_BY, OPERATOR, RUN_LABEL
from wmtp_operator.spec import Defaults

RESYNC_SECONDS = 60.0  # the safety net: a missed watch event is noticed within 1.5 × this
ERROR_RETRY_SECONDS = 5.0  # after an API error that is not a refusal (a timeout, a 5xx), doubling while it repeats
MAX_ERROR_RETRY_SECONDS = 300.0
TICK_SECONDS = 0.2
PASSES_AT_ONCE = 32
log = logging.getLogger(__name__)


class Supervisor:
    """Runs reconcile passes: one at a time per run, with triggers that arrive while one waits folded into it,
    and a pass for each unfinished run when it is due (its requeue, else the resync)."""

    def __init__(self, kube: Kube, defaults: Defaults, metrics: Metrics) -> None:
        self.kube, self.defaults, self.metrics = kube, defaults, metrics
        self._locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._waiting: set[tuple[str, str]] = set()
        self._due: dict[tuple[str, str], float] = {}
        self._failed: dict[tuple[str, str], int] = {}  # passes failed in a row
        self._tasks: set[asyncio.Task[None]] = set()  # held so that the event loop does not drop them

    def forget(self, namespace: str, name: str) -> None:
        self._due.pop((namespace, name), None)
        self._failed.pop((namespace, name), None)
        self._locks.pop((namespace, name), None)
        self.kube.written.pop((namespace, name), None)
        self.metrics.forget(namespace, name)

    def own_echo(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """The run as this operator's last write left it: nothing a pass would not already know."""
        return resource_version is not None and resource_version in self.kube.written.get((namespace, name), ())

    async def reconcile(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        if key in self._waiting:
            return  # that pass has not read the cluster yet, so it will see whatever caused this trigger
        self._waiting.add(key)
        async with self._locks[key]:
            self._waiting.discard(key)
            started = time.monotonic()
            try:
                result = await asyncio.to_thread(self.reconcile_now, namespace, name)
            except Exception as err:  # an API error or timeout: this pass is lost, a later one redoes it
                self.metrics.observe(namespace, name, time.monotonic() - started, err)
                self._failed[key] = failed = self._failed.get(key, 0) + 1
                wait = min(ERROR_RETRY_SECONDS * 2 ** (failed - 1), MAX_ERROR_RETRY_SECONDS)
                log.warning("reconciling %s/%s failed, retrying in %.0fs: %s", namespace, name, wait, say(str(err)))
                self._due[key] = time.monotonic() + wait
                return
        self._failed.pop(key, None)
        self.metrics.observe(namespace, name, time.monotonic() - started, result)
        if result is None:
            self.forget(namespace, name)
            return
        _, plan = result
        if plan.final:
            self._due.pop(key, None)
        else:
            resync = _resync_seconds(namespace, name)
            wait = resync if plan.requeue_after is None else min(max(plan.requeue_after, 0.0), resync)
            self._due[key] = time.monotonic() + wait

    def reconcile_now(self, namespace: str, name: str) -> tuple[dict[str, Any], Plan] | None:
        body = self.kube.get("WMTPRun", namespace, name)
        if body is None:
            return None  # deleted: its children go with it through their ownerReferences
        meta = body["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        plan = reconcile(body, self.kube.observe(body), now, self.defaults)
        stopped = self.kube.apply(namespace, name, meta["uid"], plan)
        if stopped is not None:
            refusal, written = stopped
            log.warning("%s/%s: %s %s refused: %s", namespace, name, refusal.kind, refusal.name, refusal.message)
            plan = refused(body, refusal, written, now)
            self.kube.apply(namespace, name, meta["uid"], plan)
        self.kube.post_events(body, plan.events, now)
        return body, plan

    async def resync(self) -> None:
        """Forever: a pass for every run that is due."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            now = time.monotonic()
            for (namespace, name), due in list(self._due.items()):
                if due <= now:
                    self._due[(namespace, name)] = math.inf  # until the pass reschedules it
                    task = asyncio.create_task(self.reconcile(namespace, name))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)


def _resync_seconds(namespace: str, name: str) -> float:
    """RESYNC_SECONDS stretched by up to half, stable per run: runs that all started together (an operator
    restart lists them at once) must not all resync in the same second ever after."""
    return RESYNC_SECONDS * (1 + 0.5 * zlib.crc32(f"{namespace}/{name}".encode()) / 2**32)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The operator posts its Events itself (kube.post_events); kopf's own per-handler chatter is not.
    settings.posting.enabled = False
    # A pass waits on the API server most of its time: as many at once as there are API connections.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(PASSES_AT_ONCE, "reconcile"))
    kube, defaults = Kube.from_environment(PASSES_AT_ONCE), Defaults.from_env(os.environ)
    memo.supervisor = Supervisor(kube, defaults, Metrics())
    memo.resync = asyncio.create_task(memo.supervisor.resync())


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def run_event(
    type: str | None, namespace: str, name: str, meta: Mapping[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    if type == "DELETED":
        memo.supervisor.forget(namespace, name)
    elif not memo.supervisor.own_echo(namespace, name, meta.get("resourceVersion")):
        await memo.supervisor.reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT})
@kopf.on.event("", "v1", "pods", labels={MANAGED_BY: OPERATOR, RUN_LABEL: kopf.PRESENT})
async def child_changed(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    await memo.supervisor.reconcile(namespace, labels[RUN_LABEL])
