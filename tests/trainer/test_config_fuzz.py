"""Bounded fuzzing of the config and recipe loaders: whatever the text or the data, only `ConfigError` escapes,
with a bounded message; and of the files the CLIs read (config, recipe, pull spec) with hostile values in real
documents: exit 2 (never 1), each within 2 s. A few thousand cases in all, in seconds (derandomized, so every run
tries the same)."""

from __future__ import annotations

import copy
import string
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from support import hostile
from wmtp import pull
from wmtp.config import (
    Config,
    ConfigError,
    Recipe,
    check_compatible,
    load_config,
    load_recipe,
    parse_config,
    parse_recipe,
    parse_yaml,
    read_document,
)
from wmtp.contract import RENDERED_MARKER
from wmtp.errors import describe

FUZZ = hostile.fuzz(600)
MESSAGE_BOUND = 10_000  # a whole report: at most 20 clipped problems

CONFIG = {
    "paths": {
        "models": {"base": "/m/base", "ref": "/m/ref", "rm": "s3://bucket/rm"},
        "datasets": {"humaneval": "/d/he.jsonl.gz"},
        "checkpoints": {"base_path": "s3://bucket/ckpt"},
    }
}
RECIPE = {
    "run": {"name": "r1"},
    "train": {"algo": "rho1-wmtp", "max_steps": 5},
    "data": {"sources": [{"name": "humaneval"}]},
}


def field_names(model: Any) -> set[str]:
    """Every field name of a pydantic model tree: the keys that reach deep into validation."""
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        annotation = info.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            names |= field_names(annotation)
    return names


KEYS = st.sampled_from(sorted(field_names(Config) | field_names(Recipe))) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["s3://", "s3://b/k", "file://", "gs://x", "/p\x00q", "rho1-wmtp", "../x", "${X}", "$(X)"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
DOTTED_RECIPE = [
    "run.name", "run.tags", "train.algo", "train.max_steps", "train.grad_accum", "optim.lr", "optim.betas",
    "optim.weight_decay", "optim.scheduler", "data.sources", "data.max_length", "data.batch_size", "data.pack",
    "data.eval_fraction", "loss.n_heads", "loss.temperature", "loss.epsilon", "loss.max_weight",
    "rho1.k_percent", "critic.gamma", "checkpointing", "checkpointing.checkpoint_path",
]  # fmt: skip
DOTTED_CONFIG = [
    "paths", "paths.models", "paths.models.base", "paths.datasets", "paths.checkpoints.save_interval",
    "paths.output_dir", "mlflow", "s3", "devices.compute_backend", "devices.distributed.timeout_s", "seed",
]  # fmt: skip


def with_value(data: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict | None) else {}
    node[leaf] = value
    return out


def only_config_errors(call: Any) -> Any:
    """`call()` within the fuzz's bounds, or None for the ConfigError it raised, whose message is bounded too."""
    try:
        return hostile.bounded(call)
    except ConfigError as err:
        assert len(str(err)) < MESSAGE_BOUND, len(str(err))
        return None


YAML_TEXT = st.text(alphabet=string.ascii_letters[:6] + "[]{}:&*!|>-?,#'\"\n \t%@`<=.0123456789\\\x00", max_size=200)


@FUZZ
@given(text=YAML_TEXT | st.text(max_size=100))
def test_any_text_parses_to_data_or_one_config_error(text: str) -> None:
    only_config_errors(lambda: parse_yaml(text, source="fuzz.yaml"))


@FUZZ
@given(data=st.binary(max_size=200), rendered=st.booleans())
def test_any_file_reads_to_a_mapping_or_one_config_error(tmp_path_factory: Any, data: bytes, rendered: bool) -> None:
    path = Path(tmp_path_factory.mktemp("fuzz")) / "doc.yaml"
    path.write_bytes(RENDERED_MARKER.encode() + data if rendered else data)
    document = only_config_errors(lambda: read_document(path))
    assert document is None or isinstance(document, dict)


@FUZZ
@given(data=st.dictionaries(KEYS, VALUES, max_size=6) | VALUES)
def test_any_data_validates_or_fails_with_one_config_error(data: Any) -> None:
    only_config_errors(lambda: parse_config(data))
    only_config_errors(lambda: parse_recipe(data))


@FUZZ
@given(
    config_field=st.sampled_from(DOTTED_CONFIG),
    recipe_field=st.sampled_from(DOTTED_RECIPE),
    config_value=VALUES,
    recipe_value=VALUES,
)
def test_one_wrong_field_in_a_good_pair_is_one_config_error(
    config_field: str, recipe_field: str, config_value: Any, recipe_value: Any
) -> None:
    config = only_config_errors(lambda: parse_config(with_value(CONFIG, config_field, config_value)))
    recipe = only_config_errors(lambda: parse_recipe(with_value(RECIPE, recipe_field, recipe_value)))
    if config is not None and recipe is not None:
        only_config_errors(lambda: check_compatible(config, recipe))


@FUZZ
@given(recipe_field=st.sampled_from(DOTTED_RECIPE), value=VALUES)
def test_one_wrong_field_through_yaml_text_is_one_config_error(recipe_field: str, value: Any) -> None:
    text = yaml.safe_dump(with_value(RECIPE, recipe_field, value))
    data = only_config_errors(lambda: parse_yaml(text, source="recipe.yaml"))
    if isinstance(data, dict):
        only_config_errors(lambda: parse_recipe(data))


@pytest.mark.parametrize("depth", [10, 1_000, 100_000])
def test_deep_nesting_is_one_config_error_or_data(depth: int) -> None:
    only_config_errors(lambda: parse_yaml("[" * depth + "]" * depth, source="deep.yaml"))
    only_config_errors(lambda: parse_recipe(nested(depth if depth < 10_000 else 5_000)))


def nested(depth: int) -> Any:
    data: Any = 1
    for _ in range(depth):
        data = {"run": data}
    return data


LOADERS = hostile.fuzz(150)


def exit_code(call: Any) -> int:
    """The exit code the CLI gives for what `call` raises (`wmtp.errors.describe`, as `reported` does); 0 if none."""
    try:
        code = call()
    except Exception as err:
        return describe(err)[1]
    return code if isinstance(code, int) else 0


def loaded_in_time(tmp: Path, text: str, load: Any) -> int:
    path = tmp / "document.yaml"
    path.write_text(text, errors="surrogatepass")
    return hostile.bounded(lambda: exit_code(lambda: load(path)))


@LOADERS
@given(text=hostile.documents(hostile.CONFIG))
def test_a_hostile_config_exits_2_in_time(tmp_path_factory: Any, text: str) -> None:
    assert loaded_in_time(tmp_path_factory.mktemp("config"), text, load_config) in (0, 2), text[:300]


@LOADERS
@given(text=hostile.documents(hostile.RECIPE))
def test_a_hostile_recipe_exits_2_in_time(tmp_path_factory: Any, text: str) -> None:
    assert loaded_in_time(tmp_path_factory.mktemp("recipe"), text, load_recipe) in (0, 2), text[:300]


@LOADERS
@given(text=hostile.documents(hostile.PULL_SPEC))
def test_a_hostile_pull_spec_exits_2_in_time(tmp_path_factory: Any, text: str) -> None:
    def pull_without_s3(path: Path) -> int:  # every check `wmtp pull` makes before it reaches S3
        return pull.main([], None, path, workers=1, part_size_mb=1, verify=False, endpoint_url=None, region=None)

    with mock.patch.object(pull, "_pull_dest", return_value=Counter()):
        assert loaded_in_time(tmp_path_factory.mktemp("pull"), text, pull_without_s3) in (0, 2), text[:300]
