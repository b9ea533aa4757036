"""The ``bida`` command line: train, evaluate, predict, export, demo, ablate, data check.

Every user-facing error (:class:`~bida.errors.BidaError`) is printed as one line on stderr
with exit code 2; tracebacks are kept for genuine bugs. A run stopped cleanly by SIGINT or
SIGTERM exits with 130 or 143 (128 + the signal) and says how to resume.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from ..errors import BidaError, CheckpointError, Interrupted


_OVERRIDES_HELP = ("dotted config overrides (values parsed as YAML), e.g. train.iters=200; "
                   "accepted anywhere after the command")


def _add_config_args(p: argparse.ArgumentParser, config_help: str = "YAML config (default: the embedded synthetic pair)",
                     example: str | None = "train.iters=200") -> None:
    p.add_argument("-c", "--config", help=config_help)
    overrides_help = _OVERRIDES_HELP if example is None else _OVERRIDES_HELP.replace("train.iters=200", example)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def _version() -> str:
    """The installed package's version, or the source tree's when bida is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        PackageNotFoundError, version = Exception, None
    try:
        if version is not None:
            return version("bida")
    except PackageNotFoundError:
        pass
    from .. import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bida", description="Unsupervised domain adaptive semantic segmentation (BiDA).",
        epilog="several processes: bida launch [torchrun options] COMMAND ..., e.g. bida launch --standalone "
               "--nproc_per_node=2 train ... (torchrun with clean stops: one message, exit 130/143; "
               "bida launch --help)")
    parser.add_argument("--version", action="version", version=f"bida {_version()}",
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (source-only or adaptation)")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default: runs/<method>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    p.add_argument("--preset", choices=("paper", "plus"),
                   help="named method preset applied before the overrides (see bida.presets)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the target validation (or test) split")
    _add_config_args(p, config_help="YAML config (default: the config saved in the checkpoint)", example="eval.flip=true")
    p.add_argument("--checkpoint", required=True, help="bida checkpoint, e.g. runs/NAME/checkpoints/last.pt")
    p.add_argument("--out", help="directory for metrics.json (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--split", choices=("val", "test"), default="val",
                   help="target split: data.target.val_split (default) or data.target.test_split")

    p = sub.add_parser("predict", help="predict label maps and overlays for images or folders")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="bida checkpoint, e.g. runs/NAME/checkpoints/last.pt")
    which.add_argument("--model", help="model folder written by bida export --format folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders (walked recursively)")
    p.add_argument("--out", required=True,
                   help="output directory; folder inputs keep their relative paths under it")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    from .export_spec import FORMATS, ONNX_OPSET, OUTPUTS

    p = sub.add_parser(
        "export", help="export a trained network: ONNX graph, torch.export program or model folder",
        description=f"onnx: ONNX opset {ONNX_OPSET}, dynamic batch/height/width, uint8 RGB input (N, 3, H, W) "
                    "normalised inside the graph, logits (N, K, H, W) at the input size or class ids (N, H, W); "
                    "sliding windows and flip stay outside (bida.Segmenter.from_onnx runs them). pt2: the same "
                    "graph as a torch.export program. folder: model.safetensors, config.yaml, classes.json and a "
                    "README.md model card (bida.Segmenter.from_pretrained, bida predict --model).")
    p.add_argument("--checkpoint", required=True, help="bida checkpoint (runs/NAME/checkpoints/last.pt) or model folder")
    p.add_argument("--format", required=True, metavar="FORMAT", help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output file (onnx, pt2) or directory (folder)")
    p.add_argument("--output", default="logits", metavar="OUTPUT",
                   help=f"graph output: {' or '.join(OUTPUTS)} (default logits)")
    p.add_argument("--license", default="unknown", help="licence field of the model card (default: unknown)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no check figures printed")

    p = sub.add_parser("demo", help="source-only, self-training and BiDA on the embedded domain pair")
    p.add_argument("--out", default="runs/demo", help="demo directory (a fresh suffix is added if it exists)")
    p.add_argument("--resume", metavar="DIR",
                   help="finish an interrupted demo in DIR: train the missing runs, rebuild the table and report")
    p.add_argument("--reevaluate", action="store_true",
                   help="with --resume on a finished demo: evaluate every run again and rebuild the table and report")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (each with its own source-only model)")
    p.add_argument("--preset", choices=("paper", "plus"), default="paper", help="method preset of the BiDA row")
    p.add_argument("--arch", choices=("deeplab", "transformer"), default="deeplab",
                   help="deeplab: DeepLab-V2 with offline rounds (defaults.yaml); transformer: MiT-B0 with the "
                        "mean teacher, with and without MIC (configs/demo_transformer.yaml)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run messages")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=_OVERRIDES_HELP.replace("train.iters=200", "seed=3") + "; applied to every run")

    p = sub.add_parser("ablate", help="run the BiDA ablation grid and write a Markdown table")
    _add_config_args(p, example="seed=3")
    p.add_argument("--out", default="runs/ablation", help="ablation directory (a fresh suffix is added if it exists)")
    p.add_argument("--resume", metavar="DIR",
                   help="finish an interrupted ablation in DIR: train the missing rows, rebuild the table")
    p.add_argument("--reevaluate", action="store_true",
                   help="with --resume on a finished ablation: evaluate every run again and rebuild the table")
    p.add_argument("--init-checkpoint", help="source-only checkpoint shared by every row (trained if absent)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds (each with its own source-only model)")
    p.add_argument("--candidates", action="store_true", help="also run the candidate rows (contrast variants)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run messages")

    p = sub.add_parser("report", help="an HTML report comparing run directories (the first is the baseline)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories; the first is the baseline")
    p.add_argument("--out", required=True, help="report directory (index.html and figures/)")
    p.add_argument("--overwrite", action="store_true", help="replace the report in a non-empty directory")
    p.add_argument("--max-images", type=int, default=6, help="target validation images shown (best and worst)")

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    d = dsub.add_parser("check", help="check the configured datasets")
    _add_config_args(d, example="data.source.root=A")
    d.add_argument("--quick", action="store_true", help="read only a few files per split")

    p = sub.add_parser("check-data", help="alias of 'bida data check'")
    _add_config_args(p, example="data.source.root=A")
    p.add_argument("--quick", action="store_true", help="read only a few files per split")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may follow options in any order.

    argparse takes one run of positionals, so ``bida train --out D a=1 --quiet b=2`` would
    leave ``b=2`` unrecognised: such extra ``key=value`` words are appended to the overrides
    of commands that take them, in the order given. Anything else is still an error.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        looks_like_override = all("=" in e and not e.startswith("-") for e in extra)
        if not (looks_like_override and hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..engine.distributed import is_main_process
    from ..engine.train import default_run_dir, train

    if args.resume:
        if args.config or args.overrides:
            raise BidaError("--resume continues with the run's saved config; do not pass -c or overrides")
        train(None, Path(args.resume), resume=True, quiet=args.quiet)  # type: ignore[arg-type]
        return 0
    from ..method.presets import preset_overrides_for

    overrides = (preset_overrides_for(args.preset, args.config, args.overrides) + list(args.overrides)
                 + (["train.quiet=true"] if args.quiet else []))
    cfg = load_config(args.config, overrides)
    if not args.out and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # The default name holds the process id: every rank would choose another directory.
        raise BidaError("bida train under torchrun needs --out DIR: every rank must use the same run directory")
    out = Path(args.out) if args.out else default_run_dir(cfg)
    train(cfg, out, overwrite=args.overwrite)
    if is_main_process():  # once, not once per rank
        print(f"run directory: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config, target_test_split
    from ..data.datasets import build_eval_dataset, check_same_classes, resolve_domain
    from ..engine.inference import evaluate, majority_collapse, markdown_table, write_metrics
    from ..models.weights import ArchitectureError
    from .predict import model_from_checkpoint

    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.out and (Path(args.out) / "metrics.json").exists() and not args.overwrite:
        raise BidaError(f"{Path(args.out) / 'metrics.json'} already exists; use --overwrite to replace it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, names, _ = model_from_checkpoint(args.checkpoint, cfg, device, overrides=args.overrides)
    except ArchitectureError as err:
        if not args.config:
            raise
        raise ArchitectureError(f"{err}; leave out -c to evaluate with the checkpoint's own config") from None
    src, tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
    classes = check_same_classes(src, tgt)
    if model.num_classes != classes.num_classes:  # as train does: metrics of another class list are meaningless
        raise CheckpointError(f"checkpoint {args.checkpoint} was trained for {model.num_classes} classes, "
                              f"the config has {classes.num_classes}")
    split = target_test_split(cfg) if args.split == "test" else cfg.data.target.val_split
    if not split:
        raise BidaError(f"data.target.{args.split}_split is not set: nothing to evaluate")
    if args.out:  # before the evaluation, not after it
        from ..checkpoint import ensure_writable

        ensure_writable(Path(args.out))
    ds = build_eval_dataset(cfg, tgt, split)
    metrics = evaluate(model, ds, cfg.eval, classes.names, cfg.data.eval_classes, quiet=args.quiet,
                       ignore_index=classes.ignore_index, device=device, per_image=True)
    metrics["checkpoint"] = str(args.checkpoint)
    metrics["split"] = split
    print(markdown_table(metrics, f"target {split}"))
    if warn := majority_collapse(torch.tensor(metrics["confusion"]), classes.names, f"target {split}"):
        print(warn)
    if args.out:
        write_metrics(metrics, Path(args.out) / "metrics.json")
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    if args.model is not None and not Path(args.model).is_dir():
        raise CheckpointError(f"--model {args.model} is not a directory (a model folder of bida export --format "
                              "folder); use --checkpoint for a checkpoint file")
    written = predict(args.checkpoint or args.model, args.inputs, args.out, overwrite=args.overwrite, quiet=args.quiet)
    print(f"wrote {len(written)} predictions to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    result = export(args.checkpoint, args.format, args.out, output=args.output, overwrite=args.overwrite,
                    license=args.license, quiet=args.quiet)
    print(f"wrote {result['path']}")
    return 0


def _grid_resume_args(args: argparse.Namespace, fixed: dict) -> None:
    """``--resume DIR`` takes the recorded settings: refuse others given with it."""
    if args.reevaluate and not args.resume:
        raise BidaError("--reevaluate works with --resume DIR (evaluate a finished grid again)")
    if args.resume:
        given = [flag for flag, changed in fixed.items() if changed] + (["key=value overrides"] if args.overrides else [])
        if given:
            raise BidaError(f"--resume continues with the settings recorded in {args.resume}; "
                            f"do not pass {', '.join(given)}")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _grid_resume_args(args, {"--seeds": args.seeds != 1, "--preset": args.preset != "paper",
                             "--out": args.out != "runs/demo", "--arch": args.arch != "deeplab"})
    run_demo(Path(args.resume or args.out), overrides=args.overrides, quiet=args.quiet, seeds=args.seeds,
             preset=args.preset, resume=bool(args.resume), reevaluate=args.reevaluate, arch=args.arch)
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import run_ablation

    _grid_resume_args(args, {"-c": bool(args.config), "--seeds": args.seeds != 1, "--candidates": args.candidates,
                             "--init-checkpoint": bool(args.init_checkpoint), "--out": args.out != "runs/ablation"})
    run_ablation(args.config, Path(args.resume or args.out), overrides=args.overrides,
                 init_checkpoint=args.init_checkpoint, quiet=args.quiet, seeds=args.seeds,
                 candidates=args.candidates, resume=bool(args.resume), reevaluate=args.reevaluate)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from .report import write_report

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    page = write_report([Path(r) for r in args.runs], Path(args.out), max_images=args.max_images, device=device,
                        overwrite=args.overwrite)
    print(page)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..config import load_config, target_test_split
    from ..data.check import check_domain
    from ..data.datasets import check_same_classes, resolve_domain
    from ..errors import DataError

    cfg = load_config(args.config, args.overrides)
    ok = True
    domains = {}
    for which in ("source", "target"):
        dom_cfg = getattr(cfg.data, which)
        dom = domains[which] = resolve_domain(cfg, which)
        splits = {dom_cfg.train_split: which == "source"}
        if dom_cfg.val_split:
            splits[dom_cfg.val_split] = True
        if which == "target" and target_test_split(cfg):
            splits[target_test_split(cfg)] = True
        report = check_domain(dom.kind, dom.root, splits, num_classes=dom.classes.num_classes, full=not args.quick)
        report.domain = f"{dom_cfg.kind} {dom.root}"  # the configured kind (the embedded pair reads as folders)
        print(f"## {which}: {dom_cfg.kind} at {dom.root}\n")
        print(report.to_markdown())
        ok = ok and report.ok()
    try:  # bida train refuses a pair whose class lists differ: so does the check
        check_same_classes(domains["source"], domains["target"])
    except DataError as err:
        print(f"## source and target\n\n**Status:** 1 error(s)\n\n- {err}\n")
        ok = False
    if not ok:
        print("data check found errors", file=sys.stderr)
        return 1
    return 0


_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}




def _ignore_stop_signals() -> None:
    """The process is exiting after a stop: a second Ctrl-C must not turn the clean exit
    (code 130/143) into a traceback or a death by signal."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not in the main thread
            pass


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code. ``argv=None`` (the ``bida`` executable, ``python -m
    bida``): the process exits after it, so a stop leaves further stop signals ignored."""
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["launch"]:  # torchrun's own options follow: not parsed here
        from .launch import main as launch

        return launch(words[1:])
    args = parse_args(argv)
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export, "demo": cmd_demo,
                "ablate": cmd_ablate, "check-data": cmd_data_check, "report": cmd_report}
    try:
        if args.command == "data":
            return cmd_data_check(args)
        return handlers[args.command](args)
    except Interrupted as err:  # a clean stop, not bad input: 130 (SIGINT) or 143 (SIGTERM)
        if argv is None:
            _ignore_stop_signals()
        from ..engine.distributed import is_main_process

        if is_main_process():  # under torchrun: one message, from rank 0
            print(f"bida: {err}", file=sys.stderr)
        return 128 + err.signum
    except BidaError as err:
        print(f"bida: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _DISK_ERRNOS:
            raise
        # A full disk, a read-only or forbidden path in any writer (log, TensorBoard, pseudo
        # labels, predictions): the environment, not a bug, so one line and code 2.
        where = f" {err.filename}" if err.filename else ""
        print(f"bida: error: cannot write{where}: {err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if argv is None:
            _ignore_stop_signals()
        print("bida: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # pragma: no cover
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
