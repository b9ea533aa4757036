"""Initial weights in the layouts users hold: DeepLab_init (Scale.), torchvision, bida, safetensors."""

import pickle
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint, save_checkpoint
from bida.errors import CheckpointError
from bida.models import DeepLabV2
from bida.models.weights import load_model_weights, load_pretrained
from helpers import _assert_same, _stems


def _model(k=19, **kw):
    return DeepLabV2(k, "resnet50", width=0.0625, freeze_bn=True, **kw)


def _backbone_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("layer5.")}


def test_deeplab_init_layout(tmp_path):
    src = _model()
    state = {f"Scale.{k}": v for k, v in _backbone_state(src).items()}
    # the init checkpoint's classifier is for another label set (VOC, 21 classes)
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(21, src.backbone_channels, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(21)
    torch.save(state, tmp_path / "DeepLab_init.pth")
    dst = _model()
    report = load_pretrained(dst, tmp_path / "DeepLab_init.pth")
    assert torch.equal(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)
    assert torch.equal(dst.bn1.running_var, src.bn1.running_var)
    assert "layer5.conv2d_list.0.weight" in report["skipped"]
    assert not torch.equal(dst.layer5.conv2d_list[0].bias[:19], state["Scale.layer5.conv2d_list.0.bias"][:19])


def test_torchvision_layout_and_target_stem_sync(tmp_path):
    src = _model()
    state = _backbone_state(src)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, src.backbone_channels), torch.randn(1000)
    torch.save(state, tmp_path / "resnet50.pth")
    dst = _model(separate_target_stem=True)
    report = load_pretrained(dst, tmp_path / "resnet50.pth")
    assert "fc.weight" in report["skipped"]
    assert torch.equal(dst.target_stem.conv1.weight, src.conv1.weight)  # target stem starts from the same weights


def test_safetensors_and_bida_checkpoint(tmp_path):
    from safetensors.torch import save_file

    src = _model()
    save_file({k: v.contiguous() for k, v in _backbone_state(src).items()}, str(tmp_path / "w.safetensors"))
    dst = _model()
    load_pretrained(dst, tmp_path / "w.safetensors")
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    save_checkpoint({"model": src.state_dict(), "config": {}, "num_classes": 19}, tmp_path / "c.pt")
    dst = _model()
    load_model_weights(dst, tmp_path / "c.pt")
    assert torch.equal(dst.layer5.conv2d_list[2].weight, src.layer5.conv2d_list[2].weight)


def test_unexpected_keys_are_refused(tmp_path):
    state = _backbone_state(_model())
    state["decoder.head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd\.pth.*unexpected keys: decoder\.head\.weight"):
        load_pretrained(_model(), tmp_path / "odd.pth")


def test_wrong_depth_or_width_is_refused(tmp_path):
    torch.save(_backbone_state(DeepLabV2(19, "resnet50", width=0.125)), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="shape"):
        load_pretrained(_model(), tmp_path / "wide.pth")
    torch.save(_backbone_state(DeepLabV2(19, "resnet18", width=0.0625)), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError):
        load_pretrained(_model(), tmp_path / "r18.pth")


def test_checkpoint_of_another_class_count(tmp_path):
    save_checkpoint({"model": _model(7).state_dict()}, tmp_path / "k7.pt")
    with pytest.raises(CheckpointError, match="7 classes, the config has 19"):
        load_model_weights(_model(19), tmp_path / "k7.pt")
    save_checkpoint({"model": DeepLabV2(19, "resnet18", width=0.0625).state_dict()}, tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="architecture"):
        load_model_weights(_model(19), tmp_path / "r18.pt")


def test_truncated_checkpoint(tmp_path):
    save_checkpoint({"model": _model().state_dict()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt.*(truncated|corrupt)"):
        load_checkpoint(tmp_path / "cut.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump(_Evil(), fh)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")


def test_init_checkpoint_without_projection_head_keeps_a_fresh_head(tmp_path):
    """A source-only checkpoint has no contrast projection head: adaptation with
    method.feature=backbone starts from it with a fresh head; resume stays strict."""
    src = _model()
    save_checkpoint({"model": src.state_dict()}, tmp_path / "so.pt")
    dst = _model(feature="backbone")
    head = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("proj.")}
    assert head
    load_model_weights(dst, tmp_path / "so.pt", fresh_projection=True)
    assert torch.equal(dst.layer3[0].conv2.weight, src.layer3[0].conv2.weight)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in head.items())
    with pytest.raises(CheckpointError, match="proj"):
        load_model_weights(_model(feature="backbone"), tmp_path / "so.pt")


