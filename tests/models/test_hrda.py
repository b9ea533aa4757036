"""bida.models.hrda: HRDA's fusion against the paper, crops, sliding inference, state dict."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bida.config import load_config
from bida.models import build_model
from bida.models.hrda import HRDASegmentor, crop_boxes, draw_detail_boxes, fuse
from helpers import TINY_MIT, naive_fused


def tiny_hrda(*extra: str, num_classes: int = 5) -> HRDASegmentor:
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_MIT, *extra])
    return build_model(cfg.model, num_classes)


def reference_fusion(context, attention, detail, box, os_, scale):
    """The paper's fusion, one image at a time with plain slicing: the attention is zeroed
    outside the detail crop on the context grid, then
    fused = up(a) * detail_inserted + up((1 - a) * context) with bilinear ``up`` by 1/scale."""
    out = []
    r = int(round(1 / scale))
    for i in range(context.shape[0]):
        y, x = (int(v) for v in box[i])
        cy, cx = int(y * scale / os_), int(x * scale / os_)  # the box on the context grid
        dh, dw = detail.shape[-2:]
        a = torch.zeros_like(attention[i:i + 1])
        a[..., cy:cy + dh // r, cx:cx + dw // r] = attention[i:i + 1, :, cy:cy + dh // r, cx:cx + dw // r]
        low = F.interpolate((1 - a) * context[i:i + 1], scale_factor=r, mode="bilinear", align_corners=False)
        a_up = F.interpolate(a, scale_factor=r, mode="bilinear", align_corners=False)
        ins = torch.zeros_like(low)
        fy, fx = int(y / os_), int(x / os_)  # the box on the full-resolution grid
        ins[..., fy:fy + dh, fx:fx + dw] = detail[i:i + 1]
        out.append(a_up * ins + low)
    return torch.cat(out)


@pytest.mark.parametrize("classwise", [True, False])
def test_training_forward_matches_the_papers_fusion(classwise):
    model = tiny_hrda(f"model.hrda.attention_classwise={str(classwise).lower()}").eval()
    x = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[8, 24], [32, 0]])
    out = model(x, "source", detail_box=box)
    base = model.base
    with torch.no_grad():
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        levels = base.backbone(small)
        context = base.decode_head(levels)[0]
        attention = torch.sigmoid(model.scale_attention(levels)[0])
        # the detail crops, sliced one by one (the model gathers them in one go)
        crops = torch.stack([x[i, :, y:y + 32, c:c + 32] for i, (y, c) in enumerate(box.tolist())])
        detail = base.decode_head(base.backbone(crops))[0]
    assert attention.shape == (2, 5 if classwise else 1, 8, 8)  # one map per class, or one for all
    assert out.detail_logits.shape == (2, 5, 8, 8) and out.logits.shape == (2, 5, 16, 16)
    assert out.features.shape == (2, 8, 8, 8)  # the context crop's contrast features
    torch.testing.assert_close(out.detail_logits, detail)
    torch.testing.assert_close(out.logits, reference_fusion(context, attention, detail, box, 4, 0.5))
    # far from the detail crop the fused prediction is the upsampled context alone
    up = F.interpolate(context, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.logits[1, :, 13:, 10:], up[1, :, 13:, 10:])


def test_fuse_is_float32_under_bf16_autocast():
    torch.manual_seed(1)
    ctx, att, det = torch.randn(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    ref = fuse(ctx, att, det, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuse(ctx, att, det, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_detail_boxes_lie_inside_and_on_the_grid():
    u = torch.rand(4000, 2, generator=torch.Generator().manual_seed(0))
    box = draw_detail_boxes(u, (1024, 768), (512, 512), 8)
    assert (box % 8 == 0).all() and (box >= 0).all()
    assert (box[:, 0] + 512 <= 1024).all() and (box[:, 1] + 512 <= 768).all()
    # HRDA's get_crop_bbox: offsets d * randint(0, (margin + 1) // d)
    assert set(box[:, 0].tolist()) == {8 * i for i in range(513 // 8)}
    assert set(box[:, 1].tolist()) == {8 * i for i in range(257 // 8)}
    assert draw_detail_boxes(torch.rand(3, 2), (64, 64), (64, 64), 8).eq(0).all()  # detail = context


def test_crop_boxes_slices_each_sample_at_its_corner():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    box = torch.tensor([[2, 4], [0, 6]])
    crops = crop_boxes(x, box, (4, 6))
    for i, (y, c) in enumerate(box.tolist()):
        assert torch.equal(crops[i], x[i, :, y:y + 4, c:c + 6])
        assert torch.equal(crop_boxes(x[:, 0], box, (4, 6))[i], x[i, 0, y:y + 4, c:c + 6])


def test_fused_inference_slides_detail_windows_like_a_naive_loop():
    model = tiny_hrda().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x, "target").logits
    torch.testing.assert_close(out, naive_fused(model, x))


def test_fused_inference_on_any_size_pads_and_crops_back():
    model = tiny_hrda().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 101), "target")
    assert out.logits.shape == (1, 5, 18, 26)  # ceil(70 / 4), ceil(101 / 4)
    assert out.features.shape == (1, 8, 9, 13)  # ceil(70 / 8), ceil(101 / 8)
    with torch.no_grad():  # below the 64 pixels whose context MiT takes: padded up to them
        assert model(torch.randn(1, 3, 23, 37), "target").logits.shape == (1, 5, 6, 10)


def test_state_dict_is_the_segmentors_plus_the_attention():
    model = tiny_hrda()
    torch.manual_seed(0)
    plain = build_model(load_config(None, [*TINY_MIT, "model.hrda.enabled=false"]).model, 5)
    keys = set(model.state_dict())
    assert set(plain.state_dict()) == {k for k in keys if not k.startswith("scale_attention.")}
    assert any(k.startswith("scale_attention.") for k in keys)
    # the segmentor's weights start as without HRDA (the attention is drawn after them)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    head = next(g for g in model.param_groups(1.0, 10.0) if g["name"] == "head")
    assert {id(p) for p in model.scale_attention.parameters()} <= {id(p) for p in head["params"]}


def test_dinov2_training_forward_matches_the_papers_fusion():
    """DINOv2 (3.5 input pixels a cell): crops on multiples of 7 fall on whole cells of both grids."""
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_MIT, "model.backbone=dinov2_vits14", "model.width=0.125", "data.crop=[56,84]",
                             "model.hrda.detail_crop=[28,28]", "model.hrda.crop_divisible=7"])
    model = build_model(cfg.model, 5).eval()
    x, box = torch.randn(2, 3, 56, 84), torch.tensor([[7, 14], [28, 49]])
    out = model(x, "source", detail_box=box)
    base = model.base
    with torch.no_grad():
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        levels = base.encode(small)
        context = base.decode(levels, (28, 42)).logits
        attention = torch.sigmoid(model.scale_attention(levels)[0][..., :8, :12])
        crops = torch.stack([x[i, :, y:y + 28, c:c + 28] for i, (y, c) in enumerate(box.tolist())])
        detail = base(crops).logits
    assert out.logits.shape == (2, 5, 16, 24) and detail.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out.logits, reference_fusion(context, attention, detail, box, 3.5, 0.5))


TINY_DLV2 = ["model.backbone=resnet18", "model.width=0.125", "train.schedule=teacher", "method.name=self_training",
             "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
             "model.hrda.detail_crop=[32,32]", "model.hrda.crop_divisible=16"]


def tiny_dlv2_hrda(*extra: str) -> HRDASegmentor:
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY_DLV2, *extra]).model, 5)


def floor_pool_deeplab(model: HRDASegmentor):
    """An independent DeepLab-V2 reference for HRDA: a copy of the segmentor whose stem pools
    in floor mode (mmseg's ResNetV1c), run through its plain ``forward``, and a function giving
    its logits and the scale attention's logit, the four dilated convs of the attention summed
    by hand on the copy's layer4 output."""
    ref = copy.deepcopy(model.base).eval()
    ref.maxpool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=False)
    seen = []
    ref.layer4.register_forward_hook(lambda mod, inp, out: seen.append(out))

    def run(img):
        seen.clear()
        logits = ref(img).logits
        att = sum(F.conv2d(seen[0], conv.weight, conv.bias, padding=d, dilation=d)
                  for conv, d in zip(model.scale_attention.conv2d_list, (6, 12, 18, 24)))
        return logits, att

    return ref, run


