"""The API adapter against the emulated API server: it issues only the verbs of its table, and it never changes or
deletes an object that its run does not control."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import kubernetes
import pytest

from support.emulator import Emulator
from wmtp_operator.decoding import MAX_DEPTH, loads
from wmtp_operator.kube import ACCESS, ApiError, Kube, NotControlled
from wmtp_operator.plan import Create, Delete, PatchRun, Plan

NS = "kube-adapter"


@pytest.fixture(scope="module")
def kube(emulator: Emulator) -> Kube:
    configuration = kubernetes.client.Configuration()
    configuration.host = emulator.url
    return Kube(kubernetes.client.ApiClient(configuration))


def config_map(name: str, owner: str | None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "wmtp.io/v1alpha1", "kind": "WMTPRun", "name": "r", "uid": owner,
                                    "controller": True}]  # fmt: skip
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


@pytest.mark.parametrize(("verb", "kind"), [("delete", "Pod"), ("delete", "ConfigMap"), ("patch", "Service"),
                                            ("create", "Pod"), ("list", "Secret")])  # fmt: skip
def test_the_adapter_issues_no_verb_outside_its_table(verb: str, kind: str, kube: Kube) -> None:
    with pytest.raises((PermissionError, KeyError)):
        kube._call(verb, kind, NS, "x")
    assert kind not in ACCESS or verb not in ACCESS[kind].verbs


def test_an_existing_object_of_another_owner_is_never_updated(kube: Kube, emulator: Emulator) -> None:
    emulator.create(config_map("taken-config", None, recipe="theirs"))
    with pytest.raises(NotControlled, match="ConfigMap taken-config already exists, not controlled by this run"):
        kube.create(config_map("taken-config", "uid-mine", recipe="mine"), update=True)
    emulator.create(config_map("other-run-config", "uid-other", recipe="theirs"))
    with pytest.raises(NotControlled, match="controlled by uid uid-other"):
        kube.create(config_map("other-run-config", "uid-mine", recipe="mine"), update=True)
    for name in ("taken-config", "other-run-config"):
        assert emulator.get("ConfigMap", NS, name)["data"] == {"recipe": "theirs"}


def test_an_existing_object_of_the_same_run_is_updated(kube: Kube, emulator: Emulator) -> None:
    emulator.create(config_map("own-config", "uid-mine", recipe="old"))
    kube.create(config_map("own-config", "uid-mine", recipe="new"), update=True)
    assert emulator.get("ConfigMap", NS, "own-config")["data"] == {"recipe": "new"}


def test_a_delete_only_removes_the_object_of_that_uid(kube: Kube, emulator: Emulator) -> None:
    template = {"metadata": {"labels": {}}, "spec": {"containers": []}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "namesake-a1", "namespace": NS},
           "spec": {"completions": 1, "template": template}}  # fmt: skip
    created = emulator.create(job)
    kube.delete("Job", NS, "namesake-a1", uid="uid-of-an-earlier-namesake")
    assert emulator.get("Job", NS, "namesake-a1") is not None
    kube.delete("Job", NS, "namesake-a1", uid=created["metadata"]["uid"])
    assert emulator.get("Job", NS, "namesake-a1") is None


def test_a_patch_of_a_run_that_was_replaced_is_refused(
    kube: Kube, emulator: Emulator, make_run: Callable[..., dict[str, Any]]
) -> None:
    body = make_run()
    body["metadata"] = {"name": "replaced", "namespace": NS}
    emulator.create(copy.deepcopy(body))
    with pytest.raises(ApiError) as refused:
        kube.patch_run(NS, "replaced", "uid-of-the-deleted-run", {"spec": {"resumeFrom": "s3://b/x"}})
    assert refused.value.status == 409
    assert "resumeFrom" not in emulator.get("WMTPRun", NS, "replaced")["spec"]


def test_a_refusal_stops_the_plan_before_the_actions_after_it(
    kube: Kube, emulator: Emulator, make_run: Callable[..., dict[str, Any]]
) -> None:
    body = make_run()
    body["metadata"] = {"name": "refused", "namespace": NS}
    uid = emulator.create(body)["metadata"]["uid"]
    message = 'Service "refused" is invalid: spec.ports: Required value'
    emulator.refuse("Service", 422, "Invalid", message, namespace=NS)
    try:
        plan = Plan(
            [
                Create(config_map("refused-first", uid)),
                Create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "refused", "namespace": NS}}),
                Delete("Job", "never", "x"),
                PatchRun({"spec": {"resumeFrom": "s3://never"}}),
            ],
            {"phase": "Pending"},
        )
        refusal, state = kube.apply(NS, "refused", uid, plan)
    finally:
        emulator.accept()
    assert (refusal.kind, refusal.code, refusal.reason) == ("Service", 422, "Invalid") and state is None
    assert refusal.message == message
    run = emulator.get("WMTPRun", NS, "refused")
    assert emulator.get("ConfigMap", NS, "refused-first") and "resumeFrom" not in run["spec"] and not run.get("status")


@pytest.mark.parametrize(
    ("code", "reason", "tries"), [(413, "RequestEntityTooLarge", 1), (503, "ServiceUnavailable", 3)]
)
def test_a_create_refused_for_size_or_failing_again_and_again_is_a_refusal(
    code: int, reason: str, tries: int, kube: Kube, emulator: Emulator
) -> None:
    emulator.refuse("ConfigMap", code, reason, "no", namespace=NS)
    plan = Plan([Create(config_map(f"failing-{code}", "uid-mine"))])
    try:
        for _ in range(tries - 1):  # a 5xx may pass: the pass fails and is retried
            with pytest.raises(ApiError):
                kube.apply(NS, "r", "uid-mine", plan)
        refusal, _ = kube.apply(NS, "r", "uid-mine", plan)
    finally:
        emulator.accept()
    assert (refusal.kind, refusal.code, refusal.reason) == ("ConfigMap", code, reason)
    assert ("in a row" in refusal.message) == (tries > 1)


def test_api_bodies_decode_however_deep_and_whatever_their_integers() -> None:
    deep = '{"spec": {"recipe": ' + "[" * 5000 + '"]"' + "]" * 5000 + "}, " + '"n": ' + "9" * 5000 + "}"
    body = loads(deep.encode())
    value, depth = body["spec"]["recipe"], 2
    while value:
        value, depth = value[0], depth + 1
    assert depth == MAX_DEPTH and isinstance(body["n"], float)
    assert loads('{"a": "[[[[", "b": [1, {"c": "]}"}]}') == {"a": "[[[[", "b": [1, {"c": "]}"}]}
