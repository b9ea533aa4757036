
import numpy as np
import pytest

from bida.labels import (
    CITYSCAPES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    SYNTHIA_13_CLASSES,
    SYNTHIA_16_CLASSES,
    SYNTHIA_ID_TO_TRAIN_ID,
    ClassInfo,
    colorize,
    default_palette,
    lookup_table,
    map_ids,
)

from fixtures import EXPECTED_CITYSCAPES_TRAIN_IDS, EXPECTED_SYNTHIA_TRAIN_IDS  # noqa: E402


def test_cityscapes_names_and_palette():
    assert CITYSCAPES_CLASSES == (
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
        "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
        "bus", "train", "motorcycle", "bicycle",
    )
    assert len(CITYSCAPES_PALETTE) == 19 and len(set(CITYSCAPES_PALETTE)) == 19
    assert CITYSCAPES_PALETTE[0] == (128, 64, 128)
    assert CITYSCAPES_PALETTE[10] == (70, 130, 180)
    assert CITYSCAPES_PALETTE[18] == (119, 11, 32)
    assert IGNORE_INDEX == 255


@pytest.mark.parametrize(
    "table, expected",
    [
        (CITYSCAPES_ID_TO_TRAIN_ID, EXPECTED_CITYSCAPES_TRAIN_IDS),
        (SYNTHIA_ID_TO_TRAIN_ID, EXPECTED_SYNTHIA_TRAIN_IDS),
    ],
    ids=["cityscapes", "synthia"],
)
def test_id_tables_every_entry(table, expected):
    assert table.shape == (256,) and table.dtype == np.uint8
    for raw_id in range(256):
        assert table[raw_id] == expected.get(raw_id, 255), raw_id


def test_id_tables_are_read_only():
    with pytest.raises(ValueError):
        CITYSCAPES_ID_TO_TRAIN_ID[0] = 3


def test_synthia_protocol_subsets():
    assert SYNTHIA_16_CLASSES == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert SYNTHIA_13_CLASSES == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    missing_16 = {CITYSCAPES_CLASSES[c] for c in range(19) if c not in SYNTHIA_16_CLASSES}
    assert missing_16 == {"terrain", "truck", "train"}
    missing_13 = {CITYSCAPES_CLASSES[c] for c in SYNTHIA_16_CLASSES if c not in SYNTHIA_13_CLASSES}
    assert missing_13 == {"wall", "fence", "pole"}
    # every SYNTHIA class the mapping produces is one of the 16
    produced = set(SYNTHIA_ID_TO_TRAIN_ID.tolist()) - {255}
    assert produced == set(SYNTHIA_16_CLASSES)


def test_map_ids_handles_wide_and_negative_ids():
    table = lookup_table({3: 0, 4: 1})
    ids = np.array([[3, 4, 259], [260, 65535, 0]], dtype=np.uint16)
    assert map_ids(ids, table).tolist() == [[0, 1, 255], [255, 255, 255]]
    signed = np.array([[-1, 3]], dtype=np.int32)
    assert map_ids(signed, table).tolist() == [[255, 0]]
    assert map_ids(np.array([[4]], dtype=np.uint8), table).dtype == np.uint8


def test_class_info():
    assert CITYSCAPES.num_classes == 19
    assert CITYSCAPES.ignore_index == 255
    info = ClassInfo(names=("a", "b"), palette=((1, 2, 3), (4, 5, 6)))
    assert info.num_classes == 2 and info.ignore_index == 255


def test_default_palette():
    assert default_palette(0) == ()
    assert default_palette(19) == CITYSCAPES_PALETTE
    assert default_palette(5) == CITYSCAPES_PALETTE[:5]
    many = default_palette(300)
    assert len(set(many)) == 300
    assert (0, 0, 0) not in many
    assert all(0 <= v <= 255 for c in many for v in c)
    assert default_palette(300) == many  # deterministic
    with pytest.raises(ValueError):
        default_palette(-1)


def test_colorize_pixel_by_pixel():
    palette = ((10, 20, 30), (40, 50, 60), (70, 80, 90))
    label = np.array([[0, 1, 2], [255, 2, 7]], dtype=np.uint8)
    rgb = colorize(label, palette)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [40, 50, 60]
    assert rgb[0, 2].tolist() == rgb[1, 1].tolist() == [70, 80, 90]
    assert rgb[1, 0].tolist() == [0, 0, 0]  # ignore
    assert rgb[1, 2].tolist() == [0, 0, 0]  # no colour for class 7


def test_colorize_cityscapes_all_classes():
    label = np.arange(19, dtype=np.uint8).reshape(1, 19)
    assert colorize(label, CITYSCAPES_PALETTE)[0].tolist() == [list(c) for c in CITYSCAPES_PALETTE]


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.int64), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2, 1), np.uint8), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError):
        colorize(np.zeros((2, 2), np.uint8), default_palette(256))
