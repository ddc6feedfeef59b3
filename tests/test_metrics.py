"""Tests for wsss_blocks.metrics: confusion matrix, IoU, streaming MeanIoU."""

from __future__ import annotations

import math

import pytest
import torch
from _runtime_helpers import run_gloo

from wsss_blocks import ShapeError
from wsss_blocks.metrics import MeanIoU, confusion_matrix, iou_from_confusion


def conf_oracle(pred, target, c, ignore):
    conf = [[0] * c for _ in range(c)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t == ignore or p == ignore:
            continue
        conf[t][p] += 1
    return torch.tensor(conf, dtype=torch.long)


def iou_oracle(conf):
    c = conf.shape[0]
    ious = []
    for k in range(c):
        tp = int(conf[k, k])
        fn = sum(int(conf[k, j]) for j in range(c) if j != k)
        fp = sum(int(conf[i, k]) for i in range(c) if i != k)
        ious.append(tp / (tp + fn + fp) if tp + fn + fp > 0 else float("nan"))
    present = [v for v in ious if not math.isnan(v)]
    return ious, (sum(present) / len(present) if present else float("nan"))


def random_maps(seed, b=2, h=5, w=6, c=4, ignore=255, p_ignore=0.15):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (b, h, w), generator=gen)
    pred = torch.randint(0, c, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < p_ignore] = ignore
    pred[torch.rand(b, h, w, generator=gen) < p_ignore / 2] = ignore
    return pred, target


def test_confusion_known_answer():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 255]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.dtype == torch.long and conf.shape == (3, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou, miou = iou_from_confusion(conf)
    # class0: tp1 / (gt2 + pred2 - 1) = 1/3; class1: 2/(2+3-2) = 2/3; class2: 1/(2+1-1) = 1/2
    torch.testing.assert_close(iou, torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matches_loop_oracle(seed):
    pred, target = random_maps(seed)
    conf = confusion_matrix(pred, target, 4)
    assert torch.equal(conf, conf_oracle(pred, target, 4, 255))
    iou, miou = iou_from_confusion(conf)
    ref_iou, ref_miou = iou_oracle(conf)
    torch.testing.assert_close(iou, torch.tensor(ref_iou, dtype=torch.float64), equal_nan=True)
    assert miou == pytest.approx(ref_miou, abs=1e-12)


def test_custom_ignore_index_and_any_shape():
    target = torch.tensor([0, 1, -1, 1, 0])
    pred = torch.tensor([0, 1, 1, -1, 1])
    conf = confusion_matrix(pred, target, 2, ignore_index=-1)
    assert conf.tolist() == [[1, 1], [0, 1]]
    assert torch.equal(conf, conf_oracle(pred, target, 2, -1))
    # 255 is now an ordinary out-of-range value
    with pytest.raises(ShapeError, match="masks"):
        confusion_matrix(pred, torch.tensor([0, 1, 255, 1, 0]), 2, ignore_index=-1)


def test_absent_class_excluded_from_mean():
    target = torch.tensor([0, 0, 2, 2])
    pred = torch.tensor([0, 0, 2, 0])
    iou, miou = iou_from_confusion(confusion_matrix(pred, target, 3))
    assert math.isnan(iou[1])
    torch.testing.assert_close(iou[[0, 2]], torch.tensor([2 / 3, 1 / 2], dtype=torch.float64))
    assert miou == pytest.approx((2 / 3 + 1 / 2) / 2)
    # a class only predicted counts (IoU 0)
    iou, miou = iou_from_confusion(confusion_matrix(torch.tensor([1, 0]), torch.tensor([0, 0]), 3))
    assert iou[1] == 0 and math.isnan(iou[2])
    assert miou == pytest.approx(0.25)


def test_all_ignored_gives_nan():
    t = torch.full((2, 3), 255)
    conf = confusion_matrix(torch.zeros(2, 3, dtype=torch.long), t, 2)
    assert conf.sum() == 0
    iou, miou = iou_from_confusion(conf)
    assert torch.isnan(iou).all() and math.isnan(miou)
    m = MeanIoU(2)
    m.update(torch.zeros(2, 3, dtype=torch.long), t)
    out = m.compute()
    assert math.isnan(out.miou) and math.isnan(out.pixel_accuracy)


def test_streaming_equals_one_shot():
    preds, targets = zip(*(random_maps(s, b=1 + s % 3) for s in range(5)), strict=True)
    m = MeanIoU(4)
    for p, t in zip(preds, targets, strict=True):
        m.update(p, t)
    one = confusion_matrix(
        torch.cat([p.flatten() for p in preds]), torch.cat([t.flatten() for t in targets]), 4
    )
    out = m.compute()
    assert torch.equal(out.confusion, one)
    iou, miou = iou_from_confusion(one)
    torch.testing.assert_close(out.per_class, iou, equal_nan=True)
    assert out.miou == miou
    conf = one.double()
    assert out.pixel_accuracy == pytest.approx(float(conf.trace() / conf.sum()))
    recall = conf.diagonal() / conf.sum(1)
    assert out.mean_accuracy == pytest.approx(float(recall.nanmean()))


def test_meaniou_logits_names_state_dict_reset():
    names = ["bg", "a", "b"]
    m = MeanIoU(3, class_names=names)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    m.update(logits, target)
    ref = confusion_matrix(logits.argmax(1), target, 3)
    assert torch.equal(m.confusion, ref)
    out = m.compute()
    assert list(out.per_class_named) == names
    other = MeanIoU(3)
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.confusion, ref)
    m(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
    assert int(m.confusion.sum()) == int(ref.sum()) + 16
    m.reset()
    assert int(m.confusion.sum()) == 0


def test_validation():
    with pytest.raises(ShapeError, match="pred"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ShapeError, match="pred"):
        confusion_matrix(torch.tensor([0, -2]), torch.tensor([0, 1]), 3)
    with pytest.raises(ShapeError, match="masks"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([7, 1]), 3)
    with pytest.raises(ShapeError, match="pred"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), 3)
    with pytest.raises(ShapeError, match="pred"):
        confusion_matrix(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0)
    with pytest.raises(ShapeError, match="conf"):
        iou_from_confusion(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="class_names"):
        MeanIoU(3, class_names=["a"])
    with pytest.raises(ShapeError, match="pred"):
        MeanIoU(3).update(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- distributed


def _rank_confusions(rank: int) -> dict:
    m = MeanIoU(4)
    m.update(*random_maps(rank))
    return {"confusion": m.compute().confusion, "local": m.confusion}


@pytest.mark.slow
def test_meaniou_all_reduce_gloo():
    r0, r1 = run_gloo(_rank_confusions)
    c0 = confusion_matrix(*random_maps(0), 4)
    c1 = confusion_matrix(*random_maps(1), 4)
    assert torch.equal(r0.confusion, c0 + c1) and torch.equal(r1.confusion, c0 + c1)
    assert torch.equal(r0["local"], c0) and torch.equal(r1["local"], c1)
