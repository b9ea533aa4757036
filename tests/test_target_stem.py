"""A separate target stem starts from the trained source stem (METHOD.md, "Stem")."""

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.models import DeepLabV2
from bida.engine.train import Trainer, train
from bida.models.weights import load_model_weights

STEM = ("conv1.", "bn1.", "layer1.")


def _stems(state: dict) -> tuple[dict, dict]:
    """(source stem, target stem) of a model state dict, under the same keys."""
    source = {k: v for k, v in state.items() if k.startswith(STEM)}
    target = {k[len("target_stem."):]: v for k, v in state.items() if k.startswith("target_stem.")}
    return source, target


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_shared_stem_checkpoint_initialises_the_target_stem(tmp_path):
    torch.manual_seed(0)
    shared = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False)
    with torch.no_grad():  # unlike any fresh initialisation, so that a copy is recognisable
        for t in shared.state_dict().values():
            t.add_(torch.rand_like(t.float()).to(t.dtype))
    torch.save({"model": shared.state_dict()}, tmp_path / "shared.pt")
    separate = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False, separate_target_stem=True)

    assert load_model_weights(separate, tmp_path / "shared.pt") is True
    loaded = separate.state_dict()
    _assert_same({k: v for k, v in loaded.items() if not k.startswith("target_stem.")}, shared.state_dict())
    source, target = _stems(loaded)
    _assert_same(target, source)

    # A checkpoint with its own target stem keeps it.
    with torch.no_grad():
        separate.target_stem.conv1.weight.mul_(2.0)
    torch.save({"model": separate.state_dict()}, tmp_path / "separate.pt")
    other = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False, separate_target_stem=True)
    assert load_model_weights(other, tmp_path / "separate.pt") is False
    _assert_same(other.state_dict(), separate.state_dict())


def test_source_phase_keeps_the_target_stem_in_sync(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", "model.separate_target_stem=true"])
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit(stop_after=cfg.train.iters) is None  # stops at the start of round 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    source, target = _stems(state)
    assert not torch.equal(source["conv1.weight"], initial["conv1.weight"])  # the source stem was trained
    _assert_same(target, source)


@pytest.mark.parametrize("source_stem", ["shared", "separate"])
def test_adaptation_starts_from_the_trained_source_stem(tmp_path, tiny_overrides, source_stem):
    separate = str(source_stem == "separate").lower()
    src_cfg = load_config(None, tiny_overrides + ["method=source_only", f"model.separate_target_stem={separate}"])
    src_run = tmp_path / "source_only"
    src_metrics = train(src_cfg, src_run)
    ckpt = src_run / "checkpoints" / "last.pt"
    src_state = load_checkpoint(ckpt)["model"]
    trained_source, trained_target = _stems(src_state)
    if source_stem == "separate":  # the source-only model evaluates target images with its trained stem
        _assert_same(trained_target, trained_source)

    cfg = load_config(None, tiny_overrides + ["method=bida", "train.rounds=1", "model.separate_target_stem=true",
                                              f"model.init_checkpoint={ckpt}"])
    trainer = Trainer(cfg, tmp_path / "bida")
    source, target = _stems(trainer.model.state_dict())
    _assert_same(source, trained_source)
    _assert_same(target, trained_source)
    assert trainer.evaluator.target()["mIoU"] == src_metrics["mIoU"]  # round 0 starts from the source-only model
    assert 0.0 <= trainer.fit()["mIoU"] <= 1.0
