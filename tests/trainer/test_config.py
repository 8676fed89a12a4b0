import copy
import re
from pathlib import Path

import pytest
import yaml

from wmtp.config import (
    ConfigError,
    checkpoint_root,
    config_hash,
    load,
    load_config,
    load_recipe,
    override_checkpointing,
    parse_yaml,
    read_document,
    redact_uri,
    resolve_checkpointing,
    substitute_env,
)
from wmtp.contract import RENDERED_MARKER

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

GOOD_CONFIG = {
    "paths": {
        "models": {"base": "/m/base", "ref": "/m/ref", "rm": "s3://bucket/rm"},
        "datasets": {"humaneval": "/d/he.jsonl.gz"},
        "checkpoints": {"base_path": "s3://bucket/ckpt", "save_interval": 10},
    }
}
GOOD_RECIPE = {
    "run": {"name": "r1"},
    "train": {"algo": "rho1-wmtp", "max_steps": 5},
    "data": {"sources": [{"name": "humaneval"}]},
}


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def with_change(data: dict, dotted: str, value: object) -> dict:
    """A deep copy of `data` with one dotted field set (value None deletes it)."""
    out = copy.deepcopy(data)
    *parents, leaf = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf)
    else:
        node[leaf] = value
    return out


def config_for(recipe: Path) -> Path:
    """recipe.7b.<algo>.yaml goes with config.7b.yaml; recipe.<algo>.yaml with config.local.yaml."""
    return CONFIGS / ("config.7b.yaml" if recipe.name.startswith("recipe.7b.") else "config.local.yaml")


def test_every_example_config_has_recipes() -> None:
    recipes = list(CONFIGS.glob("recipe.*.yaml"))
    assert {config_for(r).name for r in recipes} == {p.name for p in CONFIGS.glob("config.*.yaml")}


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("recipe.*.yaml")), ids=lambda p: p.name)
def test_every_example_config_and_recipe_loads(recipe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WMTP_HUMANEVAL", "/data/HumanEval.jsonl.gz")
    cfg, rcp = load(config_for(recipe), recipe)
    assert rcp.train.algo in recipe.name
    assert cfg.paths.models.base


@pytest.mark.parametrize(
    ("config", "recipe", "expected"),
    [
        pytest.param(
            GOOD_CONFIG,
            with_change(GOOD_RECIPE, "train.foo", 1),
            ["train.foo", "unknown key"],
            id="unknown-key",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(GOOD_RECIPE, "train.max_steps", "many"),
            ["train.max_steps"],
            id="wrong-type",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(with_change(GOOD_RECIPE, "train.train_only_extra_heads", True), "train.head_warmup_steps", 5),
            ["train", "head_warmup_steps has no use with train_only_extra_heads"],
            id="warmup-and-heads-only",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(with_change(GOOD_RECIPE, "train.train_only_extra_heads", True), "loss.n_heads", 1),
            ["train_only_extra_heads needs loss.n_heads of 2 or more"],
            id="heads-only-without-extra-heads",
        ),
        pytest.param(
            with_change(GOOD_CONFIG, "paths.models.ref", None),
            GOOD_RECIPE,
            ["paths.models.ref", "rho1-wmtp"],
            id="rho1-no-ref",
        ),
        pytest.param(
            with_change(GOOD_CONFIG, "paths.models.rm", None),
            with_change(GOOD_RECIPE, "train.algo", "critic-wmtp"),
            ["paths.models.rm", "critic-wmtp"],
            id="critic-no-rm",
        ),
        pytest.param(
            with_change(GOOD_CONFIG, "paths.models.base", "gs://b/m"),
            GOOD_RECIPE,
            ["paths.models.base", "unknown URI scheme 'gs'"],
            id="unknown-scheme",
        ),
        pytest.param(
            with_change(GOOD_CONFIG, "paths.checkpoints.save_interval", -5),
            GOOD_RECIPE,
            ["paths.checkpoints.save_interval", "greater than or equal to 1"],
            id="negative-save-interval",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(GOOD_RECIPE, "train.algo", "dpo"),
            ["train.algo", "baseline-mtp"],
            id="unknown-algo",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(GOOD_RECIPE, "data.sources", [{"name": "mbpp"}]),
            ["paths.datasets.mbpp", "humaneval"],
            id="undefined-dataset",
        ),
        pytest.param(
            GOOD_CONFIG,
            with_change(GOOD_RECIPE, "run.name", "Bad Name"),
            ["run.name", "pattern"],
            id="bad-run-name",
        ),
    ],
)
def test_bad_input_names_the_file_and_field(tmp_path: Path, config: dict, recipe: dict, expected: list[str]) -> None:
    config_path, recipe_path = write(tmp_path, "config.yaml", config), write(tmp_path, "recipe.yaml", recipe)
    with pytest.raises(ConfigError) as err:
        load(config_path, recipe_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for fragment in expected:
        assert fragment in message


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_all_problems_of_a_file_are_reported_together(tmp_path: Path) -> None:
    recipe = with_change(with_change(GOOD_RECIPE, "train.max_steps", 0), "data.batch_size", "x")
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "recipe.yaml", recipe))
    assert "2 problem(s)" in str(err.value)
    assert "train.max_steps" in str(err.value) and "data.batch_size" in str(err.value)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("a: ${X}", {"X": "1"}, "a: 1"),
        ("a: ${X:-d}", {}, "a: d"),
        ("a: ${X:-d}", {"X": ""}, "a: d"),
        ("a: ${X:-d}/b", {"X": "s3://x"}, "a: s3://x/b"),
        ("a: ${X:-}", {}, "a: "),
        ("a: $X", {"X": "1"}, "a: $X"),
    ],
)
def test_env_substitution(text: str, env: dict, expected: str) -> None:
    assert substitute_env(text, env) == expected


