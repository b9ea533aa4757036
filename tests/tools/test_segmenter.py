"""bida.Segmenter: the Python inference API, bida predict over it, model folders.

References are written here from the definitions: a forward, a bilinear upsampling and a
softmax (whole image); windows visited one by one and averaged (sliding window); the
mirrored prediction mirrored back and averaged (flip).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from bida.checkpoint import save_checkpoint
from bida.tools.cli import main
from bida.config import load_config, to_dict
from bida.data.transforms import to_tensor
from bida.errors import CheckpointError
from bida.models import build_model


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run (a few seconds): checkpoint, config, metrics.json and run.json."""
    from conftest import TINY

    root = tmp_path_factory.mktemp("inference")
    out = root / "run"
    assert main(["train", "--out", str(out), *TINY, f"data.synthetic.cache_dir={root / 'cache'}"]) == 0
    return out


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_probs(model, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x, "target").logits.float()
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).softmax(1)


def _reference_slide(model, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Every window's upsampled logits summed into the image, divided by the windows covering each pixel."""
    _, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    tops = sorted({min(i * stride[0], h - ch) for i in range(math.ceil((h - ch) / stride[0]) + 1)})
    lefts = sorted({min(j * stride[1], w - cw) for j in range(math.ceil((w - cw) / stride[1]) + 1)})
    total = torch.zeros(x.shape[0], model.num_classes, h, w)
    covered = torch.zeros(h, w)
    for top in tops:
        for left in lefts:
            with torch.no_grad():
                logits = model(x[:, :, top:top + ch, left:left + cw], "target").logits.float()
            total[:, :, top:top + ch, left:left + cw] += F.interpolate(logits, size=(ch, cw), mode="bilinear",
                                                                       align_corners=False)
            covered[top:top + ch, left:left + cw] += 1
    return total / covered


def test_segmenter_predicts_as_the_definitions_say(run):
    from bida import Segmenter

    seg = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt")
    image = _image(41, 77)  # not the training size
    x = to_tensor(image, "imagenet").unsqueeze(0)
    ref = _reference_probs(seg.model, x, (41, 77))[0]
    probs = seg.predict_proba(image)
    assert probs.shape == (19, 41, 77) and np.abs(probs - ref.numpy()).max() < 1e-6
    assert np.array_equal(seg.predict(image), ref.argmax(0).numpy())
    assert seg.classes[:2] == ["road", "sidewalk"] and seg.palette.shape == (19, 3)

    # Sliding windows and flip, from the config: windows smaller than the image, mirrored view averaged.
    seg = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt",
                                    overrides=["eval.mode=slide", "eval.crop=[24,32]", "eval.stride=[10,20]", "eval.flip=true"])
    plain = _reference_slide(seg.model, x, (24, 32), (10, 20)).softmax(1)
    mirrored = _reference_slide(seg.model, x.flip(-1), (24, 32), (10, 20)).softmax(1).flip(-1)
    ref = ((plain + mirrored) / 2)[0]
    assert np.abs(seg.predict_proba(image) - ref.numpy()).max() < 1e-6


def test_every_input_kind_gives_the_same_prediction(run):
    from bida import Segmenter

    seg = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt")
    images = [_image(23, 37, seed) for seed in (1, 2)]  # an odd size, below the training crop
    expected = np.stack([seg.predict(im) for im in images])
    assert expected.shape == (2, 23, 37) and expected.dtype == np.int64
    assert np.array_equal(seg.predict(Image.fromarray(images[0])), expected[0])
    rgb = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    assert torch.equal(seg.predict(rgb), torch.from_numpy(expected))
    normalised = torch.stack([to_tensor(im, "imagenet") for im in images])  # float: already normalised
    assert torch.equal(seg.predict(normalised), torch.from_numpy(expected))
    assert seg.predict_proba(rgb).shape == (2, 19, 23, 37)
    assert seg.to("cpu") is seg


def test_bf16_autocast_runs_the_network_under_autocast(run):
    from bida import Segmenter

    seg = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt", autocast="bf16")
    image = _image(32, 64, 3)
    x = to_tensor(image, "imagenet").unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference_probs(seg.model, x, (32, 64))[0]
    assert np.abs(seg.predict_proba(image) - ref.numpy()).max() < 1e-6


