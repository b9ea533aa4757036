"""``bida export``: a trained network as an ONNX graph, a ``torch.export`` program or a model folder.

- ``onnx``: opset :data:`ONNX_OPSET`, dynamic batch, height and width; the input is uint8
  RGB (N, 3, H, W), normalised inside the graph (``data.normalize``: ImageNet, or BGR minus
  the caffe mean for DeepLab-V2's init weights); the output is logits (N, K, H, W) at the
  input size or class ids (N, H, W) (``output="labels"``). The graph is one forward of the
  network: sliding windows and flip averaging stay outside, in the loop that
  :meth:`bida.Segmenter.from_onnx` runs. The file's metadata holds the classes and the
  settings (``bida.*`` keys).
- ``pt2``: the same graph as a ``torch.export`` program (``torch.export.load(path).module()``).
- ``folder``: ``model.safetensors``, ``config.yaml``, ``classes.json`` and a ``README.md``
  model card (:func:`model_card`); :meth:`bida.Segmenter.from_pretrained` loads it.

Each graph is checked after export on an image of another size than the one it was
traced with: the largest logit difference to PyTorch and the share of equal class ids are
printed, and an export that disagrees is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..errors import BidaError, CheckpointError
from .export_spec import FORMATS, ONNX_OPSET, OUTPUTS
from .segmenter import (MODEL_FOLDER_CARD, MODEL_FOLDER_CLASSES, MODEL_FOLDER_CONFIG, TRAINING_ONLY_WEIGHTS,
                        Normalise, Segmenter, inference_config)

# The traced example: a batch of 2 (a batch of 1 would be specialised) at a size that is no
# multiple of DINOv2's 14-pixel patch (its padding must be in the graph) and at least MiT's 32.
EXAMPLE_SHAPE = (2, 3, 66, 94)
CHECK_SHAPE = (1, 3, 75, 101)  # another size, to check that height and width stayed dynamic
MAX_LOGIT_DIFF = 1e-3  # an export further from PyTorch than this is broken, not rounded


class ExportGraph(torch.nn.Module):
    """What an exported file computes: uint8 RGB -> normalised -> network -> logits at the input size.

    Shape:
        image (N, 3, H, W) uint8 -> logits (N, K, H, W) float32, or class ids (N, H, W) int64.
    """

    def __init__(self, model: torch.nn.Module, normalize: str, output: Literal["logits", "labels"] = "logits"):
        super().__init__()
        self.model, self.normalise, self.output = model, Normalise(normalize), output

    def forward(self, image: Tensor) -> Tensor:
        logits = self.model(self.normalise(image), "target").logits.float()
        # As the evaluation upsamples them (bilinear, align_corners=False) before the softmax.
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1) if self.output == "labels" else logits


def _require_onnx() -> None:
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise BidaError(f"bida export --format onnx needs {', '.join(missing)}: pip install 'bida[export]'")


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an output that exists (without ``overwrite``), or that ``overwrite`` must not replace."""
    if not out.exists():
        return
    if not overwrite:
        raise BidaError(f"{out} already exists; use --overwrite to replace it")
    if fmt == "folder":
        if not out.is_dir():
            raise BidaError(f"refusing to --overwrite {out}: it is a file, not a model folder")
        if any(out.iterdir()) and not (out / MODEL_FOLDER_CONFIG).is_file():
            raise BidaError(f"refusing to --overwrite {out}: it holds no bida model folder (no {MODEL_FOLDER_CONFIG}); "
                            "remove it yourself or choose another --out")
    elif out.is_dir():
        raise BidaError(f"refusing to --overwrite {out}: it is a directory")


