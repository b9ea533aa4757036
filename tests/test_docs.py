"""README, docs and packaging agree with the code: commands, options, paths, references."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from bida.tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


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


def test_readme_example_outputs_are_git_ignored():
    ignored = [line.strip().rstrip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip()]
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    outs = [m for block in blocks for m in re.findall(r"--out\s+(\S+)", block)]
    assert outs
    for out in outs:
        first = Path(out).parts[0]
        assert first in ignored, f"README writes to {out}, which .gitignore does not cover"


def test_method_description_ships_with_the_project():
    method = ROOT / "docs" / "method.md"
    text = method.read_text()
    for key in ("loss.contrast_t2s_weight", "loss.contrast_s2t_weight", "loss.seg_tgt_weight", "loss.entropy_weight",
                "loss.temperature", "pseudo.class_fraction", "pseudo.image_fraction", "pseudo.transfer_threshold",
                "calibration.momentum", "calibration.ramp_iters", "method.feature", "method.prototype_scope"):
        assert f"`{key}`" in text, f"docs/method.md does not name {key}"
    sections = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "benchmarks").glob("*"),
                 ROOT / "README.md"]:
        if not path.is_file():
            continue
        body = path.read_text()
        assert "METHOD.md" not in body, f"{path} cites METHOD.md, which is not in the repository"
        for refs in re.findall(r"docs/method\.md,? sections? ([\d, and]+)", body):
            for number in re.findall(r"\d+", refs):
                assert number in sections, f"{path} cites docs/method.md section {number}"
    assert "docs/method.md" in README


def test_license_uses_the_current_pyproject_form():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # SPDX expression, not a table
    requires = " ".join(project["build-system"]["requires"])
    version = re.search(r"setuptools>=(\d+)", requires)
    assert version and int(version.group(1)) >= 77  # the first setuptools that reads SPDX strings


def test_readme_states_the_demo_time_breakdown():
    from bida.tools.grid_tables import timing_table

    header = timing_table({}).splitlines()[0]
    start = README.index("Where the time goes")
    text = README[start:README.index("## Install")]
    assert header in text and "set-up" in text and "report" in text and "**total**" in text
    for run in ("source_only", "self_training", "bida"):
        assert f"run `{run}`" in text
    assert "Machine" in text and "fresh clone" in text


@pytest.mark.parametrize("command", ["train", "ablate", "demo"])
def test_usage_of_grid_commands_shows_resume(command):
    if command == "train":
        assert "--resume" in COMMANDS[command].format_help()
    else:
        assert f"bida {command} --resume DIR" in README


def test_daformer_deviation_table_names_real_keys_their_defaults_and_the_configs_values():
    """Each row of README's DAFormer/MIC deviation table: a config key, its schema default in
    the bida column, and in the published column the value the DAFormer and MIC configs set."""
    import yaml

    from bida.config import Config

    start = README.index("### Deviation table: DAFormer and MIC\n")
    end = README.index("\n### ", start + 1)
    rows = [line for line in README[start:end].splitlines() if line.startswith("| `")]
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
