"""bida.data.rare_class: rare-class sampling probabilities, draws and re-crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bida.data.rare_class import RareClassSampler, class_probabilities
from bida.errors import ConfigError


def test_rare_class_probabilities_and_draws():
    # 4 images x 4 classes; totals 340, 330, 330, 0 pixels
    counts = np.array([[300, 0, 30, 0], [40, 10, 300, 0], [0, 300, 0, 0], [0, 20, 0, 0]])
    probs = class_probabilities(counts, 0.01)
    freq = torch.tensor([340.0, 330.0, 330.0]) / 1000
    expected = torch.softmax((1 - freq) / 0.01, 0).double().numpy()
    assert np.allclose(probs[:3], expected) and probs[3] == 0.0
    sampler = RareClassSampler(counts, 0.01, min_pixels=25, batch_size=2, seed=0)
    draws = [d for t in range(5000) for d in sampler.batch(t)]
    classes = np.array([c for _, _, c in draws])
    assert np.allclose(np.bincount(classes, minlength=4) / len(draws), probs, atol=0.02)
    for index, _, c in draws:
        assert counts[index, c] > 25  # an image holding more than min_pixels of the class
    # the position is the whole state: a sampler started at batch 7 continues the same stream
    later = RareClassSampler(counts, 0.01, 25, 2, 0, start=7)
    assert next(iter(later)) == sampler.batch(7)
    with pytest.raises(ConfigError, match="data.rcs_min_pixels"):
        RareClassSampler(counts, 0.01, min_pixels=400, batch_size=2, seed=0)


def test_rare_class_crops_are_drawn_again_until_they_show_the_class():
    from bida.data.rare_class import MAX_RECROPS, RareClassCrops

    class Crops:
        calls = 0

        def __getitem__(self, key):
            Crops.calls += 1
            index, seed = key
            label = torch.zeros(4, 4, dtype=torch.long)
            label[: (seed % 5)] = 3  # 0 to 16 pixels of class 3, depending on the crop
            return {"label": label, "seed": seed}

    crops = RareClassCrops(Crops(), min_crop_pixels=10)
    item = crops[(0, 0, 3)]  # seed 0: no pixel of class 3, drawn again
    assert int((item["label"] == 3).sum()) > 10 and Crops.calls > 1
    Crops.calls = 0
    never = crops[(0, 0, 7)]  # class 7 never shows: the last of 1 + MAX_RECROPS crops is kept
    assert Crops.calls == 1 + MAX_RECROPS and never["label"].max() < 7
