import math

import torch

from bida.config import EvalConfig
from bida.engine.inference import (confusion_matrix, iou_from_confusion, majority_collapse, markdown_table,
    metrics_from_confusion, predict_probs)


def test_confusion_matrix_hand_computed():
    label = torch.tensor([[0, 0, 1, 1], [2, 255, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = confusion_matrix(pred, label, 3)
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    assert torch.equal(conf, expected)


def test_metrics_hand_computed():
    conf = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    m = metrics_from_confusion(conf, ["a", "b", "c"])
    # IoU a = 1/(2+2-1)=1/3, b = 2/(3+3-2)=1/2, c = 1/(2+2-1)=1/3
    assert math.isclose(m["per_class_iou"]["a"], 1 / 3)
    assert math.isclose(m["per_class_iou"]["b"], 1 / 2)
    assert math.isclose(m["mIoU"], (1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert math.isclose(m["pixel_acc"], 4 / 7)
    assert "mIoU" in markdown_table(m)


def test_absent_class_is_skipped_and_subset():
    conf = torch.tensor([[3, 0, 0], [0, 0, 0], [0, 0, 1]])
    iou = iou_from_confusion(conf)
    assert math.isnan(iou[1])
    m = metrics_from_confusion(conf, ["a", "b", "c"])
    assert m["per_class_iou"]["b"] is None and m["mIoU"] == 1.0 and m["num_classes_evaluated"] == 2
    m2 = metrics_from_confusion(torch.tensor([[3, 1], [0, 0]]), ["a", "b"], eval_classes=[0])
    assert m2["mIoU"] == 0.75 and list(m2["per_class_iou"]) == ["a"]


class _Tiny(torch.nn.Module):
    """Stand-in network: class scores from a fixed 1x1 conv at stride 1."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, domain="source"):
        from bida.models import SegOutput

        y = self.conv(x)
        return SegOutput(y, y)


def test_whole_slide_and_flip_agree_for_a_local_model():
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(1, 3, 24, 40)
    whole = predict_probs(model, x, EvalConfig(mode="whole"), 4)
    slide = predict_probs(model, x, EvalConfig(mode="slide", crop=(24, 40), stride=(8, 8)), 4)
    torch.testing.assert_close(whole, slide)
    flipped = predict_probs(model, x, EvalConfig(flip=True), 4)
    assert flipped.shape == (1, 4, 24, 40)
    torch.testing.assert_close(flipped.sum(1), torch.ones(1, 24, 40))
    resized = predict_probs(model, x, EvalConfig(size=(12, 20)), 4, out_size=(24, 40))
    assert resized.shape == (1, 4, 24, 40)


def test_slide_windows_cover_everything():
    model = _Tiny().eval()
    x = torch.randn(2, 3, 30, 50)
    out = predict_probs(model, x, EvalConfig(mode="slide", crop=(16, 16), stride=(10, 10)), 4)
    assert out.shape == (2, 4, 30, 50) and torch.isfinite(out).all()


def test_synthia_protocols_on_cityscapes_classes():
    from bida.engine.inference import protocol_metrics
    from bida.labels import CITYSCAPES_CLASSES, SYNTHIA_13_CLASSES

    conf = torch.eye(19, dtype=torch.int64) * 10
    conf[3, 3] = 0  # wall never right: IoU 0 counts in 19 and 16, not in 13
    conf[3, 0] = 10
    p = protocol_metrics(conf, CITYSCAPES_CLASSES)
    iou_road = 10 / 20
    assert math.isclose(p["mIoU_19"], (17 + iou_road) / 19)
    assert math.isclose(p["mIoU_16"], (14 + iou_road) / 16)
    assert math.isclose(p["mIoU_13"], (12 + iou_road) / 13) and 3 not in SYNTHIA_13_CLASSES
    assert protocol_metrics(torch.eye(3, dtype=torch.int64), ["a", "b", "c"]) == {}


def _confusion(labelled: list[int], predicted_top: float, k: int = 4) -> torch.Tensor:
    """Rows = truth: class 0 covers ``labelled[0]`` pixels...; every pixel of class c > 0 is
    predicted as c with probability 1 - predicted_top, else as class 0; class 0 is always right."""
    conf = torch.zeros(k, k, dtype=torch.int64)
    conf[0, 0] = labelled[0]
    for c in range(1, k):
        to_top = round(labelled[c] * predicted_top)
        conf[c, 0], conf[c, c] = to_top, labelled[c] - to_top
    return conf


def test_majority_collapse_warning_on_hand_made_confusion_matrices():
    names = ["background", "one", "two", "three"]
    # 92 % background, the digits all predicted background: warned, with what to try
    warn = majority_collapse(_confusion([920, 30, 30, 20], 1.0), names, "target val")
    assert warn is not None and "\n" not in warn
    assert warn.startswith("bida: warning: the model predicts background on 100.0 % of the target val pixels, "
                           "where it covers 92.0 %")
    assert "loss.class_weights=inverse_sqrt_freq" in warn and "model.pretrained" in warn and "iterations" in warn
    # background on 99.5 %: the digits get 0.5 % of their 8 % (< a quarter): warned
    assert majority_collapse(_confusion([920, 30, 30, 20], 0.94), names, "val") is not None
    # the digits get half their pixels (96 % predicted background): a weak model, not a collapsed one
    assert majority_collapse(_confusion([920, 30, 30, 20], 0.5), names, "val") is None
    # a class that truly covers 97 %, predicted as such, is no collapse
    assert majority_collapse(_confusion([970, 10, 10, 10], 0.0), names, "val") is None
    # balanced labels, 95 % predicted as one class: warned; 90 %: below "nearly every pixel"
    assert majority_collapse(_confusion([250, 250, 250, 250], 0.94), names, "val") is not None
    assert majority_collapse(_confusion([250, 250, 250, 250], 0.86), names, "val") is None
    # empty matrix, or labels of one class only: nothing to say
    assert majority_collapse(torch.zeros(4, 4, dtype=torch.int64), names, "val") is None
    assert majority_collapse(_confusion([100, 0, 0, 0], 1.0), names, "val") is None
