import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bida.data.listing import KINDS, Sample, list_samples, orphan_labels
from bida.data.png import decode_png
from bida.data.readers import LabelResizedWarning, class_info, read_image, read_label, read_pair
from bida.errors import ConfigError, DataError
from bida.labels import CITYSCAPES, default_palette
from bida.tools.cli import main

from fixtures import (EXPECTED_CITYSCAPES_TRAIN_IDS, EXPECTED_SYNTHIA_TRAIN_IDS, expected_train_ids,
    make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree, write_png)
from helpers import _folder_pair


def test_kinds():
    assert KINDS == ("gta5", "synthia", "cityscapes", "folder")


def test_gta5_listing_is_sorted_and_complete(tmp_path):
    tree = make_gta5_tree(tmp_path, n=3)
    samples = list_samples("gta5", tmp_path, "train")
    assert [s.name for s in samples] == ["00001", "00002", "00003"]
    assert samples[0] == Sample(tmp_path / "images/00001.png", tmp_path / "labels/00001.png", "00001")
    assert set(tree.ids) == {s.name for s in samples}


def test_gta5_labels_mapped_pixel_by_pixel(tmp_path):
    tree = make_gta5_tree(tmp_path, n=3, mismatched=0)
    for sample in list_samples("gta5", tmp_path, "train"):
        image, label = read_pair(sample, "gta5", num_classes=19)
        assert np.array_equal(image, tree.images[sample.name])
        expected = expected_train_ids(tree.ids[sample.name], EXPECTED_CITYSCAPES_TRAIN_IDS)
        assert np.array_equal(label, expected)
    assert {0, 18, 255} <= set(np.unique(label).tolist())  # the fixture covers the range


def test_gta5_palette_label_is_read_as_indices(tmp_path):
    tree = make_gta5_tree(tmp_path, n=1, mismatched=0)
    assert Image.open(tmp_path / "labels/00001.png").mode == "P"
    label = read_label(tmp_path / "labels/00001.png", "gta5")
    assert np.array_equal(label, expected_train_ids(tree.ids["00001"], EXPECTED_CITYSCAPES_TRAIN_IDS))


def test_gta5_size_mismatch_resized_with_nearest_and_warned(tmp_path):
    tree = make_gta5_tree(tmp_path, n=2, size=(8, 16), mismatched=1)
    sample = list_samples("gta5", tmp_path, "train")[1]
    assert sample.name in tree.mismatched
    assert read_label(sample.label, "gta5").shape == (16, 32)
    with pytest.warns(LabelResizedWarning, match="00002.png.*resized with nearest"):
        image, label = read_pair(sample, "gta5")
    assert image.shape == (8, 16, 3) and label.shape == (8, 16)
    assert np.array_equal(label, expected_train_ids(tree.ids[sample.name], EXPECTED_CITYSCAPES_TRAIN_IDS))


