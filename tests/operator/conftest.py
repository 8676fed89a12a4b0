"""Fixtures for the operator tests: WMTPRun bodies, the CRD and its rules, the emulated API server."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_run() -> dict[str, Any]:
    """The tiny CPU example of configs/wmtprun.yaml as the API server would store it, training only: the tests of
    spec.eval add their own."""
    documents = yaml.safe_load_all((ROOT / "configs" / "wmtprun.yaml").read_text())
    body = next(doc for doc in documents if doc["kind"] == "WMTPRun")
    del body["spec"]["eval"]
    body["metadata"].update(namespace="team-a", uid="0d2c1b7e-run-uid", generation=1)
    return body


@pytest.fixture
def make_run(tiny_run: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """The tiny run with dotted-path overrides, e.g. make_run(**{"spec.nodes": 4}); None deletes the key."""

    def make(**overrides: Any) -> dict[str, Any]:
        body = copy.deepcopy(tiny_run)
        for dotted, value in overrides.items():
            *parents, last = dotted.split(".")
            node = body
            for key in parents:
                node = node.setdefault(key, {})
            if value is None:
                node.pop(last, None)
            else:
                node[last] = value
        return body

    return make


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "crds" / "wmtpruns.yaml").read_text())


@pytest.fixture(scope="session")
def run_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused: the API server would prune them, silently losing the setting."""
    out = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-") and key != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        out["type"] = [schema["type"], "null"]
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if schema.get(exclusive) is True:  # OpenAPI v3's flag → the JSON Schema draft 7 number
            out[exclusive] = out.pop(bound)
    if "properties" in schema:
        out["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _strict(schema["items"])
    return out


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """Apply the schema's defaults the way the API server does: only inside objects that exist."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _defaulted(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        value = [_defaulted(schema["items"], item) for item in value]
    return value


_ABSENT = object()


def _cel_failures(schema: dict[str, Any], value: Any, env: celpy.Environment, old: Any = _ABSENT) -> list[str]:
    """The messages of the rules `value` breaks; transition rules (oldSelf) only on an update where the old
    object had this field too, as the API server runs them."""
    messages = []
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is _ABSENT:
            continue
        program = env.program(env.compile(rule["rule"]))
        activation = {"self": celpy.json_to_cel(value)}
        if old is not _ABSENT:
            activation["oldSelf"] = celpy.json_to_cel(old)
        try:
            admitted = bool(program.evaluate(activation))
        except celpy.CELEvalError:
            continue  # a value of the wrong type: the schema has refused it already, as the API server does
        if not admitted:
            messages.append(rule["message"])
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                before = old.get(name, _ABSENT) if isinstance(old, dict) else _ABSENT
                messages += _cel_failures(sub, value[name], env, before)
    if isinstance(value, list) and "items" in schema:
        for item in value:
            messages += _cel_failures(schema["items"], item, env)
    return messages


@pytest.fixture(scope="session")
def admit(run_schema: dict[str, Any]) -> Callable[..., list[str]]:
    """What the API server would say to a WMTPRun (`old`: the stored one, for an update): defaults, then the
    schema, then the CEL rules.

    Returns every problem (schema errors as 'path: message', then the failed rules' messages); [] is admitted.
    """
    strict, env = _strict(run_schema), celpy.Environment()

    def check(body: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        body = _defaulted(run_schema, body)
        errors = [
            f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in jsonschema.Draft7Validator(strict).iter_errors(body)
        ]
        before = _ABSENT if old is None else _defaulted(run_schema, old)
        return errors + _cel_failures(run_schema, body, env, before)

    return check


@pytest.fixture(scope="session")
def crd_defaults(run_schema: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A WMTPRun as the API server stores it: with the schema's defaults applied."""
    return lambda body: _defaulted(run_schema, body)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    from support.emulator import Emulator

    # The API server it plays (Go) stores and serves objects nested ~1000 levels deep; in this process that takes a
    # deeper stack than Python's default. The operator runs in its own process, with the default.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    server = Emulator()
    yield server
    server.close()
    sys.setrecursionlimit(limit)


@pytest.fixture(scope="module")
def operator_process(emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The real `python -m wmtp_operator` against the emulator, for the whole test module."""
    from support.emulator import OperatorProcess

    # As the chart starts it: runs that name no tracking server report to the chart's.
    env = {
        "WMTP_DEFAULT_MLFLOW_URI": "http://wmtp-mlflow.wmtp-system.svc:5000",
        "WMTP_OPERATOR_SERVICE_ACCOUNT": "wmtp-system/wmtp",  # no run may name it
    }
    process = OperatorProcess(emulator, tmp_path_factory.mktemp("operator"), env=env)
    yield process
    process.stop()
