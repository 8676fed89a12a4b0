"""Progress reports from trainer rank 0 to its WMTPRun's status, when it runs in a pod the operator created.

Only the standard library: a JSON merge patch of `wmtpruns/<name>/status` (step, loss, latestCheckpoint) over
HTTPS with the pod's service-account token, which needs nothing but `patch` on `wmtpruns/status`. Reporting is
best effort: a failure logs a warning and training goes on. The operator resumes a failed attempt from
`latestCheckpoint`, so report a checkpoint only once it is committed.
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
from pathlib import Path

from wmtp.contract import ENV_RUN_NAME, ENV_RUN_NAMESPACE, STATUS_PATH

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Reporter:
    """Patches one WMTPRun's status. `report` never raises."""

    def __init__(
        self,
        url: str,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        timeout_s: float = 3.0,
        backoff_s: float = 30.0,
    ) -> None:
        self.url = url
        self.token_file = token_file
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
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
        token, ca = service_account / "token", service_account / "ca.crt"
        return cls(url, token if token.is_file() else None, ca if ca.is_file() else None)

    def report(self, step: int, loss: float | None = None, latest_checkpoint: str | None = None) -> bool:
        """Patch step, loss (when finite) and latestCheckpoint (when given); True if the API server took it.

        After a failure, step-only reports pause for `backoff_s` so that an unreachable API server cannot slow
        training; checkpoint reports are always tried, because the operator resumes from them.
        """
        if latest_checkpoint is None and time.monotonic() < self._quiet_until:
            return False
        status: dict[str, object] = {"step": int(step)}
        if loss is not None and math.isfinite(loss):
            status["loss"] = float(loss)
        if latest_checkpoint is not None:
            status["latestCheckpoint"] = latest_checkpoint
        headers = {"Content-Type": "application/merge-patch+json", "Accept": "application/json"}
        try:
            # Projected service-account tokens rotate, so the file is read for every request.
            token = _read(self.token_file) if self.token_file else None
            if token:
                headers["Authorization"] = f"Bearer {token}"
            body = json.dumps({"status": status}).encode()
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
        return True


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