def test_unset_variable_without_default_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("paths: {models: {base: ${WMTP_TEST_UNSET_VAR}}}")
    with pytest.raises(ConfigError, match=r"config\.yaml: \$\{WMTP_TEST_UNSET_VAR\} is not set"):
        load_config(path)


# The URIs the WMTPRun CRD refuses (tests/operator/test_invalid_specs.py), refused by the trainer's own loader too:
# the shapes are written once, in wmtp.config.uris. (field, value, what the message says)
REFUSED_URIS = [
    ("paths.models.base", "s3://", "the bucket name must be 3-63"),
    ("paths.models.base", "s3://Bad_Bucket!/x", "the bucket name must be 3-63"),
    ("paths.models.base", "s3://bucket", "names a key"),
    ("paths.models.base", "/models/../../etc", "a `..` segment"),
    ("paths.models.ref", "s3://bucket/a//b", "an empty segment"),
    ("paths.models.rm", "~nouser-wmtp/x", "~nouser-wmtp/x"),
    ("paths.datasets.humaneval", "data/../../x.jsonl", "a `..` segment"),
    ("paths.checkpoints.base_path", "s3://bucket/ckpt/../other", "a `..` segment"),
    ("paths.output_dir", "../runs", "a local path"),
    ("s3.endpoint_url", "not a url", "an http:// or https:// URL"),
    ("s3.endpoint_url", "http://key:secret@minio:9000", "credentials do not belong in a URI"),
    ("s3.region", "us east 1", "s3.region"),
    ("mlflow.tracking_uri", "javascript:alert(1)", "is not an http(s):// URL"),
    ("mlflow.tracking_uri", "https://user:hunter2@mlflow.example", "credentials do not belong in a URI"),
]


@pytest.mark.parametrize(("field", "value", "says"), REFUSED_URIS, ids=[f"{f}={v}" for f, v, _ in REFUSED_URIS])
def test_a_uri_of_the_wrong_shape_is_refused_naming_the_field(
    tmp_path: Path, field: str, value: str, says: str
) -> None:
    path = write(tmp_path, "config.yaml", with_change(GOOD_CONFIG, field, value))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value) and says in str(err.value) and "hunter2" not in str(err.value), str(err.value)


def test_an_empty_value_from_an_unset_variable_leaves_a_url_unset(tmp_path: Path) -> None:
    config = with_change(GOOD_CONFIG, "s3", {"endpoint_url": "", "region": ""})
    loaded = load_config(write(tmp_path, "config.yaml", with_change(config, "mlflow.tracking_uri", "")))
    assert (loaded.s3.endpoint_url, loaded.s3.region, loaded.mlflow.tracking_uri) == (None, None, None)


