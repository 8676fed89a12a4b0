"""Fixtures shared across the test tree: tiny offline models and a local S3 endpoint."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wmtp.config import S3Settings
from wmtp.storage import Storage


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread per process, before any test imports torch, and inherited by every trainer the tests
    start: the suite already runs more processes than cores and many tests start more (torchrun, two ranks), so
    threads beyond one only take turns on the same cores (the tiny models gain nothing from them), as torchrun
    itself assumes for its workers."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow first, in their files' order: the long ones start early and the short ones are left
    to fill the end (the other workers steal them from it, `--dist worksteal`), so the workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"base", "ref", "rm"} → tiny Llama HF directories with a tokenizer; built once per session."""
    from wmtp.models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on 127.0.0.1 (a free port), up for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Storage:
    """A Storage against the moto endpoint, with dummy credentials in the standard AWS environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return Storage(s3=S3Settings(endpoint_url=s3_endpoint))


@pytest.fixture
def s3_client(s3_storage: Storage) -> Any:
    """The boto3 client of `s3_storage`'s S3 backend: for putting objects in place behind the code under test."""
    return s3_storage.backends["s3"].client


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket, so tests sharing the session's server never see each other's objects."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name
