"""Fixtures for the container end-to-end tests that `make e2e-local` runs once it has built the images.

Those tests need the images it names in WMTP_E2E_TRAINER_IMAGE and WMTP_E2E_OPERATOR_IMAGE and podman with the
project's containers.conf; elsewhere (`make test`) they are reported as skipped, never passed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest

SKIP_REASON = "needs the built images and podman: run by `make e2e-local`"


@dataclass(frozen=True)
class Images:
    trainer: str
    operator: str


@pytest.fixture(scope="session")
def images() -> Images:
    trainer, operator = os.environ.get("WMTP_E2E_TRAINER_IMAGE"), os.environ.get("WMTP_E2E_OPERATOR_IMAGE")
    if not (trainer and operator and shutil.which("podman")):
        pytest.skip(SKIP_REASON)
    return Images(trainer=trainer, operator=operator)


@pytest.fixture(scope="session")
def launcher(images: Images) -> bool:
    """Whether the trainer image has the launcher (its entry point) yet: `wmtp launch --help` succeeds."""
    from support.runtime import podman

    probe = podman("run", "--rm", "--pull=never", "--network", "none", images.trainer, "--help", check=False)
    return probe.returncode == 0
