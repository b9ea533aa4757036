"""The shipped configs: published values, headers and per-domain settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures import make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree


CONFIGS = Path(__file__).resolve().parents[2] / "configs"

LONGEST_CROP = 64  # the crop's longer side after shrinking

FIXTURE_AREA = 16 * 32  # pixels of a fixture image

SOURCE_AREA = {"gta5": 1052 * 1914, "synthia": 760 * 1280}  # pixels of a real source image


def _scaled(value, factor: float):
    return max(1, int(round(value * factor)))


def shrink(raw: dict) -> list[str]:
    """Overrides that shrink sizes, width and lengths of a config, and nothing else."""
    data, ev = raw.get("data", {}), raw.get("eval", {})
    crop = data.get("crop", [64, 128])
    factor = min(1.0, LONGEST_CROP / max(crop))
    out = [f"data.crop=[{_scaled(crop[0], factor)},{_scaled(crop[1], factor)}]", "model.width=0.125",
           "train.iters=2", "train.rounds=1", "train.iters_per_round=2", "train.eval_every=1000",
           "train.checkpoint_every=1", "train.log_every=1", "train.quiet=true"]
    if data.get("resize"):
        out.append(f"data.resize={_scaled(data['resize'], factor)}")
    for role in ("source", "target"):  # a domain's own shorter side (DAFormer resizes each domain)
        if data.get(role, {}).get("resize"):
            out.append(f"data.{role}.resize={_scaled(data[role]['resize'], factor)}")
    if data.get("rare_class_sampling"):  # full-resolution pixels: scaled by the fixture's image area
        kind = data["source"]["kind"]  # synthetic images shrink with the crop (_domain_overrides)
        area = factor ** 2 if kind == "synthetic" else FIXTURE_AREA / SOURCE_AREA.get(kind, FIXTURE_AREA)
        out.append(f"data.rcs_min_pixels={_scaled(data.get('rcs_min_pixels', 3000), area)}")
    if raw.get("mic", {}).get("block_size"):  # a side in pixels of the crop
        out.append(f"mic.block_size={_scaled(raw['mic']['block_size'], factor)}")
    for key in ("ignore_top", "ignore_bottom"):  # pixel rows of the crop
        if raw.get("pseudo", {}).get(key):
            out.append(f"pseudo.{key}={_scaled(raw['pseudo'][key], factor)}")
    if any(raw.get("pseudo", {}).get("margins", ())):  # pixels of the (resized) image
        out.append(f"pseudo.margins=[{','.join(str(_scaled(m, factor)) for m in raw['pseudo']['margins'])}]")
    hrda = raw.get("model", {}).get("hrda", {})
    if hrda.get("detail_crop"):  # pixels of the crop, shrunk with it (HRDA stays on)
        out.append(f"model.hrda.detail_crop=[{','.join(str(_scaled(s, factor)) for s in hrda['detail_crop'])}]")
    if str(raw.get("model", {}).get("backbone", "")).startswith(("mit_", "dinov2_")):
        out += ["model.decoder_dim=16", "model.proj_dim=16"]
    for key in ("size", "crop", "stride"):
        if ev.get(key):
            out.append(f"eval.{key}=[{_scaled(ev[key][0], factor)},{_scaled(ev[key][1], factor)}]")
    return out


def _domain_overrides(raw: dict, tmp: Path, cache: Path) -> list[str]:
    """Point each domain at a fixture tree of its own kind (or a small synthetic pair)."""
    out = []
    classes = ("ground", "wall", "sky", "object")
    for role in ("source", "target"):
        kind = raw["data"][role]["kind"]
        root = tmp / f"{role}_{kind}"
        if kind == "gta5":
            make_gta5_tree(root, n=3, size=(16, 32), mismatched=1)
        elif kind == "synthia":
            make_synthia_tree(root, n=3, size=(16, 32))
        elif kind == "cityscapes":
            make_cityscapes_tree(root, size=(16, 32), unlabelled_splits=("train",) if role == "target" else ())
        elif kind == "folder":
            make_folder_tree(root, classes=classes, n_train=3, n_val=2, size=(16, 32),
                             target_without_train_labels=role == "target")
        else:
            assert kind == "synthetic"
            syn = raw["data"].get("synthetic", {})
            factor = min(1.0, LONGEST_CROP / max(raw["data"]["crop"]))
            out += ["data.synthetic.num_train=6", "data.synthetic.num_val=3", "data.synthetic.num_test=2",
                    f"data.synthetic.height={_scaled(syn.get('height', 64), factor)}",
                    f"data.synthetic.width={_scaled(syn.get('width', 128), factor)}",
                    f"data.synthetic.cache_dir={cache}"]
            continue
        out.append(f"data.{role}.root={root}")
    return sorted(set(out))


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
