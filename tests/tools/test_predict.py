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


TINY_MIT = ["model.backbone=mit_b0", "model.width=0.25", "model.decoder=daformer", "model.decoder_dim=16",
            "model.proj_dim=8", "model.drop_path=0", "train.schedule=teacher", "method.name=self_training",
            "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
            "model.hrda.detail_crop=[32,32]"]


@torch.no_grad()
def naive_fused(model, x):
    """HRDA's prediction of a whole input (sides multiples of 16, 32-pixel detail crops): the
    context at half resolution, the detail on 32-pixel windows at stride 16 (one forward
    each), averaged where they overlap, fused with the unmasked attention (paper eq. 5)."""
    base, (h, w) = model.base, x.shape[-2:]
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    levels = base.backbone(small)
    context = base.decode_head(levels)[0]
    attention = torch.sigmoid(model.scale_attention(levels)[0])
    total, count = torch.zeros(x.shape[0], model.num_classes, h // 4, w // 4), torch.zeros(1, 1, h // 4, w // 4)
    for y in range(0, h - 16, 16):
        for c in range(0, w - 16, 16):
            total[..., y // 4:y // 4 + 8, c // 4:c // 4 + 8] += base.decode_head(
                base.backbone(x[..., y:y + 32, c:c + 32]))[0]
            count[..., y // 4:y // 4 + 8, c // 4:c // 4 + 8] += 1
    a_up = F.interpolate(attention, scale_factor=2, mode="bilinear", align_corners=False)
    low = F.interpolate((1 - attention) * context, scale_factor=2, mode="bilinear", align_corners=False)
    return a_up * (total / count) + low


def hrda_run_overrides(cache) -> list[str]:
    """A tiny HRDA teacher run: 64x64 context crops (MiT needs 32 pixels a side at half
    resolution), 32x32 detail crops, of the synthetic pair at 64x128."""
    from conftest import TINY

    return TINY + [f"data.synthetic.cache_dir={cache}", "data.synthetic.height=64", "data.synthetic.width=128",
                   "method.feature=decoder", "data.normalize=imagenet", "train.optimizer=adamw", "train.lr=6e-4",
                   "train.iters=3", *TINY_MIT]


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


def _one_line_error(capsys) -> str:
    """The final stderr line; the announcement a stop signal prints at once is left out."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("bida: stop requested"))
    assert "\n" not in err, err
    return err


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


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped_run(tmp_path, tiny_overrides):
    """A source-only run stopped at step 3 (checkpoints at 2 and 3: last.pt and last.prev.pt)."""
    import bida.engine.train as tr

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.iters=6"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None
    return run


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


PALETTE = ((250, 0, 0), (0, 250, 0), (0, 0, 250))


FOLDER_TINY = ["model.width=0.125", "data.crop=[16,32]", "train.iters=2", "train.checkpoint_every=1",
               "train.eval_every=100", "train.log_every=1", "train.quiet=true", "data.num_workers=0"]


def _folder_pair(root: Path, palette=PALETTE, target_classes=("sky", "tree", "house")) -> list[str]:
    make_folder_tree(root / "A", classes=("sky", "tree", "house"), size=(16, 32), palette=palette)
    make_folder_tree(root / "B", classes=target_classes, size=(16, 32), palette=palette,
                     target_without_train_labels=True)
    return ["data.source.kind=folder", f"data.source.root={root / 'A'}",
            "data.target.kind=folder", f"data.target.root={root / 'B'}"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A tiny source-only run on a folder pair with its own palette (trained once)."""
    root = tmp_path_factory.mktemp("folders")
    data = _folder_pair(root)
    run = root / "run"
    import io
    from contextlib import redirect_stdout

    err = io.StringIO()
    with redirect_stdout(err):
        assert main(["train", *data, *FOLDER_TINY, "--out", str(run)]) == 0
    return run, data, err.getvalue()


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
