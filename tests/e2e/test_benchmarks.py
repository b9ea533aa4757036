"""The benchmark scripts run (``--smoke``: CPU, tiny shapes) and feed the summary table.

No figure is asserted: timings on a shared CPU say nothing. The GPU run is
``benchmarks/gpu.sh``; these tests keep every part of it runnable without a GPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_step
    import memory
    import method_extras
    import summary
    import teacher_step
    import train_loop

    return gpu_step, method_extras, train_loop, summary, teacher_step, memory


@pytest.mark.slow
def test_smoke_runs_of_every_gpu_script_make_one_table(tmp_path, bench, capsys, synthetic_cache):
    gpu_step, method_extras, train_loop, summary, teacher_step, memory = bench
    rows = gpu_step.main(["--smoke", "--precisions", "fp32", "--compile", "--json", str(tmp_path / "step.json")])
    assert {(r["format"], r["method"]) for r in rows} == {(f, m) for f in ("contiguous", "contiguous compiled")
                                                          for m in ("self_training", "bida")}
    assert all(r["tflops"] > 0 and r["pct_peak"] is None for r in rows)  # FLOPs counted; no peak for a CPU
    extras = method_extras.main(["--smoke", "--json", str(tmp_path / "extras.json")])
    assert set(extras[8]) == {"eager", "compiled", "naive"}
    figures = train_loop.main(["--smoke", "--cache", str(synthetic_cache), "--json", str(tmp_path / "loop.json")])
    for key in ("step_s", "data_s", "benchmark_step_s", "pseudo_label_images_per_s", "eval_whole_images_per_s",
                "eval_slide_images_per_s"):
        assert figures[key] >= 0, key
    assert json.loads((tmp_path / "loop.json").read_text())["records"] >= 1
    teacher = teacher_step.main(["--smoke", "--precisions", "fp32", "--json", str(tmp_path / "teacher.json")])
    assert [r["method"] for r in teacher] == ["self_training", "bida", "bida_mixed", "self_training+mic", "bida+mic",
                                              "bida_mixed+mic"]
    assert teacher_step.method_config("bida_mixed+mic", teacher_step.argparse.Namespace(
        size=64, backbone="mit_b0", width=0.25, decoder_dim=32)).method.target_features == "mixed"
    assert all(r["step_ms"] > 0 and r["base"] == "self_training" for r in teacher)
    assert teacher_step.method_config("bida+mic", teacher_step.argparse.Namespace(
        size=512, backbone="mit_b5", width=1.0, decoder_dim=256, grad_checkpoint=True)).mic.block_size == 64
    capsys.readouterr()
    peaks = memory.main(["--smoke", "--json", str(tmp_path / "memory.json")])
    assert [(r["method"], r["grad_checkpoint"]) for r in peaks] == [("self_training", False), ("self_training", True)]
    assert all(r["approximate"] and r["peak_gib"] >= 0 for r in peaks)  # CPU: resident memory, no figure asserted
    printed = capsys.readouterr().out
    assert "self_training |           false |" in printed and "self_training |            true |" in printed
    vit = memory.main(["--smoke", "--backbone", "dinov2_vits14", "--width", "0.125", "--json", str(tmp_path / "memory_vit.json")])
    assert [(r["method"], r["grad_checkpoint"]) for r in vit] == [("self_training", False), ("self_training", True)]
    assert json.loads((tmp_path / "memory_vit.json").read_text())["backbone"] == "dinov2_vits14"
    capsys.readouterr()
    hrda = teacher_step.main(["--smoke", "--hrda", "--precisions", "fp32", "--methods", "self_training",
                              "bida+mic", "--json", str(tmp_path / "teacher_hrda.json")])
    assert [r["method"] for r in hrda] == ["self_training", "bida+mic"] and all(r["step_ms"] > 0 for r in hrda)
    mic_hrda = teacher_step.method_config("bida+mic", teacher_step.argparse.Namespace(
        size=1024, backbone="mit_b5", width=1.0, decoder_dim=256, grad_checkpoint=False, hrda=True))
    assert mic_hrda.model.hrda.enabled and mic_hrda.model.hrda.detail_crop == (512, 512)
    assert mic_hrda.mic.block_size == 64  # MIC(HRDA): 64 at the full-resolution 1024 crop
    peaks = memory.main(["--smoke", "--hrda", "--methods", "bida+mic", "--json", str(tmp_path / "memory_hrda.json")])
    assert [(r["method"], r["grad_checkpoint"]) for r in peaks] == [("bida+mic", False), ("bida+mic", True)]
    capsys.readouterr()
    summary.main([str(tmp_path)])
    table = capsys.readouterr().out
    for line in ("step fp32 contiguous bida", "compiled bf16 bida", "extras D=8", "trainer / benchmark",
                 "evaluation slide", "teacher step mit_b0 fp32 bida+mic", "/ self_training", "memory mit_b0 fp32 self_training grad_checkpoint",
                 "memory dinov2_vits14 fp32 self_training grad_checkpoint", "teacher step mit_b0 hrda fp32 bida+mic",
                 "memory mit_b0 hrda fp32 bida+mic grad_checkpoint"):
        assert line in table, line
    assert "| step fp32 contiguous bida " in table and "n/a ms" not in table.split("compiled bf16")[0]


def test_peak_table_knows_the_lent_devices(bench):
    gpu_step = bench[0]
    assert gpu_step.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert gpu_step.peak_tflops("NVIDIA H100 PCIe", "fp32") == 378.0
    assert gpu_step.peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert gpu_step.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert gpu_step.peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None
    assert sys.modules["summary"]._fmt(None) == "n/a"


@pytest.mark.slow
def test_contrast_designs_grid_runs_the_rows_of_its_path_and_resumes(tmp_path, monkeypatch, tiny_overrides, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import contrast_designs

    over = [*tiny_overrides, "train.iters=2", "train.rounds=1", "train.iters_per_round=2", "model.proj_dim=8"]
    out = tmp_path / "designs"
    assert contrast_designs.main(["--arch", "deeplab", "--seeds", "1", "--out", str(out), *over]) == 0
    summary = json.loads((out / "designs.json").read_text())
    rows = [k for k in summary if k not in ("environment", "timing")]
    assert rows == ["source_only", "self_training", "bida_paper", "bida_plus",
                    "cand: preset plus + trained backbone head",
                    "cand: preset plus + contrast warm-up 100"]  # no MiT-only design
    for row in rows[1:]:
        assert "val" in summary[row] and "test" in summary[row]
    text = (out / "designs.md").read_text()
    assert "## Target test" in text and "## Target val" in text
    assert "method.pretrain_head=true" not in (out / "seed_0" / "bida_plus" / "config.yaml").read_text()
    assert "pretrain_head: true" in (out / "seed_0" / "source_only" / "config.yaml").read_text()
    capsys.readouterr()
    assert contrast_designs.main(["--resume", str(out)]) == 0  # every run finished: read back
    assert capsys.readouterr().out.count("finished earlier") == len(rows)


@pytest.mark.slow
def test_contrast_designs_grid_measures_the_chosen_designs(tmp_path, monkeypatch, tiny_overrides, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import contrast_designs

    with pytest.raises(ValueError, match="--design: unknown"):
        contrast_designs.main(["--out", str(tmp_path / "bad"), "--design", "centred features", *tiny_overrides])
    assert not (tmp_path / "bad").exists()
    rows = contrast_designs.design_rows(None, list(tiny_overrides), ["contrast warm-up 100"])
    assert [n for n, _ in rows] == ["source_only", "self_training", "bida_paper", "bida_plus",
                                    "cand: preset plus + contrast warm-up 100"]
    mit = str(contrast_designs.DEMO_ARCHS["transformer"])
    rows = contrast_designs.design_rows(mit, [], ["paper + trained head"], bida_baselines=False)
    assert rows[-1] == ("cand: paper + trained head", ("method=bida", "method.pretrain_head=true"))
    rows = contrast_designs.design_rows(None, list(tiny_overrides), ["trained backbone head"], bida_baselines=False)
    assert [n for n, _ in rows] == ["source_only", "self_training", "cand: preset plus + trained backbone head"]
    over = [*tiny_overrides, "train.iters=2", "train.rounds=1", "train.iters_per_round=2"]
    out = tmp_path / "d"
    assert contrast_designs.main(["--seeds", "1", "--out", str(out), "--design", "contrast warm-up 100", *over]) == 0
    assert json.loads((out / "grid.json").read_text())["designs"] == ["contrast warm-up 100"]
    assert contrast_designs.main(["--resume", str(out)]) == 0  # the resumed grid keeps the subset
    assert [k for k in json.loads((out / "designs.json").read_text()) if k.startswith("cand")] == \
        ["cand: preset plus + contrast warm-up 100"]


def test_target_features_grid_pairs_mixed_with_unmixed_and_resumes(tmp_path, monkeypatch, tiny_overrides, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    import target_features

    over = [*tiny_overrides, "train.iters=2", "train.source_iters=2", "train.warmup_iters=1", "data.rcs_min_pixels=2", "model.decoder_dim=16",
            "model.proj_dim=8"]
    out = tmp_path / "tf"
    assert target_features.main(["--seeds", "1", "--out", str(out), *over]) == 0
    summary = json.loads((out / "target_features.json").read_text())
    assert [k for k in summary if k not in ("environment", "timing")] == [
        "source_only", "bida", "bida_mixed", "bida_plus", "bida_plus_mixed", "self_training"]
    for name, other in (("bida_mixed", "bida"), ("bida_plus_mixed", "bida_plus")):
        vs = summary[name]["test"][f"vs_{other}"]
        assert vs["per_seed"] == [pytest.approx(summary[name]["test"]["per_seed"][0]
                                                - summary[other]["test"]["per_seed"][0])]
    configs = {row: (out / "seed_0" / row / "config.yaml").read_text() for row in ("bida", "bida_mixed", "bida_plus_mixed")}
    assert "target_features: unmixed" in configs["bida"] and "target_features: mixed" in configs["bida_mixed"]
    assert "pretrain_head: true" in configs["bida_plus_mixed"] and "target_features: mixed" in configs["bida_plus_mixed"]
    text = (out / "target_features.md").read_text()
    assert "## Target test" in text and "| bida_mixed - bida |" in text
    capsys.readouterr()
    assert target_features.main(["--resume", str(out)]) == 0  # every run finished: read back
    assert capsys.readouterr().out.count("finished earlier") == 6
    # The quicker pairing: two rows, every seed from one source-only model.
    init = out / "seed_0" / "source_only" / "checkpoints" / "last.pt"
    quick = tmp_path / "quick"
    assert target_features.main(["--seeds", "2", "--out", str(quick), "--rows", "bida", "bida_mixed",
                                 "--init-checkpoint", str(init), *over]) == 0
    summary = json.loads((quick / "target_features.json").read_text())
    assert [k for k in summary if k not in ("environment", "timing")] == ["bida", "bida_mixed"]
    assert summary["bida_mixed"]["seeds"] == [0, 1] and len(summary["bida_mixed"]["test"]["vs_bida"]["per_seed"]) == 2
    assert not (quick / "seed_0" / "source_only").exists()
    assert f"init_checkpoint: {init}" in (quick / "seed_1" / "bida_mixed" / "config.yaml").read_text()


@pytest.mark.slow
def test_inference_benchmark_runs_every_cpu_backend_at_two_sizes(tmp_path, monkeypatch, synthetic_cache, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(BENCH))
    import inference

    rows = inference.main(["--smoke", "--cache", str(synthetic_cache), "--json", str(tmp_path / "inference.json")])
    assert [(r["backend"], r["size"]) for r in rows] == [(b, s) for b in ("eager", "onnxruntime")
                                                         for s in ("32x64", "48x80")]
    assert all(r["images_per_s"] > 0 for r in rows)  # no figure asserted: a shared CPU
    assert "| onnxruntime | 48x80 |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "inference.json").read_text())["rows"]) == 4
    assert inference.backends(inference.parser().parse_args(["--compile", "--device", "cpu"])) == [
        "eager", "compiled", "onnxruntime"]
    import summary

    capsys.readouterr()
    summary.main([str(tmp_path)])
    assert "| inference onnxruntime 48x80" in capsys.readouterr().out


@pytest.mark.slow
def test_repeatability_smoke_compares_fresh_processes(tmp_path, monkeypatch, capsys):
    """benchmarks/repeatability.py: one bida demo per condition in a fresh process, each run
    compared with the first process's (the figures are findings, not asserted)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import repeatability

    rows = repeatability.main(["--smoke", "--conditions", "warm", "hash", "--out", str(tmp_path),
                               "--json", str(tmp_path / "repeat.json")])
    assert [r["condition"] for r in rows] == ["warm", "hash"] and rows[1]["env"] == {"PYTHONHASHSEED": "123"}
    assert all(set(r["same_as_first"]) == set(repeatability.RUNS) for r in rows)
    assert all(rows[0]["same_as_first"].values())  # the first process is its own reference
    assert all(0 <= m <= 1 for r in rows for m in r["test_mIoU"].values())
    assert json.loads((tmp_path / "repeat.json").read_text())["overrides"] == repeatability.SMOKE
    assert "hash | source_only" in capsys.readouterr().out