def test_gta5_matching_pair_does_not_warn(tmp_path):
    make_gta5_tree(tmp_path, n=1, mismatched=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_pair(list_samples("gta5", tmp_path, "train")[0], "gta5")


def test_gta5_split_files(tmp_path):
    make_gta5_tree(tmp_path, n=5)
    (tmp_path / "split").mkdir()
    (tmp_path / "split/train.txt").write_text("00004.png\n00001\n\n00002.png\n")
    (tmp_path / "split/val.txt").write_text("00005.png\n")
    assert [s.name for s in list_samples("gta5", tmp_path, "train")] == ["00001", "00002", "00004"]
    assert [s.name for s in list_samples("gta5", tmp_path, "val")] == ["00005"]


def test_gta5_train_without_train_txt_excludes_val(tmp_path):
    make_gta5_tree(tmp_path, n=4)
    (tmp_path / "split").mkdir()
    (tmp_path / "split/val.txt").write_text("00002\n")
    assert [s.name for s in list_samples("gta5", tmp_path, "train")] == ["00001", "00003", "00004"]


def test_gta5_val_without_split_file_fails(tmp_path):
    make_gta5_tree(tmp_path, n=2)
    with pytest.raises(DataError, match=r"missing split file .*split/val\.txt"):
        list_samples("gta5", tmp_path, "val")


def test_gta5_split_file_naming_missing_image_fails(tmp_path):
    make_gta5_tree(tmp_path, n=2)
    (tmp_path / "split").mkdir()
    (tmp_path / "split/train.txt").write_text("00001.png\n09999.png\n")
    with pytest.raises(DataError, match=r"train\.txt lists 1 image.*09999\.png"):
        list_samples("gta5", tmp_path, "train")


def test_gta5_missing_label(tmp_path):
    make_gta5_tree(tmp_path, n=3)
    (tmp_path / "labels/00002.png").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images .* have no label, first: .*images/00002\.png"):
        list_samples("gta5", tmp_path, "train")
    samples = list_samples("gta5", tmp_path, "train", require_labels=False)
    assert [s.label is None for s in samples] == [False, True, False]
    image, label = read_pair(samples[1], "gta5")
    assert image.shape == (8, 16, 3) and label is None


@pytest.mark.parametrize("single_channel", [False, True], ids=["rgba16", "gray16"])
@pytest.mark.parametrize("filters", [(0, 1, 2, 3, 4), (0, 1, 2)], ids=["all-filters", "fast-path"])
def test_synthia_labels_mapped_pixel_by_pixel(tmp_path, single_channel, filters):
    tree = make_synthia_tree(tmp_path, n=3, single_channel=single_channel, filters=filters)
    samples = list_samples("synthia", tmp_path, "train")
    assert [s.name for s in samples] == ["0000000", "0000001", "0000002"]
    for sample in samples:
        image, label = read_pair(sample, "synthia", num_classes=19)
        assert np.array_equal(image, tree.images[sample.name])
        ids = tree.ids[sample.name]
        assert np.array_equal(label, expected_train_ids(ids, EXPECTED_SYNTHIA_TRAIN_IDS))
        # 16-bit ids whose low byte is a valid class must still be ignored
        assert (label[ids == 258] == 255).all() and (label[ids == 256] == 255).all()
        assert (label[ids == 3] == 0).all()


def test_synthia_label_file_really_is_16_bit_rgba(tmp_path):
    make_synthia_tree(tmp_path, n=1)
    data = (tmp_path / "GT/LABELS/0000000.png").read_bytes()
    assert data[24] == 16 and data[25] == 6  # IHDR bit depth, colour type RGBA
    decoded = decode_png(data)
    assert decoded.dtype == np.uint16 and decoded.shape == (8, 16, 4)
    assert (decoded[:, :, 1:] > 0).all()  # garbage channels that must not leak into ids


def test_synthia_8_bit_rgb_label_uses_first_channel(tmp_path):
    ids = np.array([[3, 4, 99]], dtype=np.uint8)
    path = tmp_path / "label.png"
    Image.fromarray(np.stack([ids, ids + 1, ids + 2], axis=2)).save(path)
    assert read_label(path, "synthia").tolist() == [[0, 1, 255]]


def test_synthia_size_mismatch_is_an_error(tmp_path):
    make_synthia_tree(tmp_path, n=1)
    write_png(tmp_path / "GT/LABELS/0000000.png", np.zeros((4, 4, 4), np.uint16))
    sample = list_samples("synthia", tmp_path, "train")[0]
    with pytest.raises(DataError, match=r"LABELS/0000000\.png is 4x4 but image .*RGB/0000000\.png is 16x8"):
        read_pair(sample, "synthia")


def test_synthia_corrupt_16_bit_label(tmp_path):
    make_synthia_tree(tmp_path, n=1)
    path = tmp_path / "GT/LABELS/0000000.png"
    data = bytearray(path.read_bytes())
    data[60] ^= 0xFF  # inside IDAT: the CRC check catches it
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"cannot read label .*0000000\.png: corrupt PNG"):
        read_label(path, "synthia")
    path.write_bytes(bytes(data[:70]))
    with pytest.raises(DataError, match=r"0000000\.png: truncated PNG"):
        read_label(path, "synthia")


def test_non_synthia_16_bit_colour_label_is_rejected(tmp_path):
    write_png(tmp_path / "l.png", np.zeros((2, 2, 3), np.uint16))
    with pytest.raises(DataError, match=r"l\.png is a 16-bit multi-channel PNG"):
        read_label(tmp_path / "l.png", "cityscapes")


def test_cityscapes_listing_sorted_across_cities(tmp_path):
    make_cityscapes_tree(tmp_path, cities=("bochum", "aachen"), n_per_city=2)
    names = [s.name for s in list_samples("cityscapes", tmp_path, "val")]
    assert names == [
        "aachen/aachen_000000_000019_leftImg8bit",
        "aachen/aachen_000001_000019_leftImg8bit",
        "bochum/bochum_000000_000019_leftImg8bit",
        "bochum/bochum_000001_000019_leftImg8bit",
    ]
    first = list_samples("cityscapes", tmp_path, "val")[0]
    assert first.label == tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png"


def test_cityscapes_labels_mapped_pixel_by_pixel(tmp_path):
    tree = make_cityscapes_tree(tmp_path)
    for split in ("train", "val"):
        for sample in list_samples("cityscapes", tmp_path, split):
            key = f"{split}/{sample.name.removesuffix('_leftImg8bit')}"
            image, label = read_pair(sample, "cityscapes", num_classes=19)
            assert np.array_equal(image, tree.images[key])
            assert np.array_equal(label, expected_train_ids(tree.ids[key], EXPECTED_CITYSCAPES_TRAIN_IDS))


