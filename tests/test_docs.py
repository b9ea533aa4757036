"""README, docs/ and packaging agree with the code: commands, options, config keys, paths, links.

The checks read facts, not prose: every ``bida`` command the docs name exists in the parser,
every dotted config key exists in the schema, every repository path exists, every docs page
is linked from README, every config is listed in docs/recipes.md.
"""

from __future__ import annotations

import argparse
import inspect
import re
import tomllib
from pathlib import Path

import pytest

from bida.config import Config, to_dict
from bida.tools import cli
from bida.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README_PATH = ROOT / "README.md"
README = README_PATH.read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README_PATH, *DOCS]
MAX_README_LINES = 250

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser, keyed ``train``, ``data check``, ..."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = _subparsers(sub)
                out.update({f"{name} {k}": v for k, v in nested.items()} if nested else {name: sub})
    return out


COMMANDS = _subparsers(build_parser())


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end >= 0 else None]


def _command_table() -> dict[str, list[tuple[str, str]]]:
    """README's command table: command name -> [(usage cell, -c cell)]."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in _section("Commands").splitlines():
        m = re.match(r"\| `bida ([a-z-]+(?: check)?)([^`]*)`[^|]*\| ([^|]*) \|", line)
        if m:
            rows.setdefault(m.group(1), []).append((m.group(1) + m.group(2), m.group(3).strip()))
    return rows


def _code(text: str) -> list[str]:
    """The code of a page: its inline code spans and the lines of its bash blocks (comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines = [line.split(" #")[0] for block in blocks for line in block.splitlines() if not line.startswith("#")]
    return re.findall(r"`([^`\n]+)`", prose) + lines


def _doc_keys(text: str) -> set[str]:
    """Dotted config keys written in a page's code (``section.key``, ``data.source.root=...``)."""
    sections = set(to_dict(Config()))
    keys = set()
    for code in _code(text):
        for token in re.findall(r"(?<![\w./-])([a-z_]+(?:\.[a-z_0-9]+)+)(?![\w/(\[-])", code):
            if token.split(".")[0] in sections and not re.search(r"\.(safetensors|pth|pt|yaml|json|md|py)$", token):
                keys.add(token)
    return keys


def _schema_keys(tree: dict, prefix: str = "") -> set[str]:
    """Every key of the config, sections and leaves, dotted."""
    keys = set()
    for name, value in tree.items():
        keys.add(prefix + name)
        if isinstance(value, dict):
            keys |= _schema_keys(value, f"{prefix}{name}.")
    return keys


def _page_paths(path: Path) -> set[str]:
    """Repository paths a page names: files under configs/, src/bida/, benchmarks/, docs/ and tests/,
    and the targets of its relative Markdown links (resolved from the page)."""
    text = path.read_text()
    matches = re.finditer(r"(?<![\w./-])((?:configs|src/bida|benchmarks|docs|tests)/[\w./-]*\w)", text)
    # a path followed by a placeholder (tests/test_<family>.py, blocks.*) names no file
    found = {m.group(1) for m in matches if text[m.end():m.end() + 1] not in ("<", "*")}
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            found.add((path.parent / target).resolve().relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_named_exists(page):
    """(a) Every ``bida <command>`` in a page's code is a command of the parser (``bida launch``
    is dispatched before the parser, to torchrun)."""
    known = {name.split()[0] for name in COMMANDS} | {"launch"}
    assert "launch" in inspect.getsource(cli.main), "bida launch is no longer dispatched by the CLI"
    named = []
    for code in _code(page.read_text()):
        for command, word in re.findall(r"(?:^|\s|bin/)bida ([a-z][\w-]*)(?: ([a-z]+))?", code):
            named.append((command, word))
            assert command in known, f"{page.name} names 'bida {command}', which the CLI does not have"
            if command == "data":
                assert f"data {word}" in COMMANDS, f"{page.name} names 'bida data {word}'"
    if page == README_PATH:
        assert {c for c, _ in named} >= {name.split()[0] for name in COMMANDS} - {"check-data"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_config_key_named_exists(page):
    """(b) Every dotted config key in a page's code is a key of the schema."""
    known = _schema_keys(to_dict(Config()))
    for key in sorted(_doc_keys(page.read_text())):
        assert key in known, f"{page.name} names config key {key!r}, which the schema lacks"


def test_the_key_check_reads_keys():
    """The key reader finds keys in spans, with values and in bash blocks, and skips file names."""
    text = "`train.lr=6e-5 train.poly_power=1.0`, `model.safetensors`, `bida.losses`\n```bash\nbida train data.source.root=A\n```\n"
    assert _doc_keys(text) == {"train.lr", "train.poly_power", "data.source.root"}
    assert _doc_keys(README) and _doc_keys((ROOT / "docs" / "method.md").read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_repository_path_named_exists(page):
    """(c) Every repository path a page names exists."""
    paths = _page_paths(page)
    assert paths or page.name not in ("README.md", "recipes.md")
    for path in sorted(paths):
        assert (ROOT / path).exists(), f"{page.name} names {path}, which does not exist"


def test_readme_is_a_front_page_linking_every_docs_page():
    """(d) README stays short and links every page under docs/."""
    assert len(README.splitlines()) <= MAX_README_LINES, f"README has {len(README.splitlines())} lines"
    links = set(re.findall(r"\]\((docs/[^)#\s]+)", README))
    for doc in DOCS:
        assert f"docs/{doc.name}" in links, f"README does not link docs/{doc.name}"


def test_recipes_lists_every_config():
    """(e) docs/recipes.md lists every file in configs/."""
    recipes = (ROOT / "docs" / "recipes.md").read_text()
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"`configs/{config.name}`" in recipes, f"docs/recipes.md does not list configs/{config.name}"


def test_every_option_has_help_text():
    for name, sub in COMMANDS.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"bida {name}: {action.option_strings or action.dest} has no help text"


def test_help_examples_fit_their_command():
    """No ``train.iters=...`` example where training lengths mean nothing."""
    for name in ("evaluate", "data check", "check-data"):
        text = COMMANDS[name].format_help()
        assert "train.iters" not in text, f"bida {name} --help suggests train.iters"
    assert "checkpoint" in COMMANDS["evaluate"].format_help().split("--config")[1].split("--checkpoint")[0].lower() \
        or "checkpoint's" in COMMANDS["evaluate"].format_help()


def test_evaluate_config_defaults_to_the_checkpoints_config():
    help_c = next(a.help for a in COMMANDS["evaluate"]._actions if "-c" in a.option_strings)
    assert "config saved in the checkpoint" in help_c


def test_readme_command_table_lists_every_command_and_marks_config():
    table = _command_table()
    for name, sub in COMMANDS.items():
        key = "data check" if name in ("data check", "check-data") else name
        assert key in table, f"README's command table has no row for bida {name}"
        takes_c = any("-c" in a.option_strings for a in sub._actions)
        for usage, mark in table[key]:
            if "--resume" in usage:
                assert mark == "—"
                continue
            assert mark == ("yes" if takes_c else "no"), f"README marks -c of 'bida {usage}' as {mark!r}"
            if takes_c:
                assert "-c CONFIG" in usage or "..." in usage, usage


def test_readme_documents_every_option():
    section = _section("Commands")
    for name, sub in COMMANDS.items():
        for action in sub._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert any(opt in section for opt in action.option_strings), \
                    f"README's Commands section does not mention {action.option_strings} of bida {name}"
            if action.dest == "overrides":
                key = "data check" if name == "check-data" else name
                usages = [u for u, _ in _command_table()[key]]
                assert any("key=value" in u for u in usages), f"README does not show key=value for bida {name}"
    assert "--version" in section


@pytest.mark.parametrize("command", ["train", "ablate", "demo"])
def test_usage_of_grid_commands_shows_resume(command):
    if command == "train":
        assert "--resume" in COMMANDS[command].format_help()
    else:
        assert f"bida {command} --resume DIR" in README


def test_example_outputs_are_git_ignored():
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip()]
    blocks = [block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)]
    outs = [m for block in blocks for m in re.findall(r"--out\s+(\S+)", block)]
    assert outs
    for out in outs:
        first = Path(out).parts[0]
        assert first in ignored, f"the docs write to {out}, which .gitignore does not cover"


def test_method_description_ships_with_the_project():
    method = ROOT / "docs" / "method.md"
    text = method.read_text()
    for key in ("loss.contrast_t2s_weight", "loss.contrast_s2t_weight", "loss.seg_tgt_weight", "loss.entropy_weight",
                "loss.temperature", "pseudo.class_fraction", "pseudo.image_fraction", "pseudo.transfer_threshold",
                "calibration.momentum", "calibration.ramp_iters", "method.feature", "method.prototype_scope"):
        assert f"`{key}`" in text, f"docs/method.md does not name {key}"
    sections = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "benchmarks").glob("*"),
                 *PAGES]:
        if not path.is_file():
            continue
        body = path.read_text()
        assert "METHOD.md" not in body, f"{path} cites METHOD.md, which is not in the repository"
        for refs in re.findall(r"docs/method\.md,? sections? ([\d, and]+)", body):
            for number in re.findall(r"\d+", refs):
                assert number in sections, f"{path} cites docs/method.md section {number}"