def export(source: str | Path, fmt: str, out: str | Path, output: str = "logits", overwrite: bool = False,
           license: str = "unknown", quiet: bool = False) -> dict:
    """Export the network of ``source`` (a checkpoint or a model folder) to ``out``.

    Returns:
        ``{"path": out, ...}`` with, for graphs, ``max_abs_logit_diff`` and ``identical_ids``
        against PyTorch on a :data:`CHECK_SHAPE` image.

    Raises:
        BidaError: an unknown format or output, an ``out`` that exists without ``overwrite``,
            missing ONNX packages, a file that is no bida checkpoint, an export that disagrees.
    """
    if fmt not in FORMATS:
        raise BidaError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if output not in OUTPUTS:
        raise BidaError(f"--output {output!r} is not one of {', '.join(OUTPUTS)}")
    if output != "logits" and fmt == "folder":
        raise BidaError("--output labels is for graphs (onnx, pt2); a model folder holds the weights")
    out = Path(out)
    check_out(out, fmt, overwrite)
    if fmt == "onnx":
        _require_onnx()
    source = Path(source)
    if source.suffix == ".onnx":
        raise CheckpointError(f"{source} is an ONNX file; export from a bida checkpoint or model folder")
    seg = Segmenter.load(source, "cpu")
    if fmt == "folder":
        return {"path": export_folder(seg, source, out, license)}
    if seg.cfg.model.hrda.enabled:  # its padding and detail windows depend on the input size in Python
        raise BidaError(f"{source}: an HRDA model (model.hrda.enabled) exports as a model folder only "
                        f"(--format folder), not as a graph ({fmt})")
    graph = ExportGraph(seg.model, seg.cfg.data.normalize, output).eval()
    meta = {"bida.config": json.dumps(inference_config(seg.cfg)),
            "bida.classes": json.dumps({"classes": seg.classes, "palette": seg.palette.tolist()}),
            "bida.input": "image: uint8 RGB, (N, 3, H, W)",
            "bida.output": output, "bida.opset": str(ONNX_OPSET), "bida.source": source.name}
    if fmt == "onnx":
        result = export_onnx(graph, out, meta)
    else:
        result = export_pt2(graph, out, meta)
    if not quiet:
        print(f"checked on a {CHECK_SHAPE[2]}x{CHECK_SHAPE[3]} image: max |logit difference| to PyTorch "
              f"{result['max_abs_logit_diff']:.2e}, class ids {100 * result['identical_ids']:.3f}% identical")
    return result


