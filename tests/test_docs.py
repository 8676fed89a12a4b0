"""The README and docs/ against the code: every command in a fenced shell block and every relative link must name
something that exists, so a renamed flag, target, file or heading fails here rather than in a reader's terminal.

Checked, per command: `make X` names a Makefile target; `wmtp SUB ... --flag` (also `python -m wmtp`, and the
`-m wmtp train ...` after `wmtp launch --`) names a subcommand of `wmtp.cli:app` and flags it accepts;
`wmtp-operator` flags its parser accepts; a repo path a `helm` or `kubectl` command names exists, and a WMTPRun
resource or `kubectl explain` field path is one the CRD has. Per link: the file exists, and a `#fragment` into a
Markdown file is one of its headings (GitHub's anchors). The README stays a front door: under 1,500 words, its
first commands `make quickstart` and `make test`.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from wmtp.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SEPARATORS = {"&&", "||", ";", "|"}
MAX_README_WORDS = 1500


def shell_blocks(text: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in SHELL]


def dropped(word: str, before: list[str]) -> bool:
    """A redirection, its target, or an environment assignment ahead of the command."""
    redirected = word.startswith((">", "<")) or (before and before[-1] in (">", ">>", "<"))
    return bool(redirected or (not before and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word)))


def commands(block: str) -> list[list[str]]:
    """Each command of a shell block as its words: continuations joined, comments, redirections and leading
    `VAR=value` assignments dropped, `a && b` split."""
    found: list[list[str]] = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, ";"]:
            if word in SEPARATORS:
                found += [current] if current else []
                current = []
            elif not dropped(word, current):
                current.append(word)
    return found


@cache
def make_targets() -> frozenset[str]:
    rules = re.findall(r"^([A-Za-z0-9_.-][^:=\n]*):(?!=)", (ROOT / "Makefile").read_text(), re.M)
    return frozenset(name for rule in rules for name in rule.split())


@cache
def crd() -> dict:
    return yaml.safe_load((ROOT / "crds" / "wmtpruns.yaml").read_text())


def crd_names() -> set[str]:
    names = crd()["spec"]["names"]
    return {names["plural"], names["singular"], names["kind"].lower(), *names.get("shortNames", [])}


@cache
def operator_help() -> str:
    from wmtp_operator.__main__ import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):  # argparse exits after --help
        parse_args(["--help"])
    return out.getvalue()


def flag_of(word: str) -> str | None:
    """The option a word names (`--x=1` → `--x`), or None for a value, `-` or `--`."""
    if word in ("-", "--") or not word.startswith("-") or re.fullmatch(r"-\d[\d.]*", word):
        return None
    return word.split("=", 1)[0]


def resolve(args: list[str]) -> tuple[list[str], Any, list[str]]:
    """`wmtp ARGS` as (the subcommand path, its click command or None where a name is unknown, the words after
    it). Duck-typed: typer may build its commands on a click of its own."""
    command = typer.main.get_command(app)
    path: list[str] = []
    rest = list(args)
    while hasattr(command, "get_command") and rest and not rest[0].startswith("-"):
        sub = command.get_command(command.context_class(command), rest[0])
        if sub is None:
            return path, None, rest
        path.append(rest.pop(0))
        command = sub
    return path, command, rest


def check_wmtp(args: list[str]) -> list[str]:
    """Problems with `wmtp ARGS`: unknown subcommands and flags; `launch`'s torchrun part is checked only where
    it runs `-m wmtp` again."""
    path, command, rest = resolve(args)
    if command is None:
        return [f"wmtp {' '.join(path)}: no subcommand {rest[0]!r}".replace("  ", " ")]
    accepted = {"--help"} | {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    problems = []
    for i, word in enumerate(rest):
        if word == "--":
            torchrun = rest[i + 1 :]
            if "-m" in torchrun and torchrun[torchrun.index("-m") + 1 : torchrun.index("-m") + 2] == ["wmtp"]:
                problems += check_wmtp(torchrun[torchrun.index("-m") + 2 :])
            break
        flag = flag_of(word)
        if flag is not None and flag not in accepted:
            problems.append(f"wmtp {' '.join(path)}: no option {flag!r}")
    return problems


def check_operator(args: list[str]) -> list[str]:
    known = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", operator_help()))
    return [f"wmtp-operator: no option {flag!r}" for flag in map(flag_of, args) if flag and flag not in known]


def check_cluster_tool(words: list[str]) -> list[str]:
    """helm/kubectl: repo paths exist; WMTPRun resource names and explained field paths are the CRD's."""
    problems = []
    top = {p.name for p in ROOT.iterdir()}
    for i, word in enumerate(words[1:], 1):
        if word.startswith("-") or "://" in word:
            continue
        after_file_flag = words[i - 1] in ("-f", "--filename", "--values")
        in_repo = "/" in word and word.split("/", 1)[0] in top
        if (after_file_flag or in_repo) and not (ROOT / word).exists():
            problems.append(f"{words[0]}: {word} does not exist in the repository")
    verb = words[1] if len(words) > 1 else ""
    if words[0] == "kubectl" and verb in ("get", "describe", "delete", "edit", "explain", "wait") and len(words) > 2:
        resource, *fields = words[2].split("/")[0].split(".")
        if (resource.startswith("wmtp") or resource == "wr") and resource not in crd_names():
            problems.append(f"kubectl: {resource!r} is not a name of the WMTPRun CRD")
        elif resource in crd_names() and verb == "explain":
            node = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
            for field in fields:
                node = node.get("properties", {}).get(field, {})
                if not node:
                    problems.append(f"kubectl explain: the CRD has no field {words[2]!r}")
                    break
    return problems


