"""Runs under torchrun and in process groups: equal to one process, stopped on every rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.data.datasets import build_train_dataset, resolve_domain, train_loader
from bida.engine import distributed
from bida.engine.distributed import DistContext, init_from_env
from bida.engine.train import train
from bida.method.train_step import adapt_step, source_step
from bida.models import build_model
from bida.pseudo_labels import Calibration
from bida.tools.cli import main
from helpers import WORLD, _assert_same_states, _env, _free_port, _spawn_teacher, _teacher_run, _wait_for, hrda_run_overrides

pytestmark = pytest.mark.slow


BATCH = 2  # per rank; the single process takes WORLD * BATCH

ITERS = 3

STATIC_SHARE = 0.4  # share of target pixels given a static pseudo label (the rest: 255)


def _static_labels(labels: torch.Tensor, step: int) -> torch.Tensor:
    """Round labels y_F stand-in: the true labels on a fixed random share of pixels."""
    keep = torch.rand(labels.shape, generator=torch.Generator().manual_seed(100 + step)) < STATIC_SHARE
    return torch.where(keep, labels, torch.full_like(labels, 255))


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _run_iterations(rank: int, world: int, overrides: list[str], out: str, port: int = 0) -> None:
    """One source step and ITERS BiDA iterations; rank ``rank`` of ``world`` takes its slice.

    No optimizer step: the weights stay identical in every process, so that every iteration
    compares the same computation (after SGD steps, last-bit differences of the weights
    could move a label-transfer confidence across its threshold). The gradients, which
    DDP averages over ranks, are compared instead; the calibration state evolves.
    """
    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BIDA_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)
    ctx = init_from_env() if world > 1 else DistContext()
    try:
        cfg = load_config(None, overrides)
        src, tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
        num_classes = src.classes.num_classes
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, num_classes, cfg.method.feature)
        model.train()
        calibration = Calibration(num_classes, model.feature_dim, momentum=cfg.calibration.momentum,
                                  ramp_iters=cfg.calibration.ramp_iters)
        global_batch = BATCH * WORLD
        part = slice(rank * BATCH * WORLD // world, (rank + 1) * BATCH * WORLD // world)
        loaders, own = {}, {}
        for name, dom, seed in (("src", src, cfg.seed), ("tgt", tgt, cfg.seed + 1)):
            ds = build_train_dataset(cfg, dom, "train", require_labels=True)
            loaders[name] = train_loader(ds, global_batch, seed, 0, 0)
            own[name] = train_loader(ds, global_batch // world, seed, 0, 0, rank, world)

        def batches(step: int) -> tuple[dict, dict]:
            batch_src, batch_tgt = next(loaders["src"]), next(loaders["tgt"])
            batch_tgt["label"] = _static_labels(batch_tgt["label"], step)
            mine_src, mine_tgt = next(own["src"]), next(own["tgt"])
            # The sampler's promise: a rank's own loader yields its slice of the global batch.
            assert torch.equal(mine_src["image"], batch_src["image"][part])
            assert torch.equal(mine_tgt["image"], batch_tgt["image"][part])
            return {k: v[part] for k, v in batch_src.items()}, {k: v[part] for k, v in batch_tgt.items()}

        records = []
        # A source-stage step (CE over the global batch's labelled pixels), then BiDA rounds;
        # a new DDP wrapper per phase, as the trainer makes.
        batch_src, _ = batches(-1)
        ddp = ctx.wrap(model, uses_features=False)  # held until backward: DDP syncs in its hooks
        result = source_step(ddp, batch_src, cfg, reduce_sums=ctx.prototype_reducer(num_classes))
        result.loss.backward()
        records.append({"logs": ctx.mean_logs(result.logs), "calibration": calibration.state_dict(),
                        "grads": _gradients(model)})
        ddp = ctx.wrap(model)
        for step in range(ITERS):
            batch_src, batch_tgt = batches(step)
            model.zero_grad(set_to_none=True)
            result = adapt_step(ddp, batch_src, batch_tgt, cfg, calibration, num_classes,
                                reduce_sums=ctx.prototype_reducer(num_classes))
            result.loss.backward()
            records.append({"logs": ctx.mean_logs(result.logs), "calibration": calibration.state_dict(),
                            "grads": _gradients(model)})
        torch.save(records, Path(out) / f"rank{rank}-of-{world}.pt")
    finally:
        distributed.shutdown()


# Default BiDA (batch prototypes, feature resolution, shared stem, ASPP-branch features), and
# every alternative at once (the official code's pair scope, label-resolution contrast and
# separate target stem; the projection-head feature; fused labels for the target CE).
VARIANTS = {
    "default": [],
    "alternatives": ["method.prototype_scope=pair", "loss.contrast_resolution=label", "model.separate_target_stem=true",
                     "method.feature=backbone", "pseudo.dynamic_for_segmentation=true"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path, tiny_overrides, variant):
    overrides = tiny_overrides + ["method=bida", "model.freeze_bn=true", "calibration.ramp_iters=2",
                                  "pseudo.transfer_threshold=0.2"] + VARIANTS[variant]
    load_config(None, overrides)  # fail here, not in a child, on a bad override
    resolve_domain(load_config(None, overrides), "source")  # build the synthetic cache once
    mp.spawn(_run_iterations, args=(WORLD, overrides, str(tmp_path), _free_port()), nprocs=WORLD, join=True)
    _run_iterations(0, 1, overrides, str(tmp_path))
    single = torch.load(tmp_path / "rank0-of-1.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}-of-{WORLD}.pt", weights_only=True) for r in range(WORLD)]

    for step, ref in enumerate(single):
        for got in (run[step] for run in ranks):
            assert set(got["logs"]) == set(ref["logs"])
            for key in ref["logs"]:
                assert got["logs"][key] == pytest.approx(ref["logs"][key], rel=1e-4, abs=1e-6), (step, key)
            # The EMAs start at the batch prototypes: the global prototypes of every step.
            for domain in ("source", "target"):
                mem, mem_ref = got["calibration"][domain], ref["calibration"][domain]
                assert torch.equal(mem["initialized"], mem_ref["initialized"]), (step, domain)
                torch.testing.assert_close(mem["value"], mem_ref["value"], rtol=1e-4, atol=1e-5)
            assert got["grads"].keys() == ref["grads"].keys()
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-3, atol=1e-6, msg=f"{step} {name}")
    logs = [record["logs"] for record in single[1:]]  # the BiDA iterations
    assert {"loss/contrast_t2s", "loss/contrast_s2t", "loss/seg_tgt"} <= set(logs[-1])
    # Nothing trivially zero: contrast, and label transfer labelling some but not all pixels.
    assert all(log["loss/contrast_t2s"] > 0 and log["loss/contrast_s2t"] > 0 for log in logs)
    assert any(0 < log["pseudo/dynamic_coverage"] < 1 for log in logs), logs
    assert all(log["calibration/mean_shift"] > 0 for log in logs[1:])


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def test_torchrun_two_processes_end_to_end(tmp_path, tiny_overrides):
    # From a shared source-only checkpoint with frozen BN, a BiDA round (rank 0's pseudo
    # labels, training, sharded evaluation) must log what one process with the global batch
    # logs. (Through a source stage, the last-bit differences of the weights can move a
    # pseudo-label threshold past a tied pixel; the source stage's step is covered above.)
    init = tmp_path / "source"
    train(load_config(None, tiny_overrides + ["method=source_only", "train.iters=2", "model.freeze_bn=true"]), init)
    overrides = tiny_overrides + ["method=bida", "train.rounds=1", "model.freeze_bn=true",
                                  f"model.init_checkpoint={init / 'checkpoints' / 'last.pt'}"]
    run, single = tmp_path / "run", tmp_path / "single"
    cmd = _torchrun() + ["--standalone", "--nproc_per_node=2", "-m", "bida", "train", *overrides,
                         "--out", str(run), "--quiet"]
    env = dict(os.environ, BIDA_DIST_TIMEOUT_S="120", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "metrics.json").is_file()
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer

    # The same config in one process: train.batch_size is the global batch (2 ranks x 1 image
    # each here), and the ranks' slices are those of one process's batches.
    assert load_config(None, overrides).train.batch_size == 2
    train(load_config(None, overrides), single)
    labels = sorted((single / "pseudo_labels" / "round_0").glob("*.png"))
    assert labels and all(f.read_bytes() == (run / f.relative_to(single)).read_bytes() for f in labels)
    records = {name: [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
               for name, d in (("ddp", run), ("single", single))}
    # One writer (rank 0): every training step logged exactly once (a second writer would repeat it).
    steps = [r["step"] for r in records["ddp"] if "phase" in r]
    assert steps == list(range(1, 4 + 1))  # one round of train.iters_per_round
    for got, ref in zip(*(([r for r in records[k] if "phase" in r]) for k in ("ddp", "single"))):
        # pseudo/dynamic_acc: the mean of the ranks' accuracies, not the global batch's.
        for key in (k for k in ref if k.startswith(("loss/", "pseudo/", "calibration/")) and k != "pseudo/dynamic_acc"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (ref["step"], key)
    metrics = {k: json.loads((d / "metrics.json").read_text()) for k, d in (("ddp", run), ("single", single))}
    assert metrics["ddp"]["confusion"] == metrics["single"]["confusion"]


# Rare-class sampling, ClassMix, MIC and BiDA's terms on; train.batch_size is the global batch.
TEACHER = ["method=bida", "train.schedule=teacher", "train.batch_size=4", "train.optimizer=adamw", "train.lr=6e-4",
           "data.rare_class_sampling=true", "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8",
           "pseudo.teacher_threshold=0.07", "train.checkpoint_every=1000"]  # 0.07: tiny models are unsure

MIT = ["model.backbone=mit_b0", "method.feature=decoder", "model.width=0.25", "model.decoder_dim=32",
       "model.proj_dim=16", "model.drop_path=0.3", "data.normalize=imagenet"]


def _teacher_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"phase": "teacher"' in line]


# DAFormer's switches that frozen BN allows (train.teacher_bn=batch needs trainable BN): the crop
# bands, the global batch's ClassMix candidates, all-pixel CE means (counts of every pixel on
# every rank), separate forwards.
DAFORMER = ["pseudo.ignore_top=3", "pseudo.ignore_bottom=5", "train.mix_classes=batch", "loss.source_ce_mean=all",
            "loss.pseudo_ce_mean=all", "train.student_forwards=separate"]


@pytest.mark.parametrize("extra", [[], DAFORMER, ["method.target_features=mixed"]],
                         ids=["defaults", "daformer_switches", "mixed_target_features"])
def test_teacher_two_ranks_give_the_step_0_loss_of_one_process_on_the_global_batch(tmp_path, tiny_overrides, extra):
    # Frozen BN (DeepLab): no per-rank batch statistics, so the first step's losses must be those
    # of one process on the whole global batch: same images and crops, ClassMix masks, colour
    # jitter and MIC masks, quality weight, BiDA prototypes and per-pixel means.
    # The ImageNet feature distance too: "ImageNet" weights (any weight file of the architecture)
    # for the frozen copy, and a student that starts elsewhere (from a source-only checkpoint).
    from bida.models import build_model as build_deeplab

    weights = tmp_path / "imagenet.pth"
    torch.save(build_deeplab(load_config(None, tiny_overrides).model, 19).state_dict(), weights)
    base = tiny_overrides + ["model.freeze_bn=true"]
    train(load_config(None, base + ["method=source_only", "train.iters=1"]), tmp_path / "source")
    # (teacher_threshold 0.2: some but not all of this student's target pixels pass it)
    overrides = base + TEACHER + ["train.iters=2", "pseudo.teacher_threshold=0.2", f"model.pretrained={weights}",
                                  "loss.feature_distance_weight=0.005",
                                  f"model.init_checkpoint={tmp_path / 'source' / 'checkpoints' / 'last.pt'}"] + extra
    ranks = _spawn_teacher(overrides, tmp_path / "ddp", "ddp")
    _assert_same_states(ranks[0], ranks[1], "rank 0 vs rank 1")
    run, single = tmp_path / "ddp", tmp_path / "single"
    _teacher_run(0, 1, overrides, str(single), "single")
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer
    got, ref = _teacher_records(run), _teacher_records(single)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2]
    # teacher_acc, dynamic_acc: the mean of the ranks' accuracies, not the global batch's.
    keys = [k for k in ref[0] if k.startswith(("loss/", "pseudo/", "calibration/")) and not k.endswith("_acc")]
    assert {"loss/seg_src", "loss/seg_mix", "loss/mic", "loss/contrast_t2s", "loss/feature_distance",
            "pseudo/teacher_quality"} <= set(keys)
    assert 0 < ref[0]["pseudo/teacher_quality"] < 1 and ref[0]["loss/feature_distance"] > 0
    for key in keys:
        assert got[0][key] == pytest.approx(ref[0][key], rel=1e-5, abs=1e-7), key


def test_teacher_under_two_ranks_stays_identical_on_every_rank_and_resumes_exactly(tmp_path, tiny_overrides):
    # MiT with drop path and a trainable BatchNorm in its decoder, synchronised (model.sync_bn),
    # also in the EMA teacher (train.teacher_bn: batch) and in DAFormer's separate student
    # forwards. After a few steps, the student and the teacher must be bit-identical on both
    # ranks; a run stopped mid-phase and resumed with 2 ranks must end bit-identical to the
    # uninterrupted one.
    overrides = tiny_overrides + TEACHER + MIT + ["train.iters=4", "train.teacher_bn=batch",
                                                  "train.student_forwards=separate"]
    resolve_domain(load_config(None, overrides), "source")
    full = _spawn_teacher(overrides, tmp_path / "full", "full")
    _assert_same_states(full[0], full[1], "rank 0 vs rank 1")
    assert any("running_mean" in k for k in full[0]["student"]) and full[0]["sync_bn"] > 0
    part = _spawn_teacher(overrides, tmp_path / "part", "stopped", stop_after=2)
    stopped = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert stopped["iter"] == 2
    # Each rank draws its own drop-path masks (as one process does for the images of its batch):
    # the checkpoint holds every rank's generator, and the resume below needs rank 1's.
    assert len(stopped["rng_ranks"]) == 2 and torch.equal(stopped["rng_ranks"][0]["torch"], stopped["rng"]["torch"])
    assert not torch.equal(stopped["rng_ranks"][0]["torch"], stopped["rng_ranks"][1]["torch"])
    assert not any(torch.equal(part[0]["teacher"][k], full[0]["teacher"][k])
                   for k in full[0]["teacher"] if k.endswith("running_mean"))
    resumed = _spawn_teacher(overrides, tmp_path / "part", "resumed", resume=True)
    _assert_same_states(resumed[0], resumed[1], "resumed: rank 0 vs rank 1")
    assert resumed[0]["sync_bn"] == full[0]["sync_bn"]
    _assert_same_states(resumed[0], full[0], "resumed vs uninterrupted")
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["mean_teacher"]["teacher"]["model"][k], b["mean_teacher"]["teacher"]["model"][k])
               for k in a["mean_teacher"]["teacher"]["model"])


DEMO_TRANSFORMER = Path(__file__).resolve().parents[2] / "configs" / "demo_transformer.yaml"


def test_sync_bn_two_ranks_give_the_losses_and_batchnorm_statistics_of_one_process(tmp_path, synthetic_cache):
    # configs/demo_transformer.yaml (MiT-B0 + SegFormer head: its BatchNorm trains), shrunk in
    # sizes and lengths as tests/e2e/test_configs.py does, with the demo's adaptation run on (bida,
    # + MIC): a source step (DDP), then two teacher steps with DAFormer's separate student
    # forwards and an EMA teacher labelling with batch statistics. train.batch_size 2: one
    # image per rank. No stochastic depth and no head dropout: each rank draws its own masks.
    # With per-rank BatchNorm statistics (model.sync_bn=false) the first loss already differs
    # (2.943470 vs one process's 2.943373, 3e-5 relative; the teacher steps by up to 100 %);
    # synchronised, 2 ranks give one process's numbers (measured: 3e-7). The warm-up keeps the
    # first updates tiny, so later steps compare the same computation too.
    import yaml
    from helpers import _domain_overrides, shrink

    raw = yaml.safe_load(DEMO_TRANSFORMER.read_text())
    overrides = (_domain_overrides(raw, tmp_path / "data", synthetic_cache) + shrink(raw) + [
        "method=bida", "mic.weight=1", "train.source_iters=1", "train.iters=2", "model.drop_path=0",
        "train.student_forwards=separate", "train.teacher_bn=batch", "eval.max_images=1",
        "pseudo.teacher_threshold=0.055"])  # 19 classes: a barely trained teacher is unsure
    cfg = load_config(DEMO_TRANSFORMER, overrides)
    assert cfg.train.batch_size == 2 and cfg.model.sync_bn and not cfg.model.freeze_bn
    ranks = _spawn_teacher(overrides, tmp_path / "ddp", "ddp", head_dropout=False, config=str(DEMO_TRANSFORMER))
    _teacher_run(0, 1, overrides, str(tmp_path / "single"), "single", head_dropout=False, config=str(DEMO_TRANSFORMER))
    single = torch.load(tmp_path / "single-rank0.pt", weights_only=True)
    assert ranks[0]["sync_bn"] > 0 and single["sync_bn"] == 0  # one process: plain BatchNorm2d
    _assert_same_states(ranks[0], ranks[1], "rank 0 vs rank 1")  # the global batch's statistics everywhere
    records = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                      if '"phase"' in line] for name in ("ddp", "single")}
    assert [r["step"] for r in records["ddp"]] == [r["step"] for r in records["single"]] == [1, 2, 3]
    for got, ref in zip(records["ddp"], records["single"]):
        # *_acc: the mean of the ranks' accuracies, not the global batch's.
        keys = [k for k in ref if k.startswith(("loss/", "pseudo/", "calibration/")) and not k.endswith("_acc")]
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ref["step"], key)
    # Nothing trivial: the teacher passes some but not all pixels, so MIC and the contrasts weigh in.
    first = records["single"][1]
    assert 0 < first["pseudo/teacher_quality"] < 1 and first["loss/mic"] > 0 and first["loss/contrast_t2s"] > 0
    # BatchNorm running statistics of the student and of the EMA teacher after the steps.
    for part in ("student", "teacher"):
        stats = [k for k in single[part] if k.endswith(("running_mean", "running_var"))]
        assert stats and single[part].keys() == ranks[0][part].keys()
        for key in stats:
            torch.testing.assert_close(ranks[0][part][key], single[part][key], rtol=1e-5, atol=1e-6,
                                       msg=f"{part}.{key}")
    # A checkpoint of 2 ranks is one of 1 process: the same keys, loaded strictly.
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("ddp", "single"))
    assert a["model"].keys() == b["model"].keys()
    num_classes = len(json.loads((tmp_path / "single" / "run.json").read_text())["classes"])
    build_model(cfg.model, num_classes, cfg.method.feature).load_state_dict(a["model"])


def test_hrda_teacher_on_two_ranks_gives_the_losses_of_one_process(tmp_path, synthetic_cache):
    """BiDA + MIC under HRDA, global batch 2 (one image per rank): every detail crop, mix and
    mask is drawn by global sample index and the BatchNorms see the global batch, so two
    ranks log one process's losses (head dropout and drop path off: each rank draws its own)."""
    import json

    from helpers import _assert_same_states, _spawn_teacher, _teacher_run

    overrides = hrda_run_overrides(synthetic_cache) + [
        "method=bida", "mic.weight=1", "mic.block_size=16", "train.iters=2", "model.drop_path=0",
        "pseudo.teacher_threshold=0.1", "train.batch_size=2", "train.checkpoint_every=1000"]
    ranks = _spawn_teacher(overrides, tmp_path / "ddp", "ddp", head_dropout=False)
    _teacher_run(0, 1, overrides, str(tmp_path / "single"), "single", head_dropout=False)
    _assert_same_states(ranks[0], ranks[1], "rank 0 vs rank 1")
    records = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                      if '"teacher"' in line] for name in ("ddp", "single")}
    assert [r["step"] for r in records["ddp"]] == [r["step"] for r in records["single"]] == [1, 2]
    for got, ref in zip(records["ddp"], records["single"]):
        keys = [k for k in ref if k.startswith(("loss/", "pseudo/")) and not k.endswith("_acc")]
        assert "loss/hrda_detail" in keys and "loss/mic" in keys
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ref["step"], key)


