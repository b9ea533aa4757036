"""Configs that name a published recipe say what they are, and the deviation tables of docs/recipes.md hold.

A config named after a published method (DAFormer, MIC, VFM-UDA on DINOv2) opens with the
recipe's source, the published figure ("published, not measured by bida") and a list
"Deviations from the recipe". A switch in one of the deviation tables (docs/recipes.md) that such a
config leaves at bida's default, where the recipe has another value, must be named under
"Deviations" (with its reason): a recipe config either runs the published value or says why not.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from bida.config import Config, load_config
from bida.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# The deviation tables of docs/recipes.md, by heading, and the configs each one covers.
TABLES = {
    "DAFormer and MIC": lambda name: "daformer" in name or "hrda" in name,  # HRDA keeps DAFormer's dacs.py
    "VFM-UDA (DINOv2)": lambda name: "dinov2" in name,
}
RECIPE_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if any(rule(p.name) for rule in TABLES.values()))


def header(path: Path) -> list[str]:
    """The config's opening comment block."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def deviations(path: Path) -> list[str]:
    """The items under "# Deviations from the recipe:" (each "#   - ...", continuation lines joined)."""
    lines, items, inside = header(path), [], False
    for line in lines:
        if line.startswith("# Deviations from the recipe:"):
            inside = True
        elif inside and re.match(r"#\s+- ", line):
            items.append(line.split("- ", 1)[1])
        elif inside and re.match(r"#\s{3,}\S", line) and items:
            items[-1] += " " + line.lstrip("# ").strip()
        elif inside:
            break
    return items


def deviation_tables() -> dict[str, list[tuple[str, str, str]]]:
    """docs/recipes.md's "### Deviation table: <name>" tables: (dotted key, published, bida default) per row."""
    text, tables = (ROOT / "docs" / "recipes.md").read_text(), {}
    for name in TABLES:
        match = re.search(rf"^### Deviation table: {re.escape(name)}\n(.*?)(?=^#|\Z)", text, re.M | re.S)
        assert match, f"docs/recipes.md has no '### Deviation table: {name}'"
        rows = []
        for line in match.group(1).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[0].startswith("`") and not set(cells[1]) <= set("-: "):
                rows.append((cells[0].strip("`"), cells[1], cells[2]))
        assert rows, f"docs/recipes.md's deviation table '{name}' has no rows"
        tables[name] = rows
    return tables


def value_at(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def cell_value(cell: str):
    """A table cell's value: its first `...` span (else the whole cell) read as YAML; numbers
    that YAML 1.1 leaves as text (``1e-3``) as floats."""
    m = re.search(r"`([^`]*)`", cell)
    text = m.group(1) if m else cell.strip()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def same(a, b) -> bool:
    a = list(a) if isinstance(a, tuple) else a
    b = list(b) if isinstance(b, tuple) else b
    return a == b


# Switches of the mean teacher: a source-only config has none to set.
TEACHER_SWITCHES = {"train.teacher_bn", "pseudo.teacher_flip", "data.weak_jitter", "model.mask_token",
                    "train.mix_classes", "pseudo.ignore_top", "pseudo.ignore_bottom", "loss.pseudo_ce_mean",
                    "train.student_forwards", "mic.weight"}


def applies(name: str, key: str, published: str) -> bool:
    """Whether ``key`` can take its published value in this config: a teacher switch in a
    source-only config, or a switch that bida refuses there, is no deviation of it."""
    if key in TEACHER_SWITCHES and load_config(CONFIGS / name, []).method.name == "source_only":
        return False
    value = cell_value(published)
    try:
        load_config(CONFIGS / name, [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"])
    except ConfigError:
        return False
    return True


def test_there_are_recipe_configs():
    assert len(RECIPE_CONFIGS) >= 8, RECIPE_CONFIGS


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_recipe_config_opens_with_source_figure_and_deviations(name):
    lines = header(CONFIGS / name)
    text = "\n".join(lines)
    assert re.search(r"^# Recipe: \S+/\S+ \S", text, re.M), f"{name}: no '# Recipe: <repository> <config>' line"
    assert re.search(r"^# Published: (none cited \(.+\)|.*\d.*published, not measured by bida)", text, re.M), \
        f"{name}: no '# Published: ... (published, not measured by bida)' or '# Published: none cited (why)' line"
    assert "# Deviations from the recipe:" in text, f"{name}: no 'Deviations from the recipe' list"
    items = deviations(CONFIGS / name)
    assert items, f"{name}: the deviations list is empty (write '- none' if nothing deviates)"
    for item in items:  # each deviation says why, unless it is the single "none"
        assert item.strip() == "none" or ":" in item, f"{name}: deviation without a reason: {item!r}"


def test_deviation_tables_show_bida_defaults():
    """The "bida default" column is the schema's default, so the table cannot drift."""
    defaults = Config()
    for name, rows in deviation_tables().items():
        for key, _published, default in rows:
            assert same(value_at(defaults, key), cell_value(default)), \
                f"docs/recipes.md deviation table '{name}': {key} default {default!r}, schema {value_at(defaults, key)!r}"


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_switches_left_at_default_are_named_as_deviations(name):
    cfg, defaults = load_config(CONFIGS / name, []), Config()
    named = " ".join(deviations(CONFIGS / name))
    for table, rows in deviation_tables().items():
        if not TABLES[table](name):
            continue
        for key, published, _default in rows:
            value, default = value_at(cfg, key), value_at(defaults, key)
            if same(value, default) and not same(cell_value(published), default):
                if not applies(name, key, published):
                    continue
                assert key in named, (f"{name}: {key} is left at bida's default {default!r} where the recipe has "
                                      f"{published}; set it or name it under 'Deviations from the recipe'")


def test_the_check_catches_an_unnamed_default(tmp_path, monkeypatch):
    """The rule above fails a config that drops a published switch without saying so."""
    tables = deviation_tables()
    key, published, _ = next(r for r in tables["DAFormer and MIC"]
                             if not same(cell_value(r[1]), value_at(Config(), r[0])))
    raw = yaml.safe_load((CONFIGS / "daformer_gta5_to_cityscapes.yaml").read_text())
    section, field = key.split(".", 1)
    node = raw.setdefault(section, {})
    for part in field.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[field.split(".")[-1]] = value_at(Config(), key)
    if dataclasses.is_dataclass(node):
        pytest.skip("nested dataclass")
    broken = CONFIGS / "daformer_gta5_to_cityscapes.yaml"
    text = "\n".join(header(broken)) + "\n" + yaml.safe_dump(raw)
    monkeypatch.setattr(f"{__name__}.CONFIGS", tmp_path)
    (tmp_path / broken.name).write_text(text)
    with pytest.raises(AssertionError, match=re.escape(key)):
        test_switches_left_at_default_are_named_as_deviations(broken.name)