def test_cityscapes_unlabelled_target_split(tmp_path):
    make_cityscapes_tree(tmp_path, unlabelled_splits=("train",))
    samples = list_samples("cityscapes", tmp_path, "train", require_labels=False)
    assert len(samples) == 4 and all(s.label is None for s in samples)
    with pytest.raises(DataError, match=r"4 of 4 images in .*leftImg8bit/train have no label"):
        list_samples("cityscapes", tmp_path, "train")


def test_cityscapes_size_mismatch_is_an_error(tmp_path):
    make_cityscapes_tree(tmp_path, cities=("aachen",), n_per_city=1)
    sample = list_samples("cityscapes", tmp_path, "val")[0]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(sample.label)
    with pytest.raises(DataError, match=r"labelIds\.png is 4x4 but image .*leftImg8bit\.png is 16x8"):
        read_pair(sample, "cityscapes")


def test_cityscapes_colour_label_is_rejected(tmp_path):
    path = tmp_path / "x_gtFine_labelIds.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match=r"x_gtFine_labelIds\.png has image mode RGB"):
        read_label(path, "cityscapes")


def test_orphan_labels(tmp_path):
    make_cityscapes_tree(tmp_path, cities=("aachen",), n_per_city=2)
    image = tmp_path / "leftImg8bit/val/aachen/aachen_000001_000019_leftImg8bit.png"
    image.unlink()
    assert orphan_labels("cityscapes", tmp_path, "val") == [
        tmp_path / "gtFine/val/aachen/aachen_000001_000019_gtFine_labelIds.png"
    ]
    assert orphan_labels("cityscapes", tmp_path, "train") == []


def test_folder_class_info_and_labels(tmp_path):
    tree = make_folder_tree(tmp_path, classes=("sky", "tree", "house"))
    info = class_info("folder", tmp_path)
    assert info.names == ("sky", "tree", "house")
    assert info.palette == default_palette(3) and info.ignore_index == 255
    samples = list_samples("folder", tmp_path, "train")
    assert [s.name for s in samples] == ["img_000", "img_001", "img_002"]
    assert samples[1].image.suffix == ".jpg"
    for sample in samples + list_samples("folder", tmp_path, "val"):
        split = sample.image.parent.name
        image, label = read_pair(sample, "folder", num_classes=3)
        assert np.array_equal(label, tree.ids[f"{split}/{sample.name}"])
        assert image.shape == (8, 12, 3)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 255}


def test_folder_custom_palette(tmp_path):
    make_folder_tree(tmp_path, classes=("a", "b"), palette=[[1, 2, 3], [4, 5, 6]])
    assert class_info("folder", tmp_path).palette == ((1, 2, 3), (4, 5, 6))


def test_other_kinds_use_cityscapes_classes(tmp_path):
    assert class_info("gta5", tmp_path) is CITYSCAPES
    assert class_info("synthia", tmp_path).num_classes == 19


def test_folder_target_without_train_labels(tmp_path):
    make_folder_tree(tmp_path, target_without_train_labels=True)
    samples = list_samples("folder", tmp_path, "train", require_labels=False)
    assert len(samples) == 3 and all(s.label is None for s in samples)
    with pytest.raises(DataError, match=r"have no label, first: .*images/train/img_000\.png"):
        list_samples("folder", tmp_path, "train")
    assert all(s.label is not None for s in list_samples("folder", tmp_path, "val"))


def test_folder_label_values_outside_classes(tmp_path):
    make_folder_tree(tmp_path, classes=("a", "b"))
    path = tmp_path / "labels/val/img_000.png"
    Image.fromarray(np.array([[0, 1, 7], [255, 9, 1]], np.uint8)).save(path)
    with pytest.raises(DataError, match=r"img_000\.png has values 7, 9 outside classes 0\.\.1"):
        read_label(path, "folder", num_classes=2)
    assert read_label(path, "folder").tolist() == [[0, 1, 7], [255, 9, 1]]


def test_folder_16_bit_label_above_255_is_rejected(tmp_path):
    path = tmp_path / "l.png"
    Image.fromarray(np.array([[1, 300]], np.uint16)).save(path)
    with pytest.raises(DataError, match=r"l\.png has values outside 0\.\.255"):
        read_label(path, "folder")


