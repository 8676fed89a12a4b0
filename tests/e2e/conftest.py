"""Fixtures for the container end-to-end tests that `make e2e-local` (and `make e2e-kind`) run once the images
are built.

They need the images named in WMTP_E2E_TRAINER_IMAGE and WMTP_E2E_OPERATOR_IMAGE, and the engine that holds them
($ENGINE: podman, with the project's containers.conf, unless kind.sh says docker); elsewhere (`make test`) they
are reported as skipped, never passed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import pytest

SKIP_REASON = "needs the built images and a container engine: run by `make e2e-local`"


@dataclass(frozen=True)
class Images:
    trainer: str
    operator: str
    engine: str


@pytest.fixture(scope="session")
def images() -> Images:
    trainer, operator = os.environ.get("WMTP_E2E_TRAINER_IMAGE"), os.environ.get("WMTP_E2E_OPERATOR_IMAGE")
    engine = os.environ.get("ENGINE", "podman")
    if not (trainer and operator and shutil.which(engine)):
        pytest.skip(SKIP_REASON)
    return Images(trainer=trainer, operator=operator, engine=engine)