def _records(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _ranks(args: list[str], env: dict) -> list[subprocess.Popen]:
    """``python -m bida ...`` as the ranks of a 2-process gloo job (what torchrun starts)."""
    from helpers import _free_port

    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "bida", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(WORLD),
                                                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(WORLD)]


def _finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


# The mean-teacher schedule with everything that carries state on: rare-class sampling,
# ClassMix, MIC and BiDA's terms; train.batch_size is its global batch.
TEACHER_STOP_PATHS = ["method=bida", "train.schedule=teacher", "train.batch_size=4", "data.rare_class_sampling=true",
           "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8"]


STOP_CASES = {  # where rank 1 alone gets SIGTERM: (overrides, hook, what shows the place was reached)
    "step": (["train.iters=30"], None, lambda run, tmp: len([r for r in _records(run) if "loss/seg_src" in r]) >= 2),
    "teacher step": ([*TEACHER_STOP_PATHS, "train.iters=30"], None,
                     lambda run, tmp: len([r for r in _records(run) if "loss/seg_mix" in r]) >= 2),
    "pseudo-labels": (["method=self_training", "train.iters=2", "train.rounds=1", "train.iters_per_round=2"],
                      "engine.round_labels:predict_probs:slow", lambda run, tmp: (tmp / "started-rank0").exists()),
    "evaluation": (["train.iters=4", "train.eval_every=2"], "engine.inference:predict_probs:slow",
                   lambda run, tmp: (tmp / "started-rank1").exists()),
}


