"""bida export: ONNX parity with PyTorch on every backbone family, the sliding-window loop
around an ONNX window model against bida evaluate, torch.export programs, bad input.

The PyTorch reference is written here: the normalisation of the datasets (to_tensor),
one forward, a bilinear upsampling to the input size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bida.checkpoint import save_checkpoint
from bida.config import load_config, to_dict
from bida.data.transforms import to_tensor
from bida.models import build_model
from bida.tools.cli import main
from helpers import hrda_run_overrides

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FAMILIES = {  # tiny widths, as the model tests use; DeepLab-V2 with the caffe input of its init weights
    "resnet": ["model.backbone=resnet18", "model.width=0.125", "data.normalize=caffe"],
    "mit": ["model.backbone=mit_b0", "model.width=0.25", "model.decoder_dim=16", "model.proj_dim=8"],
    "dinov2": ["model.backbone=dinov2_vits14", "model.width=0.125", "model.decoder=daformer", "model.decoder_dim=16",
               "model.proj_dim=8"],
    # VFM-UDA's: the input resized to a whole patch grid, which the graph must compute for each size
    "dinov2_vfm_uda": ["model.backbone=dinov2_vits14", "model.width=0.125", "model.decoder=light",
                       "model.input_scale=1.1", "model.proj_dim=8"],
}
NAMES = ["sky", "tree", "house", "road", "car"]
# max |logit difference| allowed; 1e-4 unless said here. The input resize of model.input_scale
# runs as ONNX's Resize, which derives its source coordinates from the size ratio where
# PyTorch's bilinear takes the inverse ratio: float rounding, 1.3e-4 to 2.6e-4 on these
# logits (std 5), every class id the same. A size frozen at the traced example gives 21.
TOLERANCE = {"dinov2_vfm_uda": 1e-3}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    return err


def _trained_like(model: torch.nn.Module, normalize: str) -> None:
    """Give a random network the scale of a trained one, so that an absolute tolerance on
    logits means what it means for a trained model: random weights give logits with a std
    of about 80 (DeepLab-V2 on caffe input, BN statistics at their initial 0 and 1) or 0.03
    (the decoders' small classifier init). BN statistics are measured on images, then the
    classifier is scaled so that the logits have a std of 5."""
    rng = np.random.default_rng(7)
    x = torch.stack([to_tensor(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), normalize) for _ in range(4)])
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration forward
    model.train()
    with torch.no_grad():
        model(x, "target")
        model.eval()
        scale = 5.0 / float(model(x, "target").logits.std())
        for name, p in model.named_parameters():
            if name.startswith(("layer5.", "decode_head.classifier.")):  # the logits are linear in these
                p.mul_(scale)


def _checkpoint(path: Path, overrides: list[str], seed: int = 0) -> Path:
    """A bida checkpoint (weights, config, classes) of a random network at a trained network's scale."""
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(NAMES), cfg.method.feature)
    _trained_like(model, cfg.data.normalize)
    save_checkpoint({"model": model.state_dict(), "config": to_dict(cfg), "num_classes": len(NAMES),
                     "class_names": NAMES}, path)
    return path


def _reference_logits(ckpt: Path, images: np.ndarray) -> torch.Tensor:
    """PyTorch logits at the input size of uint8 RGB images (N, H, W, 3)."""
    from bida.tools.predict import model_from_checkpoint

    model, cfg, _, _ = model_from_checkpoint(ckpt)
    x = torch.stack([to_tensor(im, cfg.data.normalize) for im in images])
    with torch.no_grad():
        logits = model(x, "target").logits.float()
    return F.interpolate(logits, size=images.shape[1:3], mode="bilinear", align_corners=False)


def parity(ckpt: Path, onnx_path: Path, shape: tuple[int, int, int]) -> tuple[float, float]:
    """(max |logit difference|, share of identical class ids) of onnxruntime against PyTorch."""
    images = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.transpose(0, 3, 1, 2)})[0]
    ref = _reference_logits(ckpt, images).numpy()
    return float(np.abs(got - ref).max()), float((got.argmax(1) == ref.argmax(1)).mean())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_matches_pytorch_at_other_sizes(tmp_path, family, capsys):
    ckpt = _checkpoint(tmp_path / "model.pt", FAMILIES[family])
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert "class ids" in capsys.readouterr().out
    # Training crops are 64x128 (defaults.yaml): other sizes, batches of 1 and 3.
    for shape in ((3, 45, 77), (1, 70, 99)):
        diff, same = parity(ckpt, out, shape)
        assert diff <= TOLERANCE.get(family, 1e-4) and same >= 0.9999, (shape, diff, same)
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["bida.opset"] == "18" and meta["bida.output"] == "logits"
    assert json.loads(meta["bida.classes"])["classes"] == NAMES
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3])), dims  # dynamic N, H, W
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8