def check_command(words: list[str]) -> list[str]:
    name = Path(words[0]).name
    if name == "make":
        return [f"make: no target {w!r}" for w in words[1:] if not w.startswith("-") and "=" not in w
                and w not in make_targets()]  # fmt: skip
    if name == "wmtp":
        return check_wmtp(words[1:])
    if name.startswith("python") and words[1:3] == ["-m", "wmtp"]:
        return check_wmtp(words[3:])
    if name == "wmtp-operator" or (name.startswith("python") and words[1:3] == ["-m", "wmtp_operator"]):
        return check_operator(words[1 if name == "wmtp-operator" else 3 :])
    if name in ("helm", "kubectl"):
        return check_cluster_tool([name, *words[1:]])
    return []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", text), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
    return {f"{base}-{i}" if i else base for base, n in seen.items() for i in range(n)}


def check_links(text: str, page: Path) -> list[str]:
    problems = []
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))  # a link's text may be code; code is never a link
    for target in LINK.findall(prose):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            problems.append(f"link {target}: {path} does not exist")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            problems.append(f"link {target}: {file.name} has no heading #{fragment}")
    return problems


def problems(text: str, page: Path) -> list[str]:
    found = [p for block in shell_blocks(text) for words in commands(block) for p in check_command(words)]
    return found + check_links(text, page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_link_in_the_page_names_something_that_exists(page: Path) -> None:
    assert problems(page.read_text(), page) == []


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("```bash\nwmtp train --config c.yaml --no-such-flag\n```", "wmtp train: no option '--no-such-flag'"),
        ("```bash\nwmtp checkpoints prune s3://b/run \\\n  --keep 2 --keep-all\n```", "no option '--keep-all'"),
        ("```bash\nwmtp launch -- --nnodes 2 -m wmtp train -c c.yaml --resum latest\n```", "no option '--resum'"),
        ("```bash\nwmtp frobnicate --help\n```", "no subcommand 'frobnicate'"),
        ("```bash\nWMTP_MODELS=m wmtp validate -c c.yaml --recipee r.yaml\n```", "no option '--recipee'"),
        ("```sh\nmake quickstart && make deploy\n```", "make: no target 'deploy'"),
        ("```bash\nwmtp-operator --watch-all\n```", "wmtp-operator: no option '--watch-all'"),
        ("```bash\nkubectl apply -f configs/no-such-run.yaml\n```", "configs/no-such-run.yaml does not exist"),
        ("```bash\nhelm install wmtp charts/nope\n```", "charts/nope does not exist"),
        ("```bash\nkubectl get wmtpjobs\n```", "'wmtpjobs' is not a name of the WMTPRun CRD"),
        ("```bash\nkubectl explain wmtprun.spec.evaluation\n```", "no field 'wmtprun.spec.evaluation'"),
        ("See [pulling](docs/pull.md).", "docs/pull.md does not exist"),
        ("See [it](docs/operator.md#no-such-heading).", "operator.md has no heading #no-such-heading"),
    ],
)
def test_a_doc_naming_what_does_not_exist_is_caught(snippet: str, problem: str) -> None:
    found = problems(snippet, ROOT / "README.md")
    assert any(problem in line for line in found), found


def test_a_correct_snippet_passes() -> None:
    snippet = "```bash\nwmtp eval --model m --tasks humaneval,mbpp --dataset mbpp=s3://d \\\n   --k 1,10\n```"
    assert problems(snippet, ROOT / "README.md") == []


def test_the_subcommands_the_docs_name_answer_help() -> None:
    named = {tuple(resolve(words[1:])[0]) for page in PAGES for block in shell_blocks(page.read_text())
             for words in commands(block) if words[0] == "wmtp"}  # fmt: skip
    runner = CliRunner()
    assert {("train",), ("validate",), ("pull",), ("eval",), ("launch",)} <= named
    for path in sorted(named | {()}):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)


def test_the_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.split()) < MAX_README_WORDS
    assert commands(shell_blocks(text)[0])[:2] == [["make", "quickstart"], ["make", "test"]]


def test_the_operator_page_lists_every_top_level_field_of_the_crd() -> None:
    text = (ROOT / "docs" / "operator.md").read_text()
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    for part in ("spec", "status"):
        listed = set(re.findall(r"^\| `(\w+)` \|", text.split(f"| {part} field |", 1)[1].split("\n\n", 1)[0], re.M))
        assert listed == set(schema[part]["properties"]), part