def test_bida_predict_writes_what_the_api_returns(run, tmp_path):
    from bida import Segmenter

    images = tmp_path / "images"
    images.mkdir()
    for i, (h, w) in enumerate([(32, 64), (29, 51)]):
        Image.fromarray(_image(h, w, 10 + i)).save(images / f"im{i}.png")
    ckpt = run / "checkpoints" / "last.pt"
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert main(["export", "--checkpoint", str(ckpt), "--format", "folder", "--out", str(tmp_path / "m")]) == 0
    assert main(["predict", "--model", str(tmp_path / "m"), str(images), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    seg = Segmenter.from_checkpoint(ckpt)
    for i in range(2):
        image = np.asarray(Image.open(images / f"im{i}.png").convert("RGB"))
        expected = seg.predict(image)
        for out in ("a", "b"):
            written = np.asarray(Image.open(tmp_path / out / f"im{i}.png"))
            assert np.array_equal(written, expected), out
            colour = np.asarray(Image.open(tmp_path / out / f"im{i}_color.png"))
            assert np.array_equal(colour, seg.palette[expected])


def test_model_folder_holds_weights_config_classes_and_a_card(run, tmp_path):
    from bida import Segmenter
    from bida.checkpoint import load_checkpoint
    from safetensors.torch import load_file

    folder = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--format", "folder",
                 "--out", str(folder), "--license", "mit"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "classes.json", "config.yaml", "model.safetensors"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    weights = load_file(str(folder / "model.safetensors"))
    assert weights.keys() == state["model"].keys()
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    run_cfg = load_config(run / "config.yaml")
    assert config["model"]["backbone"] == run_cfg.model.backbone and config["model"]["width"] == run_cfg.model.width
    assert config["eval"]["mode"] == "whole" and config["data"]["normalize"] == "imagenet"
    classes = json.loads((folder / "classes.json").read_text())
    assert classes["classes"] == state["class_names"] and len(classes["palette"]) == 19
    card = (folder / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    run_info = json.loads((run / "run.json").read_text())
    assert "license: mit" in card and f"| target {metrics['split']} |" in card
    assert f"{100 * metrics['mIoU']:.2f}" in card and f"{100 * metrics['test']['mIoU']:.2f}" in card
    assert str(run_info["git_revision"] or "unknown") in card and "source: `synthetic`" in card
    assert "Segmenter.from_pretrained" in card

    image = _image(40, 50, 4)
    a, b = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt"), Segmenter.from_pretrained(folder)
    assert np.array_equal(a.predict_proba(image), b.predict_proba(image)) and a.classes == b.classes
    assert np.array_equal(a.palette, b.palette)


def test_a_folder_whose_weights_do_not_fit_its_config_is_refused(run, tmp_path, capsys):
    from bida import Segmenter

    folder = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--format", "folder",
                 "--out", str(folder)]) == 0
    config = folder / "config.yaml"
    config.write_text(config.read_text().replace("width: 0.125", "width: 0.25"))
    with pytest.raises(CheckpointError, match="does not fit this model architecture"):
        Segmenter.from_pretrained(folder)
    capsys.readouterr()
    image = tmp_path / "x.png"
    Image.fromarray(_image(32, 64)).save(image)
    assert main(["predict", "--model", str(folder), str(image), "--out", str(tmp_path / "p")]) == 2
    assert "does not fit" in _one_line_error(capsys)
    (folder / "classes.json").unlink()
    assert main(["predict", "--model", str(folder), str(image), "--out", str(tmp_path / "p")]) == 2
    assert "not a bida model folder" in _one_line_error(capsys)


def test_init_checkpoint_and_pretrained_accept_a_model_folder(run, tmp_path):
    from bida.models.weights import check_trained_head, load_model_weights, load_pretrained
    from bida.errors import ConfigError

    folder = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--format", "folder",
                 "--out", str(folder)]) == 0
    cfg = load_config(run / "config.yaml")
    expected = build_model(cfg.model, 19, cfg.method.feature)
    load_model_weights(expected, run / "checkpoints" / "last.pt")
    for load in (load_model_weights, load_pretrained):
        torch.manual_seed(5)
        model = build_model(cfg.model, 19, cfg.method.feature)
        load(model, folder)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items()), load.__name__
    with pytest.raises(ConfigError, match="no projection head trained"):  # read from the folder's config.yaml
        check_trained_head(folder)


def test_a_run_starts_from_a_model_folder(run, tmp_path):
    from conftest import TINY

    folder = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--format", "folder",
                 "--out", str(folder)]) == 0
    out = tmp_path / "adapt"
    cache = run.parent / "cache"
    assert main(["train", "--out", str(out), *TINY, f"data.synthetic.cache_dir={cache}", "method=self_training",
                 f"model.init_checkpoint={folder}", "train.rounds=1", "train.iters_per_round=2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["step"] == 2


def test_segmenter_is_exported_lazily():
    import subprocess
    import sys

    code = "import sys, bida; assert 'bida.tools.segmenter' not in sys.modules; print(bida.Segmenter.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "Segmenter"


def test_a_vfm_uda_dinov2_folder_predicts_as_its_checkpoint(tmp_path):
    """Every segmentor key reaches the folder (VFM-UDA's light head and input resize change the
    network), and MIC's mask token, which only masks training inputs, stays out of it."""
    from conftest import TINY
    from safetensors.torch import load_file

    from bida import Segmenter

    vfm_uda = ["model.backbone=dinov2_vits14", "model.decoder=light", "model.input_scale=1.1", "model.mask_token=true",
               "mic.weight=1", "train.schedule=teacher", "method=self_training", "model.drop_path=0.0",
               "model.proj_dim=8", "train.iters=2"]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, f"data.synthetic.cache_dir={tmp_path / 'cache'}", *vfm_uda]) == 0
    folder = tmp_path / "model"
    assert main(["export", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--format", "folder",
                 "--out", str(folder)]) == 0
    config = yaml.safe_load((folder / "config.yaml").read_text())["model"]
    assert (config["decoder"], config["input_scale"], config["mask_token"]) == ("light", 1.1, False)
    assert "backbone.mask_token" not in load_file(str(folder / "model.safetensors"))
    image = _image(40, 50, 5)
    a, b = Segmenter.from_checkpoint(run / "checkpoints" / "last.pt"), Segmenter.from_pretrained(folder)
    assert np.array_equal(a.predict_proba(image), b.predict_proba(image))