@pytest.mark.parametrize("classwise", [True, False])
def test_deeplabv2_training_forward_matches_the_papers_fusion(classwise):
    """DeepLab-V2 (8 input pixels a cell, crops on multiples of 16): the fusion of the paper on
    H/8 cells, the caffe pool's extra last cell left out."""
    model = tiny_dlv2_hrda(f"model.hrda.attention_classwise={str(classwise).lower()}").eval()
    x = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[16, 32], [32, 0]])
    out = model(x, "source", detail_box=box)
    ref, run = floor_pool_deeplab(model)
    with torch.no_grad():
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        context, attention = run(small)
        attention = torch.sigmoid(attention)
        context_features = ref(small).features
        crops = torch.stack([x[i, :, y:y + 32, c:c + 32] for i, (y, c) in enumerate(box.tolist())])
        detail = run(crops)[0]
    assert model.base(small).logits.shape == (2, 5, 5, 5)  # forward keeps the caffe pool: 32 / 8 + 1
    assert attention.shape == (2, 5 if classwise else 1, 4, 4)
    assert out.detail_logits.shape == (2, 5, 4, 4) and out.logits.shape == (2, 5, 8, 8)
    assert out.features.shape == (2, 20, 4, 4)  # the context crop's ASPP branches (4K)
    torch.testing.assert_close(out.detail_logits, detail)
    torch.testing.assert_close(out.features, context_features)
    torch.testing.assert_close(out.logits, reference_fusion(context, attention, detail, box, 8, 0.5))