def test_checkpoint_root_precedence(tmp_path: Path) -> None:
    config_path, recipe_path = write(tmp_path, "c.yaml", GOOD_CONFIG), write(tmp_path, "r.yaml", GOOD_RECIPE)
    cfg, rcp = load(config_path, recipe_path)
    assert checkpoint_root(cfg, rcp) == "s3://bucket/ckpt/r1"
    rcp.checkpointing.checkpoint_path = "/local/ck/"
    assert checkpoint_root(cfg, rcp) == "/local/ck/r1"
    rcp.checkpointing.checkpoint_path = None
    cfg.paths.checkpoints.base_path = None
    assert checkpoint_root(cfg, rcp) == "./checkpoints/r1"


def test_config_hash_ignores_outputs_but_not_training(tmp_path: Path) -> None:
    cfg, rcp = load(write(tmp_path, "c.yaml", GOOD_CONFIG), write(tmp_path, "r.yaml", GOOD_RECIPE))
    before = config_hash(cfg, rcp)
    cfg.paths.output_dir = "/elsewhere"
    cfg.mlflow.experiment = "other"
    assert config_hash(cfg, rcp) == before
    rcp.optim.lr = 1.0
    assert config_hash(cfg, rcp) != before


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (BOMB, "values once its aliases are expanded"),
        ("a: &a [1, *a]", "a YAML alias refers to itself"),
        (b"run: {name: caf\xe9}", "not UTF-8 text (byte 15)"),
        ("x" * 2_000_000, "more than the 1048576 a document may have"),
        ("a: [", "not valid YAML"),
    ],
)
def test_yaml_is_bounded_and_every_failure_is_one_config_error(data: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        parse_yaml(data, source="recipe.yaml")
    assert str(err.value).startswith("recipe.yaml: ") and len(str(err.value)) < 600


def test_rendered_files_are_data_while_user_files_expand_variables(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WMTP_TEST_SECRET", "s3cr3t")
    user, rendered = tmp_path / "user.yaml", tmp_path / "rendered.yaml"
    user.write_text("tag: ${WMTP_TEST_SECRET}\n")
    rendered.write_text(RENDERED_MARKER + "tag: ${WMTP_TEST_SECRET}\n")
    assert read_document(user) == {"tag": "s3cr3t"}
    assert read_document(rendered) == {"tag": "${WMTP_TEST_SECRET}"}


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cr3t@mlflow.example.com/x", "https://***@mlflow.example.com/x"),
        ("http://token@host:5000", "http://***@host:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
        ("http://u:p@ss@host:5000/x@y", "http://***@host:5000/x@y"),
        ("MLflow at http://u:pw@a:1: failed (http://t@b/c)", "MLflow at http://***@a:1: failed (http://***@b/c)"),
    ],
)
def test_credentials_in_a_uri_are_redacted(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


@pytest.mark.parametrize(
    ("document", "dotted", "text", "fragment"),
    [
        ("recipe", "optim.lr", "lr: .inf", "optim.lr: Input should be a finite number"),
        ("recipe", "optim.lr", "lr: .nan", "optim.lr: Input should be a finite number"),
        ("recipe", "optim.lr", "lr: -.inf", "optim.lr"),
        ("recipe", "optim.lr", "lr: 3", "optim.lr: Input should be less than or equal to 1"),
        ("recipe", "optim.betas", "betas: [2, -1]", "optim.betas.0: Input should be less than 1"),
        ("recipe", "optim.betas", "betas: [0.9, -1]", "optim.betas.1: Input should be greater than or equal to 0"),
        ("recipe", "optim.betas", "betas: [0.9]", "optim.betas.1: Field required"),
        ("recipe", "optim.grad_clip", "grad_clip: .inf", "optim.grad_clip"),
        ("recipe", "optim.weight_decay", "weight_decay: -0.1", "optim.weight_decay"),
        ("recipe", "loss.temperature", "temperature: 0", "loss.temperature"),
        ("recipe", "loss.epsilon", "epsilon: 2", "loss.epsilon: Input should be less than or equal to 1"),
        ("recipe", "loss.max_weight", "max_weight: 0.5", "loss.max_weight: Input should be greater than or equal to 1"),
        ("recipe", "critic.gamma", "gamma: .nan", "critic.gamma"),
        ("recipe", "data.max_length", "max_length: 1000000000", "data.max_length"),
        ("recipe", "data.eval_fraction", "eval_fraction: 1", "data.eval_fraction"),
        ("recipe", "run.tags", "tags: {k: " + "v" * 6000 + "}", "run.tags.k"),
        ("config", "seed", "seed: -1", "seed: Input should be greater than or equal to 0"),
        ("config", "seed", "seed: 4294967296", "seed: Input should be less than 4294967296"),
        ("config", "devices.distributed.timeout_s", "timeout_s: 1000000000000", "devices.distributed.timeout_s"),
        ("config", "paths.datasets", "datasets: {'../x': /d.jsonl}", "paths.datasets.../x"),
    ],
)
def test_numbers_and_names_out_of_range_are_refused_at_load_naming_the_field(
    tmp_path: Path, document: str, dotted: str, text: str, fragment: str
) -> None:
    doc = copy.deepcopy(GOOD_RECIPE if document == "recipe" else GOOD_CONFIG)
    node = doc
    for part in dotted.split(".")[:-1]:  # the section the YAML snippet goes into
        node = node.setdefault(part, {})
    node.update(yaml.safe_load(text))
    path = write(tmp_path, f"{document}.yaml", doc)
    with pytest.raises(ConfigError) as err:
        (load_recipe if document == "recipe" else load_config)(path)
    assert fragment in str(err.value), err.value
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("recipe_section", "flags", "expected"),
    [
        ({}, {}, (10, 3, True, "s3://bucket/ckpt")),
        ({"save_interval": 2, "keep_last": 1, "save_final": False}, {}, (2, 1, False, "s3://bucket/ckpt")),
        ({"save_interval": 2, "checkpoint_path": "/local/ck"}, {"save_interval": 5}, (5, 3, True, "/local/ck")),
        (
            {"keep_last": 1, "save_final": False},
            {"keep_last": 4, "save_final": True},
            (10, 4, True, "s3://bucket/ckpt"),
        ),
        ({}, {"save_interval": None, "save_final": False}, (10, 3, False, "s3://bucket/ckpt")),
    ],
)
def test_checkpoint_settings_resolve_cli_over_recipe_over_config(
    tmp_path: Path, recipe_section: dict, flags: dict, expected: tuple
) -> None:
    recipe = with_change(GOOD_RECIPE, "checkpointing", recipe_section or None) if recipe_section else GOOD_RECIPE
    cfg, rcp = load(write(tmp_path, "c.yaml", GOOD_CONFIG), write(tmp_path, "r.yaml", recipe))
    resolved = resolve_checkpointing(cfg, override_checkpointing(rcp, **flags)).paths.checkpoints
    assert (resolved.save_interval, resolved.keep_last, resolved.save_final, resolved.base_path) == expected
    assert cfg.paths.checkpoints.save_interval == 10  # the loaded config itself is left alone


def test_checkpoint_settings_never_change_the_resume_fingerprint(tmp_path: Path) -> None:
    cfg, rcp = load(write(tmp_path, "c.yaml", GOOD_CONFIG), write(tmp_path, "r.yaml", GOOD_RECIPE))
    before = config_hash(cfg, rcp)
    other = override_checkpointing(rcp, save_interval=7, keep_last=9, save_final=False)
    cfg.paths.checkpoints.keep_last, cfg.log_interval = 1, 99
    assert config_hash(resolve_checkpointing(cfg, other), other) == before


def test_recipe_checkpoint_settings_are_bounded(tmp_path: Path) -> None:
    recipe = with_change(GOOD_RECIPE, "checkpointing", {"save_interval": 0, "keep_last": "many"})
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "r.yaml", recipe))
    assert "checkpointing.save_interval" in str(err.value) and "checkpointing.keep_last" in str(err.value)