def test_init_checkpoint_with_a_head_starts_a_fresh_head_unless_asked_for_it(tmp_path):
    """A checkpoint's head (a MiT's, or one trained with method.pretrain_head) reaches an
    adaptation run only when it asks for it (fresh_projection=False); the rest loads."""
    trained = _model(feature="backbone")
    with torch.no_grad():
        for p in trained.proj.parameters():
            p.add_(1.0)
    save_checkpoint({"model": trained.state_dict()}, tmp_path / "head.pt")
    fresh = _model(feature="backbone")
    head = {k: v.clone() for k, v in fresh.state_dict().items() if k.startswith("proj.")}
    load_model_weights(fresh, tmp_path / "head.pt", fresh_projection=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in head.items())
    assert torch.equal(fresh.layer3[0].conv2.weight, trained.layer3[0].conv2.weight)
    kept = _model(feature="backbone")
    load_model_weights(kept, tmp_path / "head.pt")
    assert torch.equal(kept.proj[0].weight, trained.proj[0].weight)
    aspp = _model()  # no head at all: the checkpoint's is left out
    load_model_weights(aspp, tmp_path / "head.pt", fresh_projection=True)
    assert torch.equal(aspp.layer3[0].conv2.weight, trained.layer3[0].conv2.weight)


def _saved_run(tmp_path, cfg_overrides, name="last.pt", with_config=True):
    """A checkpoint as a run writes it: the model, its config and class count."""
    from bida.config import load_config, to_dict
    from bida.models import build_model

    cfg = load_config(None, cfg_overrides)
    model = build_model(cfg.model, 19, cfg.method.feature)
    state = {"model": model.state_dict(), "num_classes": 19}
    if with_config:
        state["config"] = to_dict(cfg)
    save_checkpoint(state, tmp_path / name)
    return tmp_path / name


def test_a_checkpoint_of_another_backbone_is_named_with_both_backbones(tmp_path, capsys):
    from bida.tools.cli import main

    ckpt = _saved_run(tmp_path, ["model.backbone=resnet18", "model.width=0.0625"])
    demo = str(Path(__file__).parents[2] / "configs" / "demo_transformer.yaml")
    assert main(["evaluate", "-c", demo, "--checkpoint", str(ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "holds a DeepLab-V2 (resnet18) model and the config asks for model.backbone=mit_b0" in err
    assert "leave out -c" in err and "patch_embed" not in err
    # without a saved config the key layout names the family; the same path loads model.init_checkpoint
    bare = _saved_run(tmp_path, ["model.backbone=resnet18", "model.width=0.0625"], "bare.pt", with_config=False)
    from bida.config import load_config
    from bida.models import build_model

    mit = build_model(load_config(demo).model, 19, "decoder")
    with pytest.raises(CheckpointError, match=r"bare\.pt holds a DeepLab-V2 \(the key layout of a ResNet/DeepLab-V2\) "
                                              r"model and the config asks for model\.backbone=mit_b0$"):
        load_model_weights(mit, bare)
    # the other way round, a MiT run's checkpoint into a DeepLab-V2
    mit_ckpt = _saved_run(tmp_path, ["model.backbone=mit_b0", "model.width=0.25", "method.feature=decoder"], "mit.pt")
    with pytest.raises(CheckpointError, match=r"holds a MiT \(SegFormer/DAFormer\) \(mit_b0\) model and the config "
                                              r"asks for model\.backbone=resnet50"):
        load_model_weights(_model(), mit_ckpt)


def test_a_checkpoint_of_the_same_backbone_and_another_class_count_names_both_counts(tmp_path, capsys):
    from bida.tools.cli import main

    ckpt = _saved_run(tmp_path, ["model.width=0.0625"])
    from bida.config import load_config, to_dict

    cfg = to_dict(load_config(None, ["model.width=0.0625"]))
    state = load_checkpoint(ckpt)
    k7 = DeepLabV2(7, cfg["model"]["backbone"], width=0.0625)
    save_checkpoint({**state, "model": k7.state_dict(), "num_classes": 19}, tmp_path / "k7.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "k7.pt"), "--quiet"]) == 2
    assert "was trained for 7 classes, the config has 19" in capsys.readouterr().err


def test_converters_live_beside_their_models():
    from bida.models import dinov2, mit

    assert mit.hf_segformer_name("encoder.block.0.1.attention.self.query.weight") == "block1.1.attn.q.weight"
    assert mit.hf_segformer_name("encoder.patch_embeddings.2.layer_norm.bias") == "patch_embed3.norm.bias"
    assert dinov2.hf_dinov2_name("encoder.layer.3.layer_scale2.lambda1") == "blocks.3.ls2.gamma"
    assert dinov2.hf_dinov2_name("embeddings.position_embeddings") == "pos_embed"
    out, skipped = dinov2.from_dinov2_release({"blocks.1.4.attn.qkv.weight": torch.zeros(1), "mask_token": torch.zeros(1)})
    assert list(out) == ["backbone.blocks.4.attn.qkv.weight"] and skipped == ["mask_token"]


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
