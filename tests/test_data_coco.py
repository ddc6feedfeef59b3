"""Tests for wsss_blocks.data.coco.COCO on a miniature fake tree (JSON and PNG masks)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wsss_blocks.constants import COCO_CATEGORY_IDS, COCO_CATEGORY_TO_INDEX, COCO_CLASSES
from wsss_blocks.data import (
    COCO,
    TrainTransform,
    collate,
)

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

H, W = 24, 32
# image name -> list of (category_id, box (x0, y0, x1, y1), iscrowd)
ANNS = {
    "COCO_train2014_000000000001": [(1, (2, 2, 20, 18), 0), (90, (10, 6, 16, 12), 0)],
    "COCO_train2014_000000000002": [(18, (0, 0, 32, 24), 1)],
    "COCO_train2014_000000000003": [],  # no annotation
    "COCO_train2014_000000000004": [(3, (4, 4, 12, 12), 0), (62, (8, 8, 28, 22), 0)],
}


def _expected_mask(anns: list) -> np.ndarray:
    """Largest first, so smaller objects end on top; crowd gets its class."""
    m = np.zeros((H, W), np.int64)
    for cid, (x0, y0, x1, y1), _ in sorted(anns, key=lambda a: -(a[1][2] - a[1][0]) * (a[1][3] - a[1][1])):
        m[y0:y1, x0:x1] = COCO_CATEGORY_TO_INDEX[cid] + 1
    return m


def make_coco(tmp: Path, *, json_ann: bool = True, masks: str | None = None) -> Path:
    (tmp / "train2014").mkdir(parents=True)
    images, annotations = [], []
    for i, (name, anns) in enumerate(ANNS.items()):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(tmp / "train2014" / f"{name}.jpg")
        images.append({"id": i + 1, "file_name": f"{name}.jpg", "height": H, "width": W})
        for j, (cid, (x0, y0, x1, y1), crowd) in enumerate(anns):
            # polygon along pixel borders: annToMask fills pixels whose centres are inside
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
            annotations.append({
                "id": 100 * i + j, "image_id": i + 1, "category_id": cid, "iscrowd": crowd,
                "area": float((x1 - x0) * (y1 - y0)), "bbox": [x0, y0, x1 - x0, y1 - y0],
                "segmentation": [poly],
            })
    if json_ann:
        (tmp / "annotations").mkdir()
        cats = [{"id": cid, "name": n, "supercategory": "x"}
                for cid, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]
        (tmp / "annotations" / "instances_train2014.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    if masks is not None:
        d = tmp / "SegmentationClass" / "train2014"
        d.mkdir(parents=True)
        for name, anns in ANNS.items():
            m = _expected_mask(anns)
            if masks == "category_id":
                inv = np.array([0] + list(COCO_CATEGORY_IDS))
                m = inv[m]
            m[0, 0] = 255
            Image.fromarray(m.astype(np.uint8), mode="L").save(d / f"{name}.png")
    return tmp


class _FakeCOCOApi:
    """Minimal stand-in for pycocotools.coco.COCO: boxes of the polygons become masks."""

    def __init__(self, path: str) -> None:
        data = json.loads(Path(path).read_text())
        self.imgs = {im["id"]: im for im in data["images"]}
        self.anns = data["annotations"]

    def getAnnIds(self, imgIds: list[int]) -> list[int]:  # noqa: N802,N803 - pycocotools API
        return [a["id"] for a in self.anns if a["image_id"] in imgIds]

    def loadAnns(self, ids: list[int]) -> list[dict]:  # noqa: N802
        return [a for a in self.anns if a["id"] in ids]

    def annToMask(self, ann: dict) -> np.ndarray:  # noqa: N802
        im = self.imgs[ann["image_id"]]
        m = np.zeros((im["height"], im["width"]), np.uint8)
        x, y, w, h = (int(v) for v in ann["bbox"])
        m[y:y + h, x:x + w] = 1
        return m


@pytest.fixture(params=["pycocotools", "stub"])
def coco_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "pycocotools":
        pytest.importorskip("pycocotools")
    else:
        pkg = types.ModuleType("pycocotools")
        mod = types.ModuleType("pycocotools.coco")
        mod.COCO = _FakeCOCOApi
        pkg.coco = mod
        monkeypatch.setitem(sys.modules, "pycocotools", pkg)
        monkeypatch.setitem(sys.modules, "pycocotools.coco", mod)
    return request.param


def test_json_render(tmp_path: Path, coco_api: str) -> None:
    root = make_coco(tmp_path)
    ds = COCO(root, "train")
    assert ds.source == "json" and ds.num_classes == 80 and ds.class_names == COCO_CLASSES
    # the image without annotations is skipped by default
    assert ds.names == [n for n, a in ANNS.items() if a]
    for i, name in enumerate(ds.names):
        it = ds[i]
        assert it["image"].shape == (3, H, W) and it["mask"].dtype == torch.int64
        assert it["valid"].all() and it["name"] == name
        expected = _expected_mask(ANNS[name])
        assert np.array_equal(it["mask"].numpy(), expected), (coco_api, name)
        labels = torch.zeros(80)
        for cid, _, _ in ANNS[name]:
            labels[COCO_CATEGORY_TO_INDEX[cid]] = 1
        assert torch.equal(it["labels"], labels)
    # category 90 (toothbrush) -> index 79 -> mask value 80; drawn on top of the person
    first = ds[0]["mask"]
    assert int(first[8, 12]) == 80 and int(first[3, 3]) == 1
    all_ds = COCO(root, "train", skip_empty=False)
    assert len(all_ds) == 4 and all_ds[2]["labels"].sum() == 0


@pytest.mark.parametrize("values", ["index", "category_id"])
def test_png_masks(tmp_path: Path, values: str) -> None:
    root = make_coco(tmp_path, json_ann=False, masks=values)
    ds = COCO(root, "train", mask_values=values)
    assert ds.source == "masks" and len(ds) == 4
    for i, name in enumerate(ds.names):
        it = ds[i]
        expected = _expected_mask(ANNS[name])
        expected[0, 0] = 255
        assert np.array_equal(it["mask"].numpy(), expected)
        assert it["labels"].sum() == len({c for c, _, _ in ANNS[name]})


def test_auto_prefers_masks_and_transforms(tmp_path: Path) -> None:
    root = make_coco(tmp_path, json_ann=True, masks="index")
    t = TrainTransform(crop_size=40, scale_range=(1.0, 1.0), generator=torch.Generator().manual_seed(1))
    ds = COCO(root, "train", transform=t)
    assert ds.source == "masks"
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, 40, 40) and batch["valid"].shape == (2, 40, 40)
    assert batch["labels"].shape == (2, 80)
    assert batch["valid"].sum(dim=(1, 2)).tolist() == [H * W, H * W]
    assert (batch["mask"][~batch["valid"]] == 255).all()


def test_split_file_and_label_file(tmp_path: Path) -> None:
    root = make_coco(tmp_path, json_ann=False, masks="index")
    lst = tmp_path / "list.txt"
    lst.write_text("COCO_train2014_000000000004\n")
    lab = tmp_path / "labels.json"
    lab.write_text(json.dumps({"COCO_train2014_000000000004": [5]}))
    ds = COCO(root, "train", split_file=lst, label_file=lab)
    assert ds.names == ["COCO_train2014_000000000004"]
    assert ds[0]["labels"].nonzero().flatten().tolist() == [5]


def test_label_file_only_with_auto_source(tmp_path: Path) -> None:
    root = make_coco(tmp_path, json_ann=False)  # images only: no masks, no JSON
    lab = tmp_path / "labels.json"
    lab.write_text(json.dumps({n: [k] for k, n in enumerate(ANNS)}))
    ds = COCO(root, "train", label_file=lab)
    assert ds.source == "masks" and ds.mask_dir is None and ds.names == sorted(ANNS)
    it = ds[2]
    assert it["labels"].nonzero().flatten().tolist() == [2]
    assert bool((it["mask"] == 255).all()) and it["mask"].shape == (H, W)
    assert repr(ds).startswith("COCO(root=") and "source='masks', n=4" in repr(ds)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        COCO(tmp_path / "nothing")
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="train2014"):
        COCO(tmp_path / "r")
    root = make_coco(tmp_path / "noann", json_ann=False)
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        COCO(root)
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        COCO(root, source="masks")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        COCO(root, source="json")
    with pytest.raises(ValueError, match="split"):
        COCO(root, split="test")
    with pytest.raises(ValueError, match="mask_values"):
        COCO(root, mask_values="rgb")
    root = make_coco(tmp_path / "m", json_ann=False, masks="index")
    (root / "train2014" / "COCO_train2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000002.jpg"):
        COCO(root)


def test_category_table() -> None:
    assert len(COCO_CATEGORY_IDS) == 80 and len(set(COCO_CATEGORY_IDS)) == 80 == len(COCO_CLASSES)
    assert COCO_CATEGORY_IDS[0] == 1 and COCO_CATEGORY_IDS[-1] == 90
    assert [COCO_CATEGORY_TO_INDEX[c] for c in (1, 13, 27, 67, 90)] == [0, 11, 24, 60, 79]
    assert COCO_CLASSES[COCO_CATEGORY_TO_INDEX[67]] == "dining table"
    assert COCO_CLASSES[COCO_CATEGORY_TO_INDEX[18]] == "dog"
