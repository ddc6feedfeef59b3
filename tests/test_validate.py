import numpy as np
import pytest
import torch

from wsss_blocks import ShapeError
from wsss_blocks._validate import (
    check_int,
    check_labels,
    check_option,
    check_range,
    check_shape,
    check_size,
    check_tensor,
    check_thresholds,
    checks_enabled,
)


def test_shape_error_is_value_error():
    assert issubclass(ShapeError, ValueError)


def test_check_shape_binds_and_compares_named_dims():
    dims = check_shape("cam", torch.zeros(2, 3, 4, 5), ["B", "K", "h", "w"])
    assert dims == {"B": 2, "K": 3, "h": 4, "w": 5}
    check_shape("labels", torch.zeros(2, 3), ["B", "K"], dims)
    with pytest.raises(ShapeError, match=r"^labels: expected shape \(B=2, K=3\), got \(3, 3\); B=3"):
        check_shape("labels", torch.zeros(3, 3), ["B", "K"], dims)


def test_check_shape_rank_fixed_and_wildcards():
    with pytest.raises(ShapeError, match=r"^x: expected 3 dims \(B, \*, 4\), got shape \(2, 4\)$"):
        check_shape("x", torch.zeros(2, 4), ["B", None, 4])
    with pytest.raises(ShapeError, match=r"^x: expected shape \(B, \*, 4\), got \(2, 7, 5\)$"):
        check_shape("x", torch.zeros(2, 7, 5), ["B", "*", 4])
    check_shape("x", torch.zeros(2, 7, 4), ["B", "*", 4])


def test_check_tensor_dtype_kinds():
    check_tensor("x", torch.zeros(1), dtype="float")
    check_tensor("x", torch.zeros(1, dtype=torch.long), dtype="int")
    check_tensor("x", torch.zeros(1, dtype=torch.bool), dtype="bool")
    for dt in (torch.bool, torch.long, torch.float16):
        check_tensor("y", torch.zeros(1, dtype=dt), dtype="label")
    with pytest.raises(ShapeError, match="^x: expected a float tensor, got dtype torch.int64$"):
        check_tensor("x", torch.zeros(1, dtype=torch.long), dtype="float")
    with pytest.raises(ShapeError, match="^m: expected a bool tensor"):
        check_tensor("m", torch.zeros(1), dtype="bool")
    with pytest.raises(ShapeError, match="^i: expected an int tensor"):
        check_tensor("i", torch.zeros(1, dtype=torch.bool), dtype="int")
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got list$"):
        check_tensor("x", [1.0])
    with pytest.raises(ValueError, match="dtype kind"):
        check_tensor("x", torch.zeros(1), dtype="complex")


def test_check_labels_values_and_dtypes():
    for labels in (torch.tensor([[1, 0]]), torch.tensor([[True, False]]), torch.tensor([[1.0, 0.0]])):
        assert check_labels("labels", labels) == {"B": 1, "K": 2}
    with pytest.raises(ShapeError, match=r"^labels: expected values in \{0, 1\}, got -1$"):
        check_labels("labels", torch.tensor([[1, -1]]))
    with pytest.raises(ShapeError, match="labels: expected 2 dims"):
        check_labels("labels", torch.tensor([1, 0]))
    check_labels("token_labels", torch.ones(2, 3, 4), pattern=("B", "h", "w"))


def test_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("WSSS_BLOCKS_CHECKS", "0")
    assert not checks_enabled()
    check_shape("x", torch.zeros(2), ["B", "K"])  # no error when disabled
    check_labels("labels", torch.full((1, 2), 3))
    # sizes are still bound (callers read them), without raising on disagreement
    assert check_shape("cam", torch.zeros(2, 3, 4, 5), ["B", "K", "h", "w"]) == {"B": 2, "K": 3, "h": 4, "w": 5}
    assert check_shape("labels", torch.zeros(2, 4), ["B", "K"], {"K": 3}) == {"K": 3, "B": 2}
    from wsss_blocks.cpews import ism_loss

    ism_loss(torch.randn(2, 12, 8), torch.randint(0, 3, (2, 3, 4)))  # was a KeyError
    monkeypatch.setenv("WSSS_BLOCKS_CHECKS", "1")
    assert checks_enabled()


def test_option_threshold_range_size():
    assert check_option("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^mode: expected one of \['a', 'b'\], got 'c'$"):
        check_option("mode", "c", ("a", "b"))
    check_thresholds("low", 0.1, "high", 0.2)
    with pytest.raises(ValueError, match="^low=0.2 must be smaller than high=0.2$"):
        check_thresholds("low", 0.2, "high", 0.2)
    with pytest.raises(ValueError, match="high: expected a finite threshold"):
        check_thresholds("low", 0.2, "high", float("nan"))
    assert check_range("a", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ValueError, match=r"^a: expected a value in \[0.0, 1.0\), got 1.0$"):
        check_range("a", 1.0, 0.0, 1.0, high_inclusive=False)
    with pytest.raises(ValueError, match="got nan"):
        check_range("a", float("nan"))
    assert check_size("size", (3, 4)) == (3, 4)
    for bad in ((3,), (0, 4), None):
        with pytest.raises(ValueError, match="^size: expected"):
            check_size("size", bad)
    for bad in ((2.7, 3.2), (2.0, 3)):  # never truncated
        with pytest.raises(ValueError, match=r"^size\[0\]: expected an int"):
            check_size("size", bad)
    with pytest.raises(TypeError, match=r"^size\[0\]: expected an int, got str"):
        check_size("size", ("a", "b"))


def test_check_int_is_the_one_integer_validator():
    assert check_int("n", 3) == 3
    assert check_int("n", np.int64(4), low=0) == 4
    assert check_int("n", torch.tensor(5)) == 5
    assert type(check_int("n", np.int64(4))) is int
    for bad in (2.7, 2.0, True, float("nan"), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"^n: expected an int, got "):
            check_int("n", bad)
    for bad in ("3", None, [3]):  # not a number at all: a wrong Python type
        with pytest.raises(TypeError, match=r"^n: expected an int, got "):
            check_int("n", bad)
    with pytest.raises(ValueError, match=r"^n: expected an int >= 1, got 0$"):
        check_int("n", 0, low=1)
    with pytest.raises(ValueError, match=r"^n: expected an int <= 2, got 3$"):
        check_int("n", 3, high=2)
    with pytest.raises(ValueError, match=r"^n: expected an int in \[0, 2\], got -1$"):
        check_int("n", -1, low=0, high=2)


def test_integer_arguments_are_not_truncated():
    import timm

    from wsss_blocks.prototypes import kmeans
    from wsss_blocks.tokens import resolve_block_index

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    assert resolve_block_index(model, -1) == 1
    with pytest.raises(ValueError, match="index: expected an int, got 1.9"):
        resolve_block_index(model, 1.9)
    with pytest.raises(ValueError, match="num_clusters: expected an int, got 2.5"):
        kmeans(torch.randn(1, 4, 2), 2.5)