# A known fault: stopped inside the pseudo-label pass, one rank occasionally aborts at interpreter
# exit ("terminate called without an active exception", exit -6 instead of 143) after the stop
# message and a complete checkpoint; seen in 2 of 4 full-suite runs, never alone. Kept running
# (an unexpected pass is reported); named in docs/reliability.md until its cause is found.
PSEUDO_LABEL_EXIT = pytest.mark.xfail(reason="a rank may abort at exit after a stop in the pseudo-label pass",
                                      strict=False)


@pytest.mark.parametrize("case", [pytest.param(c, marks=PSEUDO_LABEL_EXIT) if c == "pseudo-labels" else c
                                  for c in sorted(STOP_CASES)])
def test_sigterm_to_one_rank_stops_every_rank_with_one_checkpoint(tmp_path, tiny_overrides, case):
    # before: the other rank waited in its next collective until BIDA_DIST_TIMEOUT_S (30 min)
    # and both died with gloo tracebacks; in the pseudo-label pass rank 1 could not even
    # run its handler (it waited in a barrier)
    overrides, hook, reached = STOP_CASES[case]
    run = tmp_path / "run"
    procs = _ranks(["train", *tiny_overrides, *overrides, "train.checkpoint_every=1000", "--out", str(run)],
                   _env(tmp_path, hook))
    _wait_for(lambda: reached(run, tmp_path), procs, what=case)
    os.kill(procs[1].pid, signal.SIGTERM)
    t0 = time.monotonic()
    (code0, err0), (code1, err1) = _finish(procs, timeout=60)
    assert time.monotonic() - t0 < 30, "the stop did not reach rank 0 within seconds"
    assert (code0, code1) == (143, 143), (err0[-3000:], err1[-3000:])
    assert "Traceback" not in err0 + err1
    stopped = [line for line in (err0 + err1).splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and stopped[0] in err0 and f"--resume {run}" in stopped[0], err0 + err1  # rank 0 only
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert f"at step {state['step']} " in stopped[0]
    steps = [r["step"] for r in _records(run) if "loss/seg_src" in r or "loss/total" in r]
    assert state["step"] == max(steps, default=0)  # nothing done since the last step is lost
    if case == "evaluation":
        assert state["pending_eval"]
    assert main(["train", "--resume", str(run)]) == 0  # in one process here: the checkpoint is complete
    assert (run / "metrics.json").is_file()


def test_a_non_finite_teacher_step_on_one_rank_is_skipped_on_every_rank(tmp_path, tiny_overrides):
    # Rank 1's second step has a NaN loss: both ranks must skip it together (the gradient
    # all-reduce would otherwise spread the NaN, or one rank step while the other does not),
    # and the run go on to the end with one skipped step logged once.
    run = tmp_path / "run"
    args = ["train", *tiny_overrides, *TEACHER_STOP_PATHS, "train.iters=3", "--out", str(run)]
    (code0, err0), (code1, err1) = _finish(_ranks(args, _env(tmp_path, "method.teacher:teacher_step:nan")), timeout=240)
    assert (code0, code1) == (0, 0), (err0[-3000:], err1[-3000:])
    skipped = [r for r in _records(run) if "numerics/skipped_step" in r]
    assert [r["step"] for r in skipped] == [1]  # after step 1, the second step's batch was dropped
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (state["step"], state["data_pos"]) == (3, 4)
    assert state["mean_teacher"]["teacher"]["updates"] == 3  # the skipped step left the teacher alone
    assert (run / "metrics.json").is_file()


def test_every_rank_evaluates_the_batchnorm_statistics_the_checkpoint_holds(tmp_path, tiny_overrides):
    # before: each rank evaluated its shard with its own running statistics and rank 0 saved
    # its own: evaluating the checkpoint again (as after a stop inside an evaluation) gave
    # another confusion matrix, so best-checkpoint selection could change on resume.
    # Per-rank statistics (model.sync_bn=false), averaged before evaluations and checkpoints;
    # synchronised BatchNorm has equal statistics on every rank anyway.
    run = tmp_path / "run"
    args = ["train", *tiny_overrides, "model.freeze_bn=false", "model.sync_bn=false", "train.iters=3", "--out", str(run)]
    (code0, err0), (code1, err1) = _finish(_ranks(args, _env(tmp_path)), timeout=240)
    assert (code0, code1) == (0, 0), (err0[-3000:], err1[-3000:])
    assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--out", str(tmp_path / "again"),
                 "--quiet"]) == 0
    during, again = (json.loads((d / "metrics.json").read_text()) for d in (run, tmp_path / "again"))
    assert during["confusion"] == again["confusion"]
    assert during["per_class_iou"] == again["per_class_iou"]
