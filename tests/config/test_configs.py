"""The shipped configs: published values, headers and per-domain settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures import make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree
from helpers import CONFIGS


def test_a_domain_resize_overrides_data_resize_for_that_domain_only(tiny_overrides):
    from bida.config import load_config
    from bida.data.datasets import build_train_dataset, resolve_domain

    cfg = load_config(None, tiny_overrides + ["data.resize=40", "data.source.resize=56"])
    src, tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
    assert (src.resize, tgt.resize) == (56, 40)
    assert build_train_dataset(cfg, src, "train", require_labels=True).resize == 56
    assert build_train_dataset(cfg, tgt, "train", require_labels=False).resize == 40
    item = build_train_dataset(cfg, src, "train", require_labels=True)[0]
    assert item["image"].shape[-2:] == tuple(cfg.data.crop)
    assert resolve_domain(load_config(None, tiny_overrides), "source").resize is None  # no resize by default


DAFORMER_CONFIGS = [f"{prefix}{name}_{pair}_to_cityscapes.yaml" for prefix in ("", "bida_")
                    for name in ("daformer", "mic_daformer") for pair in ("gta5", "synthia")]

# DAFormer's and MIC's published values of bida's switches (lhoyer/DAFormer mmseg/models/uda/dacs.py,
# experiments.py plcrop; mmseg v0.16 cross_entropy; dacs_transforms.get_class_masks).
DAFORMER_PUBLISHED = {"pseudo.ignore_top": 15, "pseudo.ignore_bottom": 120, "train.teacher_bn": "batch",
                      "train.student_forwards": "separate", "loss.pseudo_ce_mean": "all",
                      "loss.source_ce_mean": "all", "train.mix_classes": "batch"}


@pytest.mark.parametrize("name", DAFORMER_CONFIGS)
def test_daformer_and_mic_configs_set_the_published_values_and_open_with_the_header(name):
    from bida.config import load_config

    text = (CONFIGS / name).read_text()
    raw, cfg = yaml.safe_load(text), load_config(CONFIGS / name, [])
    for key, value in DAFORMER_PUBLISHED.items():
        section, field = key.split(".")
        assert raw[section][field] == value, key  # set in the file, not left to a default
        assert getattr(getattr(cfg, section), field) == value, key
    lines = text.splitlines()
    assert lines[0].startswith("# ") and lines[1].startswith("# Recipe: lhoyer/")
    assert lines[2].startswith("# Published: ") and " mIoU " in lines[2] and "published, not measured by bida" in lines[2]
    assert lines[3] == "# Deviations from the recipe:" and lines[4].startswith("#   - ")
    published = {"daformer_gta5": "68.3", "daformer_synthia": "60.9", "mic_daformer_gta5": "70.6",
                 "mic_daformer_synthia": "67.3"}[name.removeprefix("bida_").removesuffix("_to_cityscapes.yaml")]
    assert f"mIoU {published} (" in lines[2]
    if "mic" in name:
        assert "HRDA" in text.split("# Deviations from the recipe:")[1].split("\n#\n")[0]