def test_folder_duplicate_names(tmp_path):
    make_folder_tree(tmp_path)
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tmp_path / "images/val/img_000.jpg")
    with pytest.raises(DataError, match=r"img_000\.jpg and img_000\.png|img_000\.png and img_000\.jpg"):
        list_samples("folder", tmp_path, "val")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "missing"),
        ("{not json", "invalid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"names": ["a"]}', "unknown key"),
        ('{"classes": "a"}', "list of non-empty strings"),
        ('{"classes": ["a", 3]}', "list of non-empty strings"),
        ('{"classes": []}', "1..255 names"),
        ('{"classes": ["a", "a"]}', "duplicate"),
        ('{"classes": ["a", "b"], "palette": [[1, 2, 3]]}', "1 colours for 2 classes"),
        ('{"classes": ["a"], "palette": [[1, 2, 300]]}', "ints 0..255"),
        ('{"classes": ["a"], "palette": [[1, 2]]}', "ints 0..255"),
        ('{"classes": ["a"], "ignore_index": "255"}', "must be an integer"),
        ('{"classes": ["a"], "ignore_index": true}', "must be an integer"),
        ('{"classes": ["a"], "ignore_index": 0}', "must mark ignored pixels with 255"),
    ],
)
def test_malformed_classes_json(tmp_path, content, message):
    if content is not None:
        (tmp_path / "classes.json").write_text(content)
    with pytest.raises(DataError, match=message) as info:
        class_info("folder", tmp_path)
    assert str(tmp_path / "classes.json") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_root(tmp_path, kind):
    with pytest.raises(DataError, match=f"dataset root {tmp_path / 'nope'} does not exist"):
        list_samples(kind, tmp_path / "nope", "train")


@pytest.mark.parametrize(
    "kind, image_dir",
    [("gta5", "images"), ("synthia", "RGB"), ("cityscapes", "leftImg8bit/train"), ("folder", "images/train")],
)
def test_missing_and_empty_image_dir(tmp_path, kind, image_dir):
    with pytest.raises(DataError, match=f"missing image directory {tmp_path / image_dir}"):
        list_samples(kind, tmp_path, "train")
    (tmp_path / image_dir).mkdir(parents=True)
    (tmp_path / image_dir / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"no images in {tmp_path / image_dir}"):
        list_samples(kind, tmp_path, "train")


def test_unknown_kind_and_bad_split(tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset kind 'voc'"):
        list_samples("voc", tmp_path, "train")
    with pytest.raises(ConfigError, match="invalid split name"):
        list_samples("gta5", tmp_path, "../train")


def test_unreadable_image(tmp_path):
    make_gta5_tree(tmp_path, n=1, mismatched=0)
    path = tmp_path / "images/00001.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match=r"cannot read image .*00001\.png"):
        read_image(path)
    with pytest.raises(DataError, match=r"cannot read image .*missing\.png"):
        read_image(tmp_path / "missing.png")


def test_unreadable_label(tmp_path):
    (tmp_path / "l.png").write_bytes(b"garbage")
    for kind in KINDS:
        with pytest.raises(DataError, match=r"cannot read label .*l\.png"):
            read_label(tmp_path / "l.png", kind)


def test_read_image_returns_writable_rgb(tmp_path):
    Image.fromarray(np.full((3, 4), 7, np.uint8)).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8 and image.flags.writeable
    assert (image == 7).all()


def test_messages_are_one_line(tmp_path):
    make_gta5_tree(tmp_path / "g", n=2)
    (tmp_path / "g/labels/00001.png").unlink()
    with pytest.raises(DataError) as info:
        list_samples("gta5", tmp_path / "g", "train")
    assert "\n" not in str(info.value)


def test_16_bit_grayscale_is_scaled_not_white(tmp_path):
    values = (np.arange(16 * 32).reshape(16, 32) * 128).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    rgb = read_image(tmp_path / "g.png")
    expected = np.round(values / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff.*floating-point"):
        read_image(tmp_path / "f.tiff")


def test_jpg_label_is_named_and_histogram_is_in_class_order(tmp_path, capsys):
    data = _folder_pair(tmp_path)
    lab = tmp_path / "A" / "labels" / "train" / "img_000.png"
    Image.open(lab).convert("L").save(lab.with_suffix(".jpg"))
    lab.unlink()
    assert main(["data", "check", *data]) == 1
    out = capsys.readouterr().out
    assert "labels must be PNG" in out and "img_000.jpg" in out
    with pytest.raises(DataError, match="labels must be PNG"):
        from bida.data.listing import list_samples

        list_samples("folder", tmp_path / "A", "train")
    # class order in the histogram, whatever order the splits meet the classes in
    from bida.data.check import check_domain

    (tmp_path / "C" / "images" / "train").mkdir(parents=True)
    (tmp_path / "C" / "labels" / "train").mkdir(parents=True)
    (tmp_path / "C" / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    for i, fill in enumerate((2, 0, 1)):
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "C" / "images" / "train" / f"{i}.png")
        label = np.full((4, 4), fill, np.uint8)
        label[0, 0] = 255
        Image.fromarray(label).save(tmp_path / "C" / "labels" / "train" / f"{i}.png")
    md = check_domain("folder", tmp_path / "C", {"train": True}).to_markdown()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "(" in line]
    assert rows == ["a", "b", "c", "(ignore)"]