def test_license_uses_the_current_pyproject_form():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # SPDX expression, not a table
    requires = " ".join(project["build-system"]["requires"])
    version = re.search(r"setuptools>=(\d+)", requires)
    assert version and int(version.group(1)) >= 77  # the first setuptools that reads SPDX strings


def test_demo_time_breakdown_has_the_demos_own_rows():
    """docs/performance.md's wall-time table has the rows ``bida demo`` writes (its header, the
    set-up, a row per run of the demo, the report and the total), in the demo's own words."""
    from bida.tools.grid_tables import timing_table

    written = timing_table({"setup_s": 0.0, "runs_s": {"source_only": 63.0, "self_training": 69.0, "bida": 71.0},
                            "report_s": 14.0, "total_s": 220.0}).splitlines()
    text = (ROOT / "docs" / "performance.md").read_text()
    start = text.index("## Where the time of `make demo` goes")
    section = text[start:text.index("\n## ", start + 1)]
    assert "\n".join(written[:2]) in section
    cells = [line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ")]
    for row in written[2:]:
        label = row.split("|")[1].strip()
        assert any(cell.startswith(label) for cell in cells), f"docs/performance.md's demo timing lacks {label!r}"


def test_daformer_deviation_table_names_real_keys_their_defaults_and_the_configs_values():
    """Each row of the DAFormer/MIC deviation table (docs/recipes.md): a config key, its schema
    default in the bida column, and in the published column the value the DAFormer and MIC configs set."""
    import yaml

    recipes = (ROOT / "docs" / "recipes.md").read_text()
    start = recipes.index("### Deviation table: DAFormer and MIC\n")
    end = recipes.index("\n#", start + 1)
    rows = [line for line in recipes[start:end].splitlines() if line.startswith("| `")]
    keys = {}
    for row in rows:
        key, published, default = (cell.strip() for cell in row.strip("|").split("|"))
        keys[key.strip("`")] = (re.match(r"`([^`]+)`", published).group(1), re.match(r"`([^`]+)`", default).group(1))
    required = {"pseudo.ignore_top", "pseudo.ignore_bottom", "train.teacher_bn", "train.student_forwards",
                "loss.pseudo_ce_mean", "loss.source_ce_mean", "train.mix_classes"}
    assert required <= set(keys)
    for name in ("daformer", "mic_daformer", "bida_daformer", "bida_mic_daformer"):
        for pair in ("gta5", "synthia"):
            raw = yaml.safe_load((ROOT / "configs" / f"{name}_{pair}_to_cityscapes.yaml").read_text())
            for key, (published, default) in keys.items():
                section, field = key.split(".")
                assert str(getattr(getattr(Config(), section), field)) == default, key
                assert str(raw[section][field]) == published, (name, pair, key)
