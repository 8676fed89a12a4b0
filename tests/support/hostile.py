"""Hostile YAML documents for fuzzing the loaders (config, recipe, pull spec, a recipeRef's text): a real document
with each of its values replaced, as text, by something a user or an attacker could write there."""

from __future__ import annotations

import json

from hypothesis import strategies as st

NASTY = [
    "~nouser/x", "~/x", "s3://", "s3://Bad_Bucket!/x", "s3://ab/x", "/a/../b", "models/base", "not a url",
    "javascript:alert(1)", "http://u:p@h:1", "''", "null", "1e999", "-.inf", ".nan", "*undefined", "&a [*a, *a]",
    "!!python/object/apply:os.system [ls]", "!!binary AAAA", "!!binary '!!'", "2001-13-40", "2001-12-14 99:99:99",
    "!!int 0x" + "f" * 80, "!!float 1" + "0" * 400, "0o" + "7" * 100, "0b" + "1" * 300, "1_" * 40 + "1",
    "190:20:30", "1:" * 40 + "1", "!!timestamp x", "!!set {a, b}", "!!omap [a: 1]", "<<: *x", "? [a]: b",
    "{a: 1, a: 2}", "'\\x00'", '"\\ud800"', '"\\U0010ffff"', "|-\n  block", "--- a\n--- b", "%YAML 1.1\n--- x",
]  # fmt: skip
HOSTILE_VALUE = st.one_of(
    st.integers(60, 6000).map(lambda n: "9" * n),  # past int64, and past Python's 4,300 digits
    st.integers(60, 6000).map(lambda n: "-0x" + "f" * n),
    st.integers(1, 300).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 300).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.integers(200, 600).map(lambda n: "/m/" + "a" * n),  # a name no file system takes
    st.integers(200, 600).map(lambda n: "s3://bucket/" + "k" * n + "/x"),
    st.sampled_from(NASTY),
    st.text(max_size=40).map(json.dumps),  # any string, quoted
    st.text(alphabet="[]{}:,&*!|>-?#'\" \n\t%@`", max_size=30),
    st.from_regex(r"[a-z0-9./:_-]{0,40}", fullmatch=True),
)

CONFIG = """\
paths:
  models: {{base: {0}, ref: {1}, rm: /m/rm}}
  datasets: {{humaneval: {2}, {3}: /d/x.jsonl}}
  checkpoints: {{base_path: {4}, save_interval: {5}, keep_last: 2}}
  output_dir: {6}
mlflow: {{tracking_uri: {7}, experiment: {8}}}
s3: {{endpoint_url: {9}, region: {10}}}
devices: {{distributed: {{timeout_s: {11}}}}}
seed: {12}
"""
RECIPE = """\
run: {{name: {0}, tags: {{{1}: {2}}}}}
train: {{algo: {3}, max_steps: {4}, grad_accum: {5}}}
data:
  sources: [{{name: {6}, languages: [{7}], max_samples: {8}}}]
  max_length: {9}
optim: {{lr: {10}, betas: [{11}, 0.95]}}
checkpointing: {{checkpoint_path: {12}}}
"""
PULL_SPEC = """\
- {{uri: {0}, dest: {1}}}
- {{uri: s3://models/{2}, dest: {3}}}
"""
SLOTS = {CONFIG: 13, RECIPE: 13, PULL_SPEC: 4}
GOOD = {
    CONFIG: ["/m/base", "/m/ref", "/d/he.jsonl", "extra", "s3://bucket/ckpt", "20", "./runs", "http://mlflow:5000",
             "wmtp", "http://minio:9000", "us-east-1", "600", "42"],
    RECIPE: ["r1", "owner", "me", "baseline-mtp", "5", "1", "humaneval", "python3", "10", "128", "0.001", "0.9",
             "null"],
    PULL_SPEC: ["s3://models/base", "/models/base", "ref", "/models/ref"],
}  # fmt: skip


def documents(template: str) -> st.SearchStrategy[str]:
    """`template` with some of its values (one to all) replaced by hostile ones."""
    count = SLOTS[template]
    replaced = st.lists(st.tuples(st.integers(0, count - 1), HOSTILE_VALUE), min_size=1, max_size=count)

    def fill(edits: list[tuple[int, str]]) -> str:
        values = list(GOOD[template])
        for slot, value in edits:
            values[slot] = value
        return template.format(*values)

    return replaced.map(fill)
