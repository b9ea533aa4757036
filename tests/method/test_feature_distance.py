"""bida.method.feature_distance: the ImageNet feature distance and its labels."""

from __future__ import annotations

import pytest
import torch

from bida.config import load_config


def test_feature_distance_reads_the_backbone_output_on_the_chosen_classes(tiny_overrides):
    import copy

    from bida.models import build_model
    from bida.method.feature_distance import FeatureDistance

    student = build_model(load_config(None, tiny_overrides).model, 19).eval()
    fd = FeatureDistance(copy.deepcopy(student), [11, 13], 19)
    x = torch.randn(2, 3, 32, 64)
    y = torch.full((2, 32, 64), 13)
    y[1] = 0  # road: not a chosen class

    def distance(labels):
        with fd.capture(student):
            student(x, "source")
        return fd.loss(x, labels)

    assert distance(y).item() == 0.0  # the student is still the frozen copy
    with torch.no_grad():
        student.layer4[-1].conv2.weight.mul_(1.5)
    d = distance(y)
    assert d.item() > 0
    feat = []
    handle = student.layer4.register_forward_hook(lambda m, i, o: feat.append(o))
    with torch.no_grad():
        student(x[:1], "source")
        fd.model.layer4.register_forward_hook(lambda m, i, o: feat.append(o))
        fd.model(x[:1], "source")
    handle.remove()
    ref = (feat[0] - feat[1]).norm(dim=1).mean()  # image 0: every pixel is a chosen class
    assert d.item() == pytest.approx(ref.item(), rel=1e-5)
    assert distance(torch.zeros_like(y)).item() == 0.0  # no chosen class: no distance