@contextlib.contextmanager
def _exporter_quiet():
    """The exporter's progress lines, warnings and log records (optional packages it would
    also translate, deprecations inside torch) are not the user's: keep the output to bida's."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _dynamic_shapes() -> dict:
    dim = torch.export.Dim.DYNAMIC
    return {"image": {0: dim, 2: dim, 3: dim}}


def _example(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _compare(graph: ExportGraph, run, path: Path) -> dict:
    """Run the exported file (``run``: uint8 tensor -> output tensor) against PyTorch on :data:`CHECK_SHAPE`."""
    image = _example(CHECK_SHAPE, 1)
    with torch.no_grad():
        logits = graph.model(graph.normalise(image), "target").logits.float()
        ref = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        got = run(image)
    if graph.output == "labels":
        diff, same = 0.0, float((got == ref.argmax(1)).float().mean())
    else:
        diff, same = float((got - ref).abs().max()), float((got.argmax(1) == ref.argmax(1)).float().mean())
    if diff > MAX_LOGIT_DIFF or same < 0.999:
        path.unlink(missing_ok=True)
        raise BidaError(f"the exported graph disagrees with PyTorch (max |logit difference| {diff:.2e}, "
                        f"{100 * same:.2f}% identical class ids); nothing written")
    return {"path": path, "max_abs_logit_diff": diff, "identical_ids": same}


def export_onnx(graph: ExportGraph, out: Path, meta: dict[str, str]) -> dict:
    """The graph as ONNX (opset :data:`ONNX_OPSET`, dynamic N, H, W), metadata added, checked with onnxruntime."""
    import onnxruntime as ort

    with torch.no_grad(), _exporter_quiet():
        program = torch.onnx.export(graph, (_example(EXAMPLE_SHAPE, 0),), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=["image"], output_names=[graph.output],
                                    dynamic_shapes=_dynamic_shapes(), verbose=False)
    program.model.metadata_props.update(meta)
    buf = io.BytesIO()
    program.save(buf)  # type: ignore[arg-type] - an open binary file is accepted
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return _compare(graph, lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), out)


def export_pt2(graph: ExportGraph, out: Path, meta: dict[str, str]) -> dict:
    """The graph as a ``torch.export`` program (``.pt2``), ``bida.json`` metadata inside."""
    with torch.no_grad(), _exporter_quiet():
        program = torch.export.export(graph, (_example(EXAMPLE_SHAPE, 0),), dynamic_shapes=_dynamic_shapes())
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"bida.json": json.dumps(meta)})
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    loaded = torch.export.load(str(out)).module()
    return _compare(graph, lambda x: loaded(x), out)


# ---------------------------------------------------------------------------- model folder


def _run_files(source: Path) -> tuple[Path | None, dict | None, dict | None]:
    """(run directory, its metrics.json, its run.json) of a checkpoint in ``RUN/checkpoints/``."""
    run = source.parent.parent if source.parent.name == "checkpoints" else None
    found = []
    for name in ("metrics.json", "run.json"):
        try:
            found.append(json.loads((run / name).read_text()) if run is not None else None)
        except (OSError, ValueError):
            found.append(None)
    return run, found[0], found[1]


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def model_card(seg: Segmenter, source: Path, license: str) -> str:
    """The folder's ``README.md``: what the model is, how it was trained, on what, how well, how to load it.

    Method and recipe from the run's config, data from its ``data.source``/``data.target``,
    figures from its ``metrics.json`` (the split named), commit and environment from its
    ``run.json``; what is not available (a checkpoint outside a run directory) is said so.
    """
    cfg = seg.cfg
    run, metrics, run_info = _run_files(source)
    t, m = cfg.train, cfg.model
    domain = {which: getattr(cfg.data, which) for which in ("source", "target")}
    recipe = (f"{t.iters} source iterations" if cfg.method.name == "source_only" else
              f"{t.rounds} self-training rounds of {t.iters_per_round} iterations after a {t.iters}-iteration "
              "source stage" if t.schedule == "rounds" else
              f"mean-teacher schedule, {t.iters} iterations" + (f" after a {t.source_iters}-iteration source stage"
                                                                if t.source_iters else ""))
    if cfg.model.init_checkpoint:
        recipe += f", started from {Path(cfg.model.init_checkpoint).name}"
    if cfg.mic.weight > 0:
        recipe += f", MIC (weight {cfg.mic.weight:g}, mask ratio {cfg.mic.mask_ratio:g})"
    lines = [
        "---", f"license: {license}", "library_name: bida", "pipeline_tag: image-segmentation",
        f"tags: [semantic-segmentation, domain-adaptation, {m.backbone}, {cfg.method.name}]", "---", "",
        f"# {cfg.method.name} {m.backbone} ({domain['source'].kind} to {domain['target'].kind})", "",
        "A semantic segmentation network trained with bida (unsupervised domain adaptation: labelled source "
        "images, unlabelled target images) and exported with `bida export --format folder`.", "",
        "## Method and recipe", "",
        f"- method: `{cfg.method.name}` (`train.schedule: {t.schedule}`): {recipe}",
        f"- network: `{m.backbone}` at width {m.width:g}"
        + (f", `{m.decoder}` decoder ({m.decoder_dim} channels)" if not m.backbone.startswith("resnet") else
           " (DeepLab-V2)"),
        f"- optimiser: {t.optimizer}, lr {t.lr:g}, batch {t.batch_size} per domain, crop {list(cfg.data.crop)}",
        f"- input: `data.normalize: {cfg.data.normalize}`; evaluation: `{cfg.eval.mode}`"
        + (f" windows {list(cfg.eval.crop)} stride {list(cfg.eval.stride)}" if cfg.eval.mode == "slide" else "")
        + (", flip averaged" if cfg.eval.flip else "") + (f", at {list(cfg.eval.size)}" if cfg.eval.size else ""),
        f"- initial weights: {Path(m.pretrained).name if m.pretrained else 'none (random initialisation)'}",
        f"- the run's full config: {run / 'config.yaml' if run else 'not available (checkpoint outside a run directory)'}",
        "", "## Data", "",
        *[f"- {which}: `{d.kind}`" + (f" at `{d.root}`" if d.root else "") + f", split `{d.train_split}`"
          for which, d in domain.items()],
        f"- classes ({seg.num_classes}): {', '.join(seg.classes)}", "", "## Results", "",
    ]
    if metrics is None:
        lines.append("Not available: no `metrics.json` beside the checkpoint (a run directory's).")
    else:
        lines += ["| split | checkpoint | mIoU (%) |", "|---|---|---:|",
                  f"| target {metrics.get('split', 'val')} | {metrics.get('checkpoint', 'last')} "
                  f"(step {metrics.get('step', 'n/a')}) | {_pct(metrics.get('mIoU'))} |"]
        for key in ("mIoU_16", "mIoU_13"):
            if key in metrics:
                lines.append(f"| target {metrics.get('split', 'val')}, {key[5:]} classes | "
                             f"{metrics.get('checkpoint', 'last')} | {_pct(metrics[key])} |")
        if isinstance(metrics.get("test"), dict):
            lines.append(f"| target {metrics['test'].get('split', 'test')} | last | {_pct(metrics['test'].get('mIoU'))} |")
        if isinstance(metrics.get("source_val"), dict):
            lines.append(f"| source {metrics['source_val'].get('split', 'val')} | last | "
                         f"{_pct(metrics['source_val'].get('mIoU'))} |")
        if source.name != "last.pt":
            lines += ["", f"The figures are the run's `metrics.json`, of its last checkpoint; this folder holds "
                          f"`{source.name}`."]
    lines += ["", "## Provenance", ""]
    if run_info is None:
        lines.append("Not available: no `run.json` beside the checkpoint.")
    else:
        lines += [f"- commit: {run_info.get('git_revision') or 'unknown (not run from a git checkout)'}",
                  f"- torch {run_info.get('torch', 'n/a')}, device {run_info.get('device', 'n/a')} "
                  f"({run_info.get('cpu') or 'CPU n/a'}), {run_info.get('world_size', 1)} process(es), "
                  f"started {run_info.get('started', 'n/a')}"]
    lines += [
        f"- licence: {license}", "", "## Files", "",
        "- `model.safetensors`: the weights (a state dict, no pickled code)",
        "- `config.yaml`: the bida config keys that rebuild the network and its evaluation settings",
        "- `classes.json`: class names in class-id order, their colours, the ignore value", "",
        "## How to load", "", "```python", "from bida import Segmenter", "",
        "seg = Segmenter.from_pretrained(\"path/to/this/folder\")", "labels = seg.predict(image)  # (H, W) class ids",
        "```", "", "or `bida predict --model path/to/this/folder IMAGES --out DIR`; "
        "a run continues from it with `model.init_checkpoint=path/to/this/folder`.", ""]
    return "\n".join(lines)


def export_folder(seg: Segmenter, source: Path, out: Path, license: str) -> Path:
    """Write the model folder of ``seg`` to ``out`` (each file atomically, the weights first)."""
    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in seg.model.state_dict().items()
             if k not in TRAINING_ONLY_WEIGHTS}
    atomic_write_bytes(out / "model.safetensors", save(state, metadata={"format": "pt"}))
    header = ("# bida model folder: the config keys that rebuild the network and say how it predicts\n"
              "# (bida.tools.segmenter.inference_config); every other key takes its default.\n")
    atomic_write_text(out / MODEL_FOLDER_CONFIG, header + yaml.safe_dump(inference_config(seg.cfg), sort_keys=False))
    atomic_write_text(out / MODEL_FOLDER_CLASSES, json.dumps(
        {"classes": seg.classes, "palette": seg.palette.tolist(), "ignore_index": 255}, indent=2))
    if source.is_dir() and (source / MODEL_FOLDER_CARD).is_file():  # a folder exported again keeps its card
        if source.resolve() != out.resolve():
            shutil.copyfile(source / MODEL_FOLDER_CARD, out / MODEL_FOLDER_CARD)
    else:
        atomic_write_text(out / MODEL_FOLDER_CARD, model_card(seg, source, license))
    return out
