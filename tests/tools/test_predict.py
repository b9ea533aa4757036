"""bida.tools.predict: predictions, palettes, and outputs it never overwrites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.models.hrda import HRDASegmentor
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import PALETTE, _one_line, _one_line_error, _tree, folder_run, hrda_run_overrides, naive_fused, stopped_run  # noqa: F401 (fixtures)


def test_bida_predict_on_an_unseen_size_uses_the_sliding_fused_prediction(tmp_path, synthetic_cache):
    """An HRDA checkpoint predicts a 70x101 image (trained on 64x64 crops) with 64-pixel
    evaluation windows at stride 32, each fused as HRDA fuses (context + sliding detail
    crops + attention), batched; the reference loops over the windows one by one."""
    import numpy as np
    from PIL import Image

    from bida.tools.cli import main
    from bida.engine.train import train
    from bida.tools.predict import model_from_checkpoint

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        "train.iters=1", "eval.mode=slide", "eval.crop=[64,64]", "eval.stride=[32,32]"])
    train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    image = rng.integers(0, 256, (70, 101, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    model, _, _, _ = model_from_checkpoint(ckpt)
    assert isinstance(model, HRDASegmentor) and model.batched_slide
    from bida.data.transforms import to_tensor

    x = to_tensor(image, "imagenet").unsqueeze(0)
    total, count = torch.zeros(1, model.num_classes, 70, 101), torch.zeros(1, 1, 70, 101)
    for y in (0, 6):  # 64-pixel windows at stride 32, the last flush with the border
        for c in (0, 32, 37):
            logits = naive_fused(model, x[..., y:y + 64, c:c + 64])
            total[..., y:y + 64, c:c + 64] += F.interpolate(logits, size=(64, 64), mode="bilinear",
                                                            align_corners=False)
            count[..., y:y + 64, c:c + 64] += 1
    expected = (total / count).argmax(1)[0].numpy()
    written = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert written.shape == (70, 101) and (written == expected).mean() > 0.999


def test_predict_after_a_bad_file_resumes_without_overwrite(tmp_path, capsys, tiny_overrides):
    # before: the outputs written before the bad file made the rerun refuse without --overwrite
    import numpy as np
    from PIL import Image

    import bida.engine.train as tr

    tr.Trainer(load_config(None, tiny_overrides), tmp_path / "ok").fit(stop_after=1)
    ckpt = str(tmp_path / "ok" / "checkpoints" / "last.pt")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(imgs / f"{name}.png")
    (imgs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = ["predict", "--checkpoint", ckpt, str(imgs), "--out", str(tmp_path / "pred"), "--quiet"]
    assert main(args) == 2 and "b.png" in _one_line_error(capsys)
    first = (tmp_path / "pred" / "a.png").stat().st_mtime_ns
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(imgs / "b.png")
    assert main(args) == 0
    assert (tmp_path / "pred" / "b_overlay.png").is_file()
    assert (tmp_path / "pred" / "a.png").stat().st_mtime_ns == first  # kept, not predicted again


def test_predict_overwrite_never_replaces_inputs_or_files_it_did_not_write(stopped_run, tmp_path, capsys):
    # before: --overwrite with --out the input folder replaced the input images by label maps
    from PIL import Image

    images, other = tmp_path / "images", tmp_path / "other"
    images.mkdir()
    other.mkdir()
    Image.new("RGB", (64, 32), (10, 200, 30)).save(images / "a.png")
    Image.new("RGB", (8, 8)).save(other / "a.png")  # someone's picture that happens to share the name
    before = _tree(tmp_path / "images") | _tree(tmp_path / "other")
    ckpt = str(stopped_run / "checkpoints" / "last.pt")
    assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(images), "--overwrite", "--quiet"]) == 2
    assert "one of the input images" in _one_line(capsys)
    assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(other), "--overwrite", "--quiet"]) == 2
    assert "holds no bida predictions" in _one_line(capsys)
    assert _tree(tmp_path / "images") | _tree(tmp_path / "other") == before
    out = tmp_path / "pred"
    for _ in range(2):  # predictions of bida are replaced with --overwrite
        assert main(["predict", "--checkpoint", ckpt, str(images), "--out", str(out), "--overwrite", "--quiet"]) == 0
    assert (out / "a.png").is_file()


def test_predictions_use_the_palette_of_classes_json(folder_run, tmp_path):
    run, _, _ = folder_run
    ckpt = run / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["palette"] == [list(c) for c in PALETTE]
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    pred = np.asarray(Image.open(tmp_path / "p" / "x.png"))
    color = np.asarray(Image.open(tmp_path / "p" / "x_color.png"))
    assert np.array_equal(color, np.asarray(PALETTE, np.uint8)[pred])


def test_palette_of_an_older_checkpoint_comes_from_its_config(folder_run, tmp_path):
    from bida.tools.predict import model_from_checkpoint

    run, _, _ = folder_run
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    del state["palette"]
    torch.save(state, tmp_path / "old.pt")
    assert model_from_checkpoint(tmp_path / "old.pt")[3] == list(PALETTE)


def test_predict_keeps_every_output(folder_run, tmp_path, capsys):
    run, _, _ = folder_run
    ckpt = str(run / "checkpoints" / "last.pt")
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.png", "sub/a.png", "sub/b.jpg"):
        Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(imgs / name)
    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", ckpt, str(imgs), "--out", str(out), "--quiet"]) == 0
    assert "wrote 3 predictions" in capsys.readouterr().out
    for name in ("a", "sub/a", "sub/b"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}_overlay.png").is_file()
    # the same file twice is predicted once
    assert main(["predict", "--checkpoint", ckpt, str(imgs / "a.png"), str(imgs / "a.png"), "--out",
                 str(tmp_path / "q"), "--quiet"]) == 0
    assert "wrote 1 predictions" in capsys.readouterr().out
    # x.jpg and x.png would write the same files: refused, naming both, nothing written
    Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(imgs / "sub" / "a.jpg")
    assert main(["predict", "--checkpoint", ckpt, str(imgs), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sub/a.jpg" in err and "sub/a.png" in err and not (tmp_path / "r").exists()
