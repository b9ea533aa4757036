"""bida.data.transforms: crops and the padding they mark invalid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bida.data.datasets import SegmentationDataset
from bida.data.listing import Sample


# ------------------------------------------------------------ crop padding (bug 4)
def test_training_items_mark_crop_padding_invalid(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.ones((10, 12), np.uint8)).save(tmp_path / "a_label.png")
    samples = [Sample(name="a", image=tmp_path / "a.png", label=tmp_path / "a_label.png")]
    ds = SegmentationDataset(samples, "folder", 3, train=True, crop=(16, 16), scale_range=(1.0, 1.0),
                             flip=False, resize=8)  # resize: the path the paper configs take
    item = ds[(0, 0)]
    valid, label = item["valid"], item["label"]
    assert valid.shape == label.shape == (16, 16) and valid.dtype == torch.bool
    assert int(valid.sum()) == 8 * 10  # resized to 8x10, padded to the 16x16 crop
    assert torch.all(label[~valid] == 255) and torch.all(label[valid] == 1)


def test_pseudo_margins_are_marked_on_the_image_before_the_crop(tmp_path):
    """Each crop pixel knows its image row and column (encoded in the colours): pseudo_keep is
    False exactly on the image's [top, bottom, left, right] margins, wherever the crop fell
    and whether or not it was flipped."""
    import numpy as np
    from PIL import Image

    from bida.data.datasets import SegmentationDataset
    from bida.data.listing import Sample
    from bida.data.transforms import denormalize

    h, w = 20, 24
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([cols * 8, rows * 8, np.zeros_like(rows)], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.ones((h, w), np.uint8)).save(tmp_path / "a_label.png")
    samples = [Sample(name="a", image=tmp_path / "a.png", label=tmp_path / "a_label.png")]
    ds = SegmentationDataset(samples, "folder", 3, train=True, crop=(8, 12), scale_range=(1.0, 1.0), flip=True,
                             pseudo_margins=(2, 5, 3, 1))
    seen = set()
    for seed in range(12):
        item = ds[(0, seed)]
        rgb = denormalize(item["image"], "imagenet").astype(int)
        r, c = (rgb[..., 1] + 4) // 8, (rgb[..., 0] + 4) // 8
        expected = (r >= 2) & (r < h - 5) & (c >= 3) & (c < w - 1)
        assert np.array_equal(item["pseudo_keep"].numpy(), expected), seed
        seen.add(bool(expected.all()))
    assert seen == {True, False}  # some crops inside the margins, some touching them
    plain = SegmentationDataset(samples, "folder", 3, train=True, crop=(8, 12), scale_range=(1.0, 1.0))
    assert "pseudo_keep" not in plain[(0, 0)]


@pytest.mark.parametrize("native, shorter, hrda", [
    ((1052, 1914), 1407, (1407, 2560)),  # GTA5: mmseg's keep-ratio fit into 2560x1440
    ((760, 1280), 1520, (1520, 2560)),   # SYNTHIA: into 2560x1520
    ((1024, 2048), 1024, (1024, 2048)),  # Cityscapes: 2048x1024, as it is
])
def test_the_configs_resize_gives_hrdas_hr_sizes(native, shorter, hrda):
    from bida.data.transforms import shorter_side_size

    # mmseg's Resize(img_scale=(W, H), keep_ratio=True): scale = min(W / w, H / h), sides rounded
    box = {(1052, 1914): (2560, 1440), (760, 1280): (2560, 1520), (1024, 2048): (2048, 1024)}[native]
    scale = min(box[0] / native[1], box[1] / native[0])
    assert (int(native[0] * scale + 0.5), int(native[1] * scale + 0.5)) == hrda
    assert shorter_side_size(native, shorter) == hrda


def test_a_full_size_gta5_image_serves_1024_context_crops(tmp_path):
    from fixtures import make_gta5_tree

    from bida.data.datasets import SegmentationDataset
    from bida.data.listing import list_samples

    make_gta5_tree(tmp_path / "gta", n=1, size=(1052, 1914), mismatched=0)
    samples = list_samples("gta5", tmp_path / "gta", "train", require_labels=True)
    ds = SegmentationDataset(samples, "gta5", 19, train=True, crop=(1024, 1024), resize=1407, flip=True)
    item = ds[(0, 7)]
    assert item["image"].shape == (3, 1024, 1024) and bool(item["valid"].all())  # inside the 1407x2560 image
