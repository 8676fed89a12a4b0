"""What the trainer tells its WMTPRun: progress reports while it runs, and a termination message when it ends.

Reports: rank 0 merge-patches `status.report` = {attempt, step, loss, latestCheckpoint} of its own run over HTTPS
with the pod's service-account token (standard library only; the run's Role allows nothing else). The attempt
comes from the pod's environment, so the operator ignores what an older attempt still sends. Reporting is best
effort: a failure logs a warning and training goes on. The operator resumes a failed attempt from
`latestCheckpoint`, so a checkpoint is reported only once it is committed, and every report repeats it.

Termination message: one JSON object of at most TERMINATION_MESSAGE_MAX bytes in the file the kubelet copies into
the container's terminated state: why the process stopped (`wmtp.contract.STOP_*`), the step, the checkpoint to
resume from, a message, and warnings (a failed MLflow registration, a fallback resume) for the run's Events.
`wmtp eval` leaves one too, with its headline results.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wmtp.config import TERMINATION, clip, parse_json
from wmtp.contract import (
    ENV_ATTEMPT,
    ENV_RUN_NAME,
    ENV_RUN_NAMESPACE,
    ENV_TERMINATION_LOG,
    REPORT_FIELD,
    STATUS_PATH,
    STOP_FAILED,
    TERMINATION_EVAL,
    TERMINATION_FIELDS,
    TERMINATION_LOG,
    TERMINATION_MESSAGE_MAX,
)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Reporter:
    """Patches one WMTPRun's `status.report`. `report` never raises."""

    def __init__(
        self,
        url: str,
        attempt: int | None = None,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 3.0,
        backoff_s: float = 30.0,
    ) -> None:
        self.url = url
        self.attempt = attempt
        self.token_file = token_file
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.latest_checkpoint: str | None = None
        self._context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        self._quiet_until = 0.0
        self._failing = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, service_account: Path = SERVICE_ACCOUNT) -> Reporter | None:
        """A reporter for the run the pod's environment names, or None outside such a pod."""
        env = os.environ if env is None else env
        name, host = env.get(ENV_RUN_NAME), env.get("KUBERNETES_SERVICE_HOST")
        namespace = env.get(ENV_RUN_NAMESPACE) or _read(service_account / "namespace")
        if not (name and host and namespace):
            return None
        port = env.get("KUBERNETES_SERVICE_PORT", "443")
        host = f"[{host}]" if ":" in host else host  # an IPv6 service address
        url = f"https://{host}:{port}" + STATUS_PATH.format(namespace=namespace, name=name)
        attempt = env.get(ENV_ATTEMPT, "")
        token, ca = service_account / "token", service_account / "ca.crt"
        return cls(
            url,
            int(attempt) if attempt.isdigit() else None,
            token if token.is_file() else None,
            ca if ca.is_file() else None,
        )

    def report(self, step: int, loss: float | None = None, latest_checkpoint: str | None = None) -> bool:
        """Patch the report (the newest checkpoint given so far included); True if the API server took it.

        After a failure, step-only reports pause for `backoff_s` so that an unreachable API server cannot slow
        training; a report with a new checkpoint is always tried, because the operator resumes from it.
        """
        if latest_checkpoint is None and time.monotonic() < self._quiet_until:
            return False
        checkpoint = latest_checkpoint or self.latest_checkpoint
        report = {
            "attempt": self.attempt,
            "step": int(step),
            # NaN and infinities are not JSON; null leaves no stale loss behind.
            "loss": float(loss) if loss is not None and math.isfinite(loss) else None,
            "latestCheckpoint": checkpoint,
        }
        headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
        try:
            # Projected service-account tokens rotate, so the file is read for every request.
            token = _read(self.token_file) if self.token_file else None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            body = json.dumps({"status": {REPORT_FIELD: report}}).encode()
            request = urllib.request.Request(self.url, data=body, method="PATCH", headers=headers)
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as response:
                response.read()
        except Exception as err:  # reporting must never stop training, whatever went wrong
            self._quiet_until = time.monotonic() + self.backoff_s
            # One warning per run of failures; the rest at debug level.
            (log.debug if self._failing else log.warning)("progress report to %s failed: %s", self.url, err)
            self._failing = True
            return False
        if self._failing:
            log.info("progress reports to %s work again", self.url)
        self._failing = False
        self._quiet_until = 0.0
        self.latest_checkpoint = checkpoint
        return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass
