"""Every file in configs/ runs a source stage and an adaptation round (shrunk in sizes and lengths)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bida.models import DeepLabV2
from bida.models.dinov2 import DINOv2Segmentor
from bida.models.mit import MiTSegmentor
from bida.tools.cli import main

from fixtures import make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree
from helpers import CONFIGS, _domain_overrides, shrink

pytestmark = pytest.mark.slow


def _tiny_init_weights(raw: dict, path: Path) -> Path:
    """A DeepLab_init-layout file (keys prefixed ``Scale.``, VOC classifier) at width 0.125.

    Like the real file, its BatchNorm statistics match its inputs (caffe-normalised
    images): they are accumulated over a few random images, so that frozen BN keeps the
    activations of a 100-layer network in range.
    """
    torch.manual_seed(0)
    model = DeepLabV2(21, raw["model"].get("backbone", "resnet18"), width=0.125, freeze_bn=False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.rand(2, 3, 48, 48) * 255 - 120)
    torch.save({f"Scale.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def _tiny_mit_weights(raw: dict, path: Path) -> Path:
    """A SegFormer/mmseg ``mit_b*.pth`` (no prefix, an ImageNet classifier) at width 0.125."""
    torch.manual_seed(0)
    model = MiTSegmentor(19, raw["model"]["backbone"], width=0.125, decoder_dim=16, proj_dim=16)
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state["head.weight"], state["head.bias"] = torch.randn(1000, model.backbone.dims[-1]), torch.zeros(1000)
    torch.save(state, path)
    return path


def _tiny_dinov2_weights(raw: dict, path: Path) -> Path:
    """A DINOv2 release file (no prefix, the pretraining ``mask_token``) at width 0.125."""
    torch.manual_seed(0)
    model = DINOv2Segmentor(19, raw["model"]["backbone"], width=0.125, decoder_dim=16, proj_dim=16)
    state = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state["mask_token"] = torch.zeros(1, model.backbone.dim)
    torch.save(state, path)
    return path


def _run(config: Path, out: Path, overrides: list[str]) -> dict:
    assert main(["train", "-c", str(config), "--out", str(out), *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def _source_stage_config(name: str, raw: dict) -> Path:
    """The config whose run an adaptation config starts from (named by its init_checkpoint)."""
    if raw.get("method", "source_only") in ("source_only", {"name": "source_only"}):
        return CONFIGS / name
    init = Path(raw["model"]["init_checkpoint"])  # runs/<stage>/checkpoints/last.pt
    stage = CONFIGS / f"{init.parts[-3]}.yaml"
    assert stage.is_file(), f"{name}: init_checkpoint {init} names no config in configs/"
    return stage


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_runs_source_stage_and_an_adaptation_round(name, tmp_path, synthetic_cache):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    if raw.get("train", {}).get("schedule") == "teacher":
        _teacher_config_runs(name, raw, tmp_path, synthetic_cache)
        return
    stage_path = _source_stage_config(name, raw)
    stage_raw = yaml.safe_load(stage_path.read_text())
    data = _domain_overrides(raw, tmp_path / "data", synthetic_cache)

    stage_over = data + shrink(stage_raw)
    if stage_raw.get("model", {}).get("pretrained"):
        stage_over.append(f"model.pretrained={_tiny_init_weights(stage_raw, tmp_path / 'init.pth')}")
    if raw.get("model", {}).get("pretrained"):  # read before init_checkpoint replaces the weights
        data = data + [f"model.pretrained={_tiny_init_weights(raw, tmp_path / 'init_adapt.pth')}"]
    _run(stage_path, tmp_path / "stage", stage_over)
    init = tmp_path / "stage" / "checkpoints" / "last.pt"

    adapt_over = data + shrink(raw) + [f"model.init_checkpoint={init}"]
    if stage_path == CONFIGS / name:  # a source-only config: adapt with its own settings
        adapt_over.append("method=bida")
    metrics = _run(CONFIGS / name, tmp_path / "adapt", adapt_over)
    assert metrics["method"] == "bida"
    records = [json.loads(line) for line in (tmp_path / "adapt" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "round"]
    assert steps and all(r["loss/total"] == r["loss/total"] for r in steps)  # ran, and finite
    assert "loss/contrast_t2s" in steps[0] and "loss/contrast_s2t" in steps[0]
    assert (tmp_path / "adapt" / "pseudo_labels" / "round_0" / "stats.json").is_file()


def _teacher_config_runs(name: str, raw: dict, tmp_path: Path, synthetic_cache) -> None:
    """A mean-teacher config runs its phases as shipped: model.pretrained (a tiny file of the
    shipped layout), source stage if it has one, then a couple of teacher steps."""
    over = _domain_overrides(raw, tmp_path / "data", synthetic_cache) + shrink(raw) + ["eval.max_images=1"]
    over += ["train.source_iters=2"] if raw["train"].get("source_iters") else []
    pretrained = raw.get("model", {}).get("pretrained")
    if pretrained:
        backbone = raw["model"]["backbone"]
        make = (_tiny_mit_weights if backbone.startswith("mit_") else
                _tiny_dinov2_weights if backbone.startswith("dinov2_") else _tiny_init_weights)
        over.append(f"model.pretrained={make(raw, tmp_path / Path(pretrained).name)}")
    method = raw["method"] if isinstance(raw["method"], str) else raw["method"]["name"]
    run = tmp_path / "run"
    if method == "source_only":  # a source-only config: then adapt from it with its own settings
        _run(CONFIGS / name, tmp_path / "stage", over)
        over, method = over + ["method=bida", f"model.init_checkpoint={tmp_path / 'stage/checkpoints/last.pt'}"], "bida"
    metrics = _run(CONFIGS / name, run, over)
    assert metrics["method"] == method
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "teacher"]
    assert len(steps) == 2 and all(r["loss/total"] == r["loss/total"] for r in steps)  # ran, and finite
    assert {"loss/seg_mix", "pseudo/teacher_quality"} <= set(steps[0])
    if raw.get("loss", {}).get("feature_distance_weight"):
        assert "loss/feature_distance" in steps[0]
    if method == "bida":
        assert "loss/contrast_t2s" in steps[0] and "loss/contrast_s2t" in steps[0]
    assert ("loss/mic" in steps[0]) == bool(raw.get("mic", {}).get("weight"))
    assert ("loss/hrda_detail" in steps[0]) == bool(raw.get("model", {}).get("hrda", {}).get("enabled"))
