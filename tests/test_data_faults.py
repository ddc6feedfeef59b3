"""File faults in VOC / COCO: every problem raises DataFileError naming the file and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wsss_blocks.data import COCO, VOC, DataFileError

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from test_data_coco import make_coco  # noqa: E402
from test_data_voc import make_voc  # noqa: E402

NAME = "2007_000001"  # the first train_aug item of make_voc, classes {1, 15}


def _voc(tmp: Path) -> tuple[Path, Path]:
    root = make_voc(tmp)
    return root, root / "VOCdevkit" / "VOC2012"


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _read(root: Path, **kw: object) -> dict:
    return VOC(root, "train_aug", **kw)[0]  # type: ignore[arg-type]


def test_truncated_jpeg_names_the_image(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    _cut(base / "JPEGImages" / f"{NAME}.jpg")
    match = rf"JPEGImages/{NAME}.jpg: cannot read the image \(OSError: .*runcated"
    with pytest.raises(DataFileError, match=match) as info:
        _read(root)
    assert info.value.path.endswith(f"{NAME}.jpg") and isinstance(info.value, OSError)


def test_not_an_image_names_the_file(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    (base / "JPEGImages" / f"{NAME}.jpg").write_bytes(b"")
    with pytest.raises(DataFileError, match=rf"{NAME}.jpg: cannot read the image \(UnidentifiedImageError"):
        _read(root)


def test_truncated_png_names_the_mask(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    _cut(base / "SegmentationClassAug" / f"{NAME}.png", 0.6)
    with pytest.raises(DataFileError, match=rf"SegmentationClassAug/{NAME}.png: cannot read the mask"):
        _read(root)


def test_mask_value_outside_the_classes_names_the_mask(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    path = base / "SegmentationClassAug" / f"{NAME}.png"
    m = np.asarray(Image.open(path)).copy()
    m[0, 0] = 30
    Image.fromarray(m, mode="L").save(path)
    with pytest.raises(DataFileError, match=rf"{NAME}.png: mask: values must be 0, 1..20 or 255, got \[1, 15, 30\]"):
        _read(root)
    # a label file gives the labels, but the mask is still checked (it is evaluated against)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({n: [0] for n in VOC(root, "train_aug").names}))
    with pytest.raises(DataFileError, match=rf"{NAME}.png: mask: values must be"):
        _read(root, label_file=labels)


def test_all_ignore_mask_is_an_error_unless_a_label_file_gives_labels(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    path = base / "SegmentationClassAug" / f"{NAME}.png"
    h, w = np.asarray(Image.open(path)).shape
    Image.fromarray(np.full((h, w), 255, np.uint8), mode="L").save(path)
    with pytest.raises(DataFileError, match=rf"{NAME}.png: every pixel is 255 \(ignore\), so the image has no label"):
        _read(root)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({n: [3] for n in VOC(root, "train_aug").names}))
    item = _read(root, label_file=labels)
    assert item["labels"].nonzero().flatten().tolist() == [3] and bool((item["mask"] == 255).all())
    # all background is an image without classes, not a fault
    Image.fromarray(np.zeros((h, w), np.uint8), mode="L").save(path)
    assert float(_read(root)["labels"].sum()) == 0.0


def test_mask_of_another_size_names_mask_and_image(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    Image.fromarray(np.zeros((5, 7), np.uint8), mode="L").save(base / "SegmentationClassAug" / f"{NAME}.png")
    match = rf"{NAME}.png: the mask is 5x7 \(HxW\) but its image .*{NAME}.jpg is 30x40"
    with pytest.raises(DataFileError, match=match):
        _read(root)


def test_rgb_mask_names_the_file(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    Image.new("RGB", (40, 30)).save(base / "SegmentationClassAug" / f"{NAME}.png")
    with pytest.raises(DataFileError, match=rf"{NAME}.png: expected a palette \(P\) or grey \(L\) label PNG"):
        _read(root)


def test_empty_list_and_broken_label_file(tmp_path: Path) -> None:
    root, base = _voc(tmp_path)
    listing = base / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text("\n\n")
    with pytest.raises(DataFileError, match=r"val.txt: the list names no images"):
        VOC(root, "val")
    bad = tmp_path / "labels.npy"
    bad.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataFileError, match=r"labels.npy: cannot read the label file"):
        VOC(root, "train_aug", label_file=bad)


def test_coco_faults_name_the_file(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "c", json_ann=False, masks="index")
    d = root / "SegmentationClass" / "train2014"
    first = sorted(d.glob("*.png"))[0]
    m = np.asarray(Image.open(first)).copy()
    m[1, 1] = 81
    Image.fromarray(m, mode="L").save(first)
    with pytest.raises(DataFileError, match=rf"{first.name}: mask: values must be 0, 1..80 or 255, got .*81"):
        COCO(root, "train")[0]
    for p in d.glob("*.png"):
        p.unlink()
    with pytest.raises(DataFileError, match=r"train2014: COCO 'train': no images found"):
        COCO(root, "train", source="masks")
    broken = make_coco(tmp_path / "j", json_ann=True)
    (broken / "annotations" / "instances_train2014.json").write_text("{not json")
    pytest.importorskip("pycocotools")
    with pytest.raises(DataFileError, match=r"instances_train2014.json: cannot read the annotations"):
        COCO(broken, "train", source="json")
