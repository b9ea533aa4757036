import pytest
import torch

from bida.models import DeepLabV2


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_shapes_and_output_stride(backbone):
    m = DeepLabV2(5, backbone, width=0.125, freeze_bn=False)
    out = m(torch.randn(2, 3, 65, 97))
    # caffe pooling (ceil mode): 65 -> 33 -> 17 -> 9; 97 -> 49 -> 25 -> 13
    assert out.logits.shape == (2, 5, 9, 13)
    assert out.features.shape == (2, 20, 9, 13)  # the four ASPP branches, 4K channels


def test_logits_are_sum_of_aspp_branches():
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False).eval()
    out = m(torch.randn(1, 3, 40, 40))
    branches = out.features.reshape(1, 4, 3, *out.features.shape[-2:])
    torch.testing.assert_close(out.logits, branches.sum(1))


def test_dilations_and_caffe_stride():
    m = DeepLabV2(3, "resnet50", width=0.125)
    assert m.layer3[0].conv2.dilation == (2, 2) and m.layer4[0].conv2.dilation == (4, 4)
    assert m.layer2[0].conv1.stride == (2, 2) and m.layer2[0].conv2.stride == (1, 1)
    assert [c.dilation[0] for c in m.layer5.conv2d_list] == [6, 12, 18, 24]


def test_torchvision_and_deeplab_key_layout():
    keys = set(DeepLabV2(19, "resnet101", width=0.0625).state_dict())
    for k in ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer3.22.conv3.weight",
              "layer4.2.bn3.weight", "layer5.conv2d_list.3.bias"]:
        assert k in keys


def test_frozen_bn_stays_frozen():
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=True)
    m.train()
    before = m.bn1.running_mean.clone()
    m(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(before, m.bn1.running_mean)
    assert not m.bn1.weight.requires_grad and not m.bn1.training
    assert m.concat_domains_ok


def test_param_groups_head_lr():
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False, feature="backbone", proj_dim=8)
    groups = m.param_groups(0.01, 10.0)
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    head = {id(p) for p in groups[1]["params"]}
    assert {id(p) for p in m.layer5.parameters()} <= head and {id(p) for p in m.proj.parameters()} <= head
    assert m(torch.randn(1, 3, 32, 32)).features.shape[1] == 8


def test_separate_target_stem():
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False, separate_target_stem=True).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(m(x, "source").logits, m(x, "target").logits)  # synced at init
    with torch.no_grad():
        m.target_stem.conv1.weight.add_(1.0)
    assert not torch.allclose(m(x, "source").logits, m(x, "target").logits)
    assert any(k.startswith("target_stem.") for k in m.state_dict())


def _bn_layers(m):
    return [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]


def test_bn_batch_stats_is_the_official_bn():
    torch.manual_seed(0)
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=True, bn_batch_stats=True).train()
    assert all(b.training and not b.weight.requires_grad and not b.bias.requires_grad for b in _bn_layers(m))
    assert not m.concat_domains_ok
    x = torch.randn(2, 3, 32, 32) * 5 + 3
    before = m.bn1.running_mean.clone()
    train_out = m(x).logits
    assert not torch.equal(before, m.bn1.running_mean)  # running statistics updated
    # Batch statistics: an image's output depends on the rest of its batch.
    assert not torch.allclose(m(x[:1]).logits, train_out[:1])
    m.eval()
    stats = m.bn1.running_mean.clone()
    eval_out = m(x).logits
    assert not torch.allclose(eval_out, train_out)
    torch.testing.assert_close(m(x[:1]).logits, eval_out[:1])  # running statistics, per image
    assert torch.equal(stats, m.bn1.running_mean)


def test_bn_batch_stats_forwards_each_domain_alone():
    from bida.method.train_step import forward_pair

    torch.manual_seed(0)
    m = DeepLabV2(3, "resnet18", width=0.125, freeze_bn=True, bn_batch_stats=True).train()
    x_src, x_tgt = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32) * 3 + 2
    out_src, out_tgt = forward_pair(m, x_src, x_tgt, shared_stem=True)
    torch.testing.assert_close(out_src.logits, m(x_src, "source").logits)
    torch.testing.assert_close(out_tgt.logits, m(x_tgt, "target").logits)


def test_bn_batch_stats_needs_freeze_bn():
    from bida.config import load_config
    from bida.models import build_model
    from bida.errors import ConfigError

    with pytest.raises(ValueError, match="freeze_bn"):
        DeepLabV2(3, "resnet18", width=0.125, freeze_bn=False, bn_batch_stats=True)
    with pytest.raises(ConfigError, match="model.freeze_bn"):
        build_model(load_config(None, ["model.bn_batch_stats=true"]).model, 3)
    m = build_model(load_config(None, ["model.width=0.125", "model.freeze_bn=true", "model.bn_batch_stats=true"]).model, 3)
    assert m.bn_batch_stats and m.bn1.weight.requires_grad is False


