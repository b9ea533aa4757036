"""``train.compile``: the training forward under torch.compile, same checkpoints, exact resume.

The runs use the ``aot_eager`` backend (``train.compile_backend``): it traces and runs the
same graphs as inductor but with eager kernels, so it compiles in seconds on a CPU; the
inductor backend (the one that speeds training up) is what the GPU benchmark times.
"""

from __future__ import annotations

import pytest
import torch

import bida.engine.train as tr
from bida.checkpoint import load_checkpoint
from bida.config import ConfigError, load_config
from bida.models import build_model


def test_compile_modes_map_to_torch_compile(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    model = torch.nn.Linear(2, 2)
    for value, backend in (("false", "inductor"), ("true", "inductor"), ("default", "inductor"),
                           ("reduce-overhead", "inductor"), ("max-autotune", "inductor"), ("max-autotune", "aot_eager")):
        cfg = load_config(None, [f"train.compile={value}", f"train.compile_backend={backend}"])
        assert tr.compile_for_training(model, cfg.train) is model
    assert seen == [{"backend": "inductor"}, {"backend": "inductor"}, {"backend": "inductor", "mode": "reduce-overhead"},
                    {"backend": "inductor", "mode": "max-autotune"}, {"backend": "aot_eager"}]
    for bad in ("train.compile=fast", "train.compile_backend=cudagraphs"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


def test_compiled_run_keeps_checkpoint_keys_and_resumes_exactly(tmp_path, tiny_overrides):
    torch._dynamo.reset()
    base = tiny_overrides + ["method=bida", "train.iters=2", "train.iters_per_round=2", "train.rounds=1",
                             "train.checkpoint_every=1"]
    compiled = load_config(None, base + ["train.compile=true", "train.compile_backend=aot_eager"])
    tr.Trainer(compiled, tmp_path / "full").fit()
    assert tr.Trainer(compiled, tmp_path / "part").fit(stop_after=3) is None  # inside the round
    tr.Trainer(compiled, tmp_path / "part", resume=True).fit()
    full, part = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    eager = build_model(compiled.model, full["num_classes"], compiled.method.feature).state_dict()
    assert list(full["model"]) == list(eager)  # no _orig_mod. prefix
    assert part["step"] == full["step"] == 4
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k