@pytest.mark.slow
def test_onnx_labels_output_and_torch_export_program(tmp_path):
    ckpt = _checkpoint(tmp_path / "model.pt", FAMILIES["resnet"])
    images = np.random.default_rng(3).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    ref = _reference_logits(ckpt, images)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", "labels",
                 "--out", str(tmp_path / "labels.onnx"), "--quiet"]) == 0
    session = ort.InferenceSession(str(tmp_path / "labels.onnx"), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"image": images.transpose(0, 3, 1, 2)})[0]
    assert labels.shape == (2, 37, 53) and (labels == ref.argmax(1).numpy()).mean() >= 0.9999
    assert main(["export", "--checkpoint", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "m.pt2"), "--quiet"]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    got = program(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.slow
def test_the_sliding_window_loop_around_an_onnx_model_scores_as_bida_evaluate(tmp_path, tiny_overrides):
    from bida import Segmenter
    from bida.data.datasets import build_eval_dataset, resolve_domain
    from bida.engine.inference import evaluate

    # Windows smaller than the 32x64 val images, overlapping, with flip: the loop does real work.
    slide = ["eval.mode=slide", "eval.crop=[24,40]", "eval.stride=[8,12]", "eval.flip=true"]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, *slide]) == 0
    ckpt = run / "checkpoints" / "last.pt"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "w.onnx"),
                 "--quiet"]) == 0
    seg = Segmenter.from_onnx(tmp_path / "w.onnx")
    assert (seg.cfg.eval.mode, seg.cfg.eval.crop, seg.cfg.eval.flip) == ("slide", (24, 40), True)
    cfg = load_config(run / "config.yaml")
    target = resolve_domain(cfg, "target")
    got = evaluate(seg.model, build_eval_dataset(cfg, target, "val"), seg.cfg.eval, seg.classes)
    assert abs(got["mIoU"] - expected["mIoU"]) <= 1e-4
    assert np.abs(np.array(got["confusion"]) - np.array(expected["confusion"])).sum() <= 2  # pixels
    # The PyTorch Segmenter on the val images (uint8, as read) gives bida evaluate's confusion exactly.
    from bida.engine.inference import confusion_matrix

    torch_seg = Segmenter.from_checkpoint(ckpt)
    ds = build_eval_dataset(cfg, target, "val")
    confusion = sum(confusion_matrix(torch.from_numpy(torch_seg.predict(image)), torch.from_numpy(label.astype(np.int64)),
                                     len(torch_seg.classes)) for image, label in map(ds.load, range(len(ds))))
    assert confusion.tolist() == expected["confusion"]
    # The Python API on another image: the PyTorch network and the ONNX window model agree.
    image = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    assert np.abs(torch_seg.predict_proba(image) - seg.predict_proba(image)).max() <= 1e-5


@pytest.mark.slow
def test_bad_exports_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "model.pt", FAMILIES["resnet"])
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out", str(out)]) == 2
    assert "'tflite' is not one of onnx, pt2, folder" in _one_line_error(capsys)
    weights_only = tmp_path / "weights.pt"
    save_checkpoint({"model": torch.nn.Conv2d(3, 3, 1).state_dict()}, weights_only)
    assert main(["export", "--checkpoint", str(weights_only), "--format", "onnx", "--out", str(out)]) == 2
    assert "is not a bida checkpoint" in _one_line_error(capsys)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["export", "--checkpoint", str(text), "--format", "folder", "--out", str(tmp_path / "f")]) == 2
    assert "is not a PyTorch checkpoint" in _one_line_error(capsys)
    assert not out.exists() and not (tmp_path / "f").exists()
    out.write_bytes(b"keep me")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)]) == 2
    assert "already exists; use --overwrite" in _one_line_error(capsys)
    assert out.read_bytes() == b"keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "folder", "--out", str(folder)]) == 2
    assert "already exists; use --overwrite" in _one_line_error(capsys)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "folder", "--out", str(folder), "--overwrite"]) == 2
    assert "holds no bida model folder" in _one_line_error(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "n.onnx")]) == 2
    assert "pip install 'bida[export]'" in _one_line_error(capsys)
    monkeypatch.undo()
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", "labels", "--quiet",
                 "--out", str(tmp_path / "labels.onnx")]) == 0
    from bida import Segmenter
    from bida.errors import CheckpointError

    with pytest.raises(CheckpointError, match="export with --output logits"):
        Segmenter.from_onnx(tmp_path / "labels.onnx")


def test_the_help_states_the_opset_and_the_formats():
    from bida.tools.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "export" in a.choices)
    text = " ".join(sub.choices["export"].format_help().split())
    assert "ONNX opset 18" in text and "one of onnx, pt2, folder" in text


def test_the_command_line_parser_imports_no_export_machinery():
    import subprocess

    code = ("import sys; from bida.tools.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'onnx', 'bida.tools.export') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_an_hrda_checkpoint_exports_as_a_folder_and_refuses_a_graph(tmp_path, synthetic_cache, capsys):
    pytest.importorskip("onnxruntime")
    from bida.engine.train import train
    from bida.tools.cli import main

    train(load_config(None, hrda_run_overrides(synthetic_cache) + ["train.iters=1"]), tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["export", "--checkpoint", ckpt, "--format", "folder", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exports as a model folder only" in err and not (tmp_path / "o").exists()