def test_deeplabv2_fused_inference_slides_detail_windows_like_a_naive_loop():
    model = tiny_dlv2_hrda().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x, "target")
        assert out.logits.shape == (2, 5, 8, 12) and out.features.shape == (2, 20, 4, 6)
        torch.testing.assert_close(out.logits, naive_fused(model, x, floor_pool_deeplab(model)[1], os_=8))
        # any size: padded to whole 16-pixel units, cropped back to ceil(H / 8) cells
        assert model(torch.randn(1, 3, 70, 101), "target").logits.shape == (1, 5, 9, 13)


def test_deeplabv2_state_dict_is_the_segmentors_plus_an_aspp_attention():
    model = tiny_dlv2_hrda("model.separate_target_stem=true")
    torch.manual_seed(0)
    plain = build_model(load_config(None, [*TINY_DLV2, "model.hrda.enabled=false",
                                           "model.separate_target_stem=true"]).model, 5)
    keys = set(model.state_dict())
    assert set(plain.state_dict()) == {k for k in keys if not k.startswith("scale_attention.")}
    assert {k for k in keys if k.startswith("scale_attention.")} == {
        f"scale_attention.conv2d_list.{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    head = next(g for g in model.param_groups(1.0, 10.0) if g["name"] == "head")
    assert {id(p) for p in model.scale_attention.parameters()} <= {id(p) for p in head["params"]}
    with torch.no_grad():  # the target stem is the segmentor's, kept in step by sync_target_stem
        model.conv1.weight.add_(1.0)
    model.sync_target_stem()
    assert torch.equal(model.target_stem.conv1.weight, model.conv1.weight)
    model.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        same = [model.base.encode(x, d)[0] for d in ("source", "target")]
        model.target_stem.conv1.weight.mul_(2.0)  # target images go through the target stem
        source, target = (model.base.encode(x, d)[0] for d in ("source", "target"))
    assert torch.equal(same[0], same[1]) and torch.equal(source, same[0]) and not torch.equal(target, same[1])


def test_deeplabv2_attention_head_sums_the_four_dilated_convs():
    """On a grid wide enough for every dilation (the tiny models' grids see the centre taps only)."""
    torch.manual_seed(0)
    head = tiny_dlv2_hrda().scale_attention
    feat = torch.randn(2, 64, 30, 30)
    ref = sum(F.conv2d(feat, conv.weight, conv.bias, padding=d, dilation=d)
              for conv, d in zip(head.conv2d_list, (6, 12, 18, 24)))
    assert head.conv2d_list[0].weight.shape == (5, 64, 3, 3)  # layer4's channels (512 x 0.125) to K maps
    torch.testing.assert_close(head([torch.zeros(1), feat])[0], ref)  # the deepest level only