class Termination:
    """The termination message: why a trainer process stopped, and what the operator needs to go on."""

    reason: str  # wmtp.contract.STOP_*
    exit_code: int
    message: str = ""
    step: int | None = None
    checkpoint: str | None = None
    warnings: list[str] = field(default_factory=list)
    eval: dict[str, Any] | None = None  # `wmtp eval`'s headline results (contract.TERMINATION_EVAL)

    def to_json(self, limit: int = TERMINATION_MESSAGE_MAX) -> bytes:
        """At most `limit` bytes (the kubelet keeps no more): warnings are dropped from the end, then the results
        (the message says so), then the message is cut, until it fits."""
        message, kept = clip(self.message, 1000), [clip(w, 500) for w in self.warnings]
        checkpoint = clip(self.checkpoint, 1000) if self.checkpoint else None
        results = self.eval
        while True:
            dropped = len(self.warnings) - len(kept)
            warnings = kept + ([f"({dropped} more warnings)"] if dropped else [])
            values = (self.reason, self.step, checkpoint, message, warnings, self.exit_code)
            fields = dict(zip(TERMINATION_FIELDS, values, strict=True))
            if results is not None:
                fields[TERMINATION_EVAL] = results
            # ASCII: json escapes everything else, so characters are bytes.
            data = json.dumps(fields).encode()
            if len(data) <= limit:
                return data
            if kept:
                kept.pop()
            elif results is not None:
                results = None
                message = f"{message}; the results did not fit the termination message: see the pod's log"
            else:
                message = message[: max(0, len(message) - (len(data) - limit) - 10)] + "… (cut)"

    @classmethod
    def from_json(cls, data: bytes) -> Termination | None:
        """A message written by a trainer process, or None if `data` is not one."""
        try:
            raw: dict[str, Any] = parse_json(data, TERMINATION)
            return cls(
                reason=str(raw["reason"]),
                exit_code=int(raw.get("exitCode", 1)),
                message=str(raw.get("message") or ""),
                step=raw.get("step"),
                checkpoint=raw.get("checkpoint"),
                warnings=[str(w) for w in raw.get("warnings") or []],
                eval=raw[TERMINATION_EVAL] if isinstance(raw.get(TERMINATION_EVAL), dict) else None,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def failed(self) -> bool:
        return self.reason == STOP_FAILED


def termination_log(env: Mapping[str, str] | None = None) -> Path | None:
    """Where the termination message goes: $WMTP_TERMINATION_LOG, else Kubernetes' /dev/termination-log when it is
    there to write (podman and plain hosts have none), else nowhere."""
    env = os.environ if env is None else env
    if env.get(ENV_TERMINATION_LOG):
        return Path(env[ENV_TERMINATION_LOG])
    default = Path(TERMINATION_LOG)
    return default if default.is_file() and os.access(default, os.W_OK) else None


def write_termination(termination: Termination, path: Path | None = None) -> Path | None:
    """Write the message (replacing any earlier one) where `termination_log` says; never raises."""
    path = path or termination_log()
    if path is None:
        return None
    try:
        path.write_bytes(termination.to_json())
    except OSError as err:
        log.warning("cannot write the termination message to %s: %s", path, err)
        return None
    return path


def read_termination(path: Path) -> Termination | None:
    try:
        return Termination.from_json(path.read_bytes()[:TERMINATION_MESSAGE_MAX])
    except OSError:
        return None
