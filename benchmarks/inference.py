"""Inference throughput and peak memory: PyTorch eager, PyTorch compiled, onnxruntime, side by side.

Every backend computes what ``bida export`` puts in a graph (uint8 RGB in, normalisation,
the network, logits upsampled to the input size) and the class ids (argmax), one image at
a time, on the embedded target val images resized to each ``--sizes`` entry. Backends:

- ``eager``: the PyTorch network in float32;
- ``compiled``: the same under ``torch.compile`` (``--compile``; on a CPU inductor compiles
  C++ kernels for a minute or more per input size, hence a flag; compile time is printed);
- ``onnxruntime``: the graph of ``bida export --format onnx`` (CPU execution provider);
- on CUDA also ``eager bf16`` (``torch.autocast``) and ``onnxruntime cuda`` when the CUDA
  execution provider is installed.

Each backend runs each size in a fresh process (allocators keep freed memory, so only a
fresh process gives a backend's own peak): images/s is the median over ``--repeats``
passes over the images (after one warm-up pass, whose time is printed); peak memory is the
growth of the peak resident set (CPU, Linux ``VmHWM``) or of
``torch.cuda.max_memory_allocated`` (CUDA; n/a for onnxruntime's own CUDA allocator) from
just before the warm-up pass, over the built network.

    python benchmarks/inference.py [--sizes 64x128 256x512] [--images 20] [--repeats 3] [--compile]
        [--checkpoint CKPT|FOLDER] [--backbone resnet18 --width 0.25] [--device cpu|cuda] [--threads N]
    python benchmarks/inference.py --smoke     # tiny: checks that the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bida.config import load_config
from bida.models import build_model
from bida.tools.export import ExportGraph, export_onnx

NUM_CLASSES = 19  # the embedded pair's classes (Cityscapes' train ids)


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w)


def val_images(args: argparse.Namespace) -> list[np.ndarray]:
    """The first ``--images`` embedded target val images (uint8 RGB, H x W x 3)."""
    from bida.data.datasets import build_eval_dataset, resolve_domain

    overrides = [f"data.synthetic.cache_dir={args.cache}"] if args.cache else []
    cfg = load_config(None, overrides + ["data.synthetic.num_val=%d" % max(args.images, 1)])
    ds = build_eval_dataset(cfg, resolve_domain(cfg, "target"), cfg.data.target.val_split)
    return [ds.load(i)[0] for i in range(min(args.images, len(ds)))]


def resized(images: list[np.ndarray], size: tuple[int, int]) -> list[torch.Tensor]:
    from PIL import Image

    return [torch.from_numpy(np.array(Image.fromarray(im).resize(size[::-1], Image.BILINEAR)))
            .permute(2, 0, 1).unsqueeze(0).contiguous() for im in images]


def build_graph(args: argparse.Namespace) -> ExportGraph:
    if args.checkpoint:
        from bida import Segmenter

        seg = Segmenter.load(args.checkpoint)
        return ExportGraph(seg.model, seg.cfg.data.normalize).eval()
    cfg = load_config(None, [f"model.backbone={args.backbone}", f"model.width={args.width}"])
    torch.manual_seed(0)
    return ExportGraph(build_model(cfg.model, NUM_CLASSES, cfg.method.feature), cfg.data.normalize).eval()


def backends(args: argparse.Namespace) -> list[str]:
    names = ["eager"] + (["compiled"] if args.compile else []) + ["onnxruntime"]
    if args.device == "cuda":
        import onnxruntime as ort

        names.insert(1, "eager bf16")
        if "CUDAExecutionProvider" in ort.get_available_providers():
            names.append("onnxruntime cuda")
    return names


def _reset_peak(device: torch.device) -> float:
    """Restart the peak counter; the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # VmHWM restarts from the current resident set
    except OSError:
        return float("nan")
    return _status_mib("VmRSS")


