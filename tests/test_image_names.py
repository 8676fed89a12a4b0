"""One name per image: what the chart (default values) and the examples in configs/ run is what `make images`
tags and `make push` pushes, read from their own single definitions (the Makefile's REGISTRY and TAG, and
images/engine.sh's image_ref), not restated here."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from support.chart import render

ROOT = Path(__file__).resolve().parents[1]
# Images the chart runs that are not the project's: the MLflow server and the `helm test` hook's kubectl.
THIRD_PARTY = {"ghcr.io/mlflow/mlflow", "bitnami/kubectl"}
_CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "TAG", "TORCH_VARIANT", "IMAGES", "ENGINE")}


def _make_dry_run(target: str) -> dict[str, str]:
    """The variables `make TARGET` hands its script (`make -n` prints the command without running it)."""
    done = subprocess.run(["make", "-n", target], cwd=ROOT, env=_CLEAN_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"\b([A-Z_]+)=(\S*)", done.stdout))


def built() -> dict[str, str]:
    """{operator|trainer: the reference `make images` tags}, by images/engine.sh's own image_ref."""
    given = _make_dry_run("images")
    script = 'source images/engine.sh; for image in $IMAGES; do echo "$image $(image_ref "$image")"; done'
    env = {**_CLEAN_ENV, "ENGINE": "docker", "REGISTRY": given["REGISTRY"], "TAG": given["TAG"]}
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return dict(line.split() for line in done.stdout.splitlines())


def _images(obj: Any) -> list[str]:
    """Every container image an object names, however deep (Deployments, Pods, hooks)."""
    if isinstance(obj, dict):
        own = [obj["image"]] if isinstance(obj.get("image"), str) and "name" in obj else []
        return own + [image for value in obj.values() for image in _images(value)]
    if isinstance(obj, list):
        return [image for value in obj for image in _images(value)]
    return []


def _repository(reference: str) -> str:
    return re.sub(r"(:[\w][\w.-]*)?(@sha256:[0-9a-f]+)?$", "", reference)


def test_make_images_tags_registry_slash_wmtp_name_colon_the_version_and_make_push_pushes_the_same() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((ROOT / "charts" / "wmtp" / "Chart.yaml").read_text())
    expected = {name: f"ghcr.io/wmtp/wmtp-{name}:{version}" for name in ("operator", "trainer")}
    assert built() == expected and chart["appVersion"] == version
    pushed, images = _make_dry_run("push"), _make_dry_run("images")
    assert {key: pushed[key] for key in ("REGISTRY", "TAG")} == {key: images[key] for key in ("REGISTRY", "TAG")}


def test_the_chart_and_the_examples_name_only_images_make_images_builds() -> None:
    images = built()
    objects = render()
    deployment = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "wmtp")
    assert _images(deployment["spec"]["template"]) == [images["operator"]]
    runs = [
        doc
        for path in sorted((ROOT / "configs").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "WMTPRun"
    ]
    assert runs and {run["spec"]["image"] for run in runs} == {images["trainer"]}
    named = set(_images(objects)) | {run["spec"]["image"] for run in runs}
    ours = {_repository(reference) for reference in images.values()}
    unknown = {image for image in named if _repository(image) not in ours | THIRD_PARTY}
    assert unknown == set(), "images no `make images` builds"
    assert {image for image in named if _repository(image) in ours} <= set(images.values())