def _peak(device: torch.device, backend: str) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return float("nan") if backend.startswith("onnxruntime") else torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        return float("nan")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def runner(backend: str, graph: ExportGraph, onnx_path: Path, device: torch.device):
    """A function uint8 (1, 3, H, W) -> class ids (1, H, W) for ``backend``."""
    if backend.startswith("onnxruntime"):
        import onnxruntime as ort

        provider = "CUDAExecutionProvider" if backend.endswith("cuda") else "CPUExecutionProvider"
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(onnx_path), options, providers=[provider])
        return lambda x: session.run(None, {"image": x.numpy()})[0].argmax(1)
    graph = graph.to(device)
    # One static graph per input size (dynamic=False): a second size would otherwise be
    # recompiled with dynamic shapes, whose generated CPU kernels were measured several times slower.
    model = torch.compile(graph, dynamic=False) if backend == "compiled" else graph
    dtype = torch.bfloat16 if backend == "eager bf16" else None

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            labels = model(x.to(device, non_blocking=True)).argmax(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return labels

    return run


def measure(backend: str, args: argparse.Namespace, onnx_path: Path, sizes: list[str]) -> list[dict]:
    """Rows (backend, size, images/s, peak MiB, warm-up s) of one backend at ``sizes``.

    The peak counts from just before the warm-up pass: what predicting at that size adds
    to the built network (activations, workspaces, onnxruntime's arena, compiled code).
    """
    device = torch.device(args.device)
    graph = build_graph(args)
    images = val_images(args)
    run = runner(backend, graph, onnx_path, device)
    rows = []
    for size in map(parse_size, sizes):
        batch = resized(images, size)
        before = _reset_peak(device)
        start = time.perf_counter()
        for x in batch:  # warm-up: compilation, allocator growth, onnxruntime's first runs
            run(x)
        warmup = time.perf_counter() - start
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for x in batch:
                run(x)
            rates.append(len(batch) / (time.perf_counter() - start))
        rows.append({"backend": backend, "size": f"{size[0]}x{size[1]}", "images_per_s": statistics.median(rates),
                     "peak_mib": _peak(device, backend) - before, "warmup_s": warmup, "images": len(batch)})
    return rows


def measure_in_child(backend: str, size: str, argv: list[str]) -> list[dict]:
    done = subprocess.run([sys.executable, __file__, *argv, "--child", backend, "--child-size", size],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{backend}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode})")
        return []
    return json.loads(done.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["64x128", "256x512"],
                   help="input sizes HxW (default: the embedded images' own and 4x larger)")
    p.add_argument("--images", type=int, default=20, help="embedded target val images per pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images (median reported)")
    p.add_argument("--compile", action="store_true", help="add torch.compile (slow to compile on a CPU)")
    p.add_argument("--checkpoint", help="a bida checkpoint or model folder (default: a random --backbone network)")
    p.add_argument("--backbone", default="resnet18", help="without --checkpoint (default: the demo's resnet18)")
    p.add_argument("--width", type=float, default=0.25, help="channel multiplier without --checkpoint")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads of torch and onnxruntime (default: torch's choice)")
    p.add_argument("--cache", help="synthetic data cache directory (default: bida's)")
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-size", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--smoke", action="store_true", help="tiny: 2 images, sizes 32x64 and 48x80, one pass, one process")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.smoke:
        args.images, args.repeats, args.sizes, args.width = 2, 1, ["32x64", "48x80"], 0.125
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args, Path(args.onnx), [args.child_size])))
        return []
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        start = time.perf_counter()
        export_onnx(build_graph(args), onnx_path, {"bida.output": "logits"})
        export_s = time.perf_counter() - start
        rows = []
        for backend in backends(args):
            if args.smoke:  # one process: fast enough for a test
                rows += measure(backend, args, onnx_path, args.sizes)
            else:
                for size in args.sizes:
                    rows += measure_in_child(backend, size, argv + ["--onnx", str(onnx_path)])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = args.checkpoint or f"{args.backbone} width {args.width:g} (random weights, {NUM_CLASSES} classes)"
    print(f"Inference: {what}; {rows[0]['images'] if rows else 0} embedded target val images per pass, batch 1, "
          f"class ids at the input size")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, load average "
          f"{load:.1f} on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; ONNX export {export_s:.1f} s")
    print("\n| backend | size | images/s | peak MiB | warm-up s |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['size']} | {r['images_per_s']:.1f} | {r['peak_mib']:.0f} | {r['warmup_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "device": args.device, "torch": torch.__version__}, indent=2))
    return rows


if __name__ == "__main__":
    main()
