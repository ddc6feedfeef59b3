"""examples/make_pseudo_masks.py: checkpoint -> VOC-palette pseudo masks (fast, CPU, tiny model)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import make_pseudo_masks as mpm  # noqa: E402
import train  # noqa: E402
from _config import ConfigError  # noqa: E402
from PIL import Image  # noqa: E402

from wsss_blocks.constants import VOC_PALETTE  # noqa: E402

TINY = [
    "--iterations", "2", "--img-size", "32", "--patch-size", "8", "--depth", "2",
    "--embed-dim", "48", "--num-heads", "3", "--batch-size", "4", "--train-length", "10",
    "--eval-every", "2", "--eval-images", "4", "--eval-batch-size", "4", "--vis-images", "0",
    "--warmup", "1", "--log-every", "1", "--no-progress", "--quiet", "--baseline", "off", "--no-plots",
]
QUIET = ["--quiet", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "baseline"
    train.main([*TINY, "--recipe", "baseline", "--output", str(out)])
    return out


def _export(run_dir: Path, out: Path, *extra: str) -> dict:
    return mpm.main(["--checkpoint", str(run_dir), "--output", str(out), *QUIET, *extra])


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_end_to_end_synthetic_palette_values_miou_and_voc_loader(run_dir: Path, tmp_path: Path) -> None:
    from _evaluate import cam_maps

    from wsss_blocks.cam import pseudo_labels
    from wsss_blocks.data import VOC

    out = tmp_path / "masks"
    summary = _export(run_dir, out, "--refine", "none")
    files = sorted(out.glob("*.png"))
    assert [f.stem for f in files] == [f"train_{i:06d}" for i in range(10)]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert summary["written"] == 10 and summary["kept"] == 0
    assert 0.0 <= summary["miou"] <= 1.0 and 0.0 < summary["coverage"] <= 1.0
    assert json.loads((out / "pseudo_masks.json").read_text())["miou"] == summary["miou"]
    net, cfg, dataset = mpm.load_checkpoint_net(run_dir)
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "P" and im.size == (32, 32)
            pal = np.asarray(im.getpalette(), dtype=np.uint8).reshape(-1, 3)
            got = torch.from_numpy(np.asarray(im).astype(np.int64))
        assert np.array_equal(pal, VOC_PALETTE[: len(pal)]) and len(pal) == 256
        assert set(got.unique().tolist()) <= set(range(7)) | {255}
    # known answer: --refine none is the trainer's two-threshold rule on the evaluation CAM
    item = dataset[3]
    cam = cam_maps(net, item["image"][None], item["labels"][None])
    expect = pseudo_labels(cam, item["labels"][None], low=cfg.low, high=cfg.high)[0]
    with Image.open(out / "train_000003.png") as im:
        assert torch.equal(torch.from_numpy(np.asarray(im).astype(np.int64)), expect)
    # the folder loads as a SegmentationClassAug-style folder of a VOC tree
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(
        "\n".join(f.stem for f in files) + "\n")
    for f in files:
        Image.new("RGB", (32, 32)).save(voc / "JPEGImages" / f"{f.stem}.jpg")
    ds = VOC(voc, "train_aug", mask_dir=out)
    assert len(ds) == 10
    with Image.open(files[3]) as im:
        assert torch.equal(ds[3]["mask"], torch.from_numpy(np.asarray(im).astype(np.int64)))


def test_refine_modes_differ_and_par_uses_the_levels(run_dir: Path, tmp_path: Path) -> None:
    from wsss_blocks.refine import crf_available

    modes = ["none", "par", *(["crf", "par+crf"] if crf_available() else [])]
    got = {m: _pngs(tmp_path / m) if _export(run_dir, tmp_path / m, "--refine", m, "--limit", "4") else None
           for m in modes}
    assert all(len(v) == 4 for v in got.values())
    assert got["none"] != got["par"]
    summary = json.loads((tmp_path / "par" / "pseudo_masks.json").read_text())
    assert summary["refine"] == "par" and summary["total_items"] == 4


def test_resume_skips_complete_and_rewrites_truncated(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    _export(run_dir, out, "--limit", "5")
    before = _pngs(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    again = _export(run_dir, out, "--limit", "5")
    assert again["written"] == 0 and again["kept"] == 5 and again["rewritten_broken"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps
    cut = out / "train_000002.png"
    cut.write_bytes(before[cut.name][: len(before[cut.name]) // 2])  # an interrupted copy
    third = _export(run_dir, out, "--limit", "5")
    assert third["rewritten_broken"] == 1 and third["kept"] == 4 and third["written"] == 0
    assert _pngs(out) == before
    assert third["miou"] == again["miou"]  # kept masks are scored too


def test_shards_partition_the_items(run_dir: Path, tmp_path: Path) -> None:
    full = _pngs(tmp_path / "full") if _export(run_dir, tmp_path / "full") else {}
    s0 = _export(run_dir, tmp_path / "sharded", "--rank", "0", "--world", "2")
    part0 = _pngs(tmp_path / "sharded")
    s1 = _export(run_dir, tmp_path / "sharded", "--rank", "1", "--world", "2")
    both = _pngs(tmp_path / "sharded")
    assert s0["written"] == 5 and s1["written"] == 5 and s1["kept"] == 0
    assert sorted(part0) == [f"train_{i:06d}.png" for i in range(0, 10, 2)]
    assert both == full
    assert (tmp_path / "sharded" / "pseudo_masks.rank1of2.json").is_file()


def test_errors_name_the_problem_and_keep_what_is_written(run_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "masks"
    _export(run_dir, out, "--limit", "3")
    before = _pngs(out)
    # an existing mask of another size: stop, name the file, touch nothing
    wrong = out / "train_000001.png"
    im = Image.frombytes("P", (5, 4), bytes(20))
    im.putpalette(VOC_PALETTE.tobytes())
    im.save(wrong)
    wrong_bytes = wrong.read_bytes()
    with pytest.raises(mpm.MaskError, match=r"train_000001.png: the existing mask is 4x5 .* image is 32x32"):
        _export(run_dir, out, "--limit", "3")
    assert wrong.read_bytes() == wrong_bytes
    assert _pngs(out)["train_000000.png"] == before["train_000000.png"]
    # missing crf extra: ImportError naming it, before anything is written
    monkeypatch.setattr(mpm, "crf_available", lambda: False)
    with pytest.raises(ImportError, match=r"crf extra .*wsss_blocks\[crf\]"):
        _export(run_dir, tmp_path / "crf", "--refine", "par+crf")
    assert not (tmp_path / "crf").exists()
    monkeypatch.undo()
    # output folder that cannot be written (a file stands in the way)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"--output: cannot write to .*file.txt"):
        _export(run_dir, blocker / "masks")
    # another recipe than expected, another class count, weights of another recipe
    with pytest.raises(ConfigError, match=r"trained with recipe 'baseline', not 'cpews'"):
        _export(run_dir, tmp_path / "x", "--recipe", "cpews")
    payload = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    payload["config"]["num_classes"] = 20
    torch.save(payload, bad / "classes.pt")
    with pytest.raises(ConfigError, match=r"trained with 20 classes .* has 6 classes"):
        _export(bad / "classes.pt", tmp_path / "x")
    payload["config"]["num_classes"] = 6
    payload["config"]["recipe"] = "pcm"
    torch.save(payload, bad / "recipe.pt")
    with pytest.raises(ConfigError, match=r"weights in .*recipe.pt do not fit recipe 'pcm'"):
        _export(bad / "recipe.pt", tmp_path / "x")
    with pytest.raises(ConfigError, match="--checkpoint: .*not found"):
        _export(tmp_path / "nope", tmp_path / "x")


def test_voc_variable_sizes(tmp_path: Path) -> None:
    from test_train import _fake_voc

    from wsss_blocks.data import VOC

    root = _fake_voc(tmp_path / "voc")
    run = tmp_path / "run"
    train.main([*TINY, "--data", "voc", "--data-root", str(root), "--model", "vit_tiny_patch16_224",
                "--recipe", "baseline", "--workers", "0", "--eval-batch-size", "1", "--output", str(run)])
    shutil.copytree(run, tmp_path / "moved")  # the run folder may move; the data root is overridable
    out = tmp_path / "masks"
    summary = _export(tmp_path / "moved", out, "--data-root", str(root), "--scales", "1.0,0.75", "--flip")
    assert summary["written"] == 4 and summary["data"] == "voc" and 0.0 <= summary["miou"] <= 1.0
    ds = VOC(root, "train_aug", mask_dir=out)
    for i in range(len(ds)):
        item = ds[i]
        with Image.open(out / f"{item['name']}.png") as im:
            assert (im.height, im.width) == tuple(item["image"].shape[-2:])
        assert set(item["mask"].unique().tolist()) <= set(range(21)) | {255}


def test_torchrun_two_ranks_write_everything_once(run_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks split the items; the summary holds the totals and the mIoU over both."""
    import subprocess

    from test_train import _free_port

    single = _export(run_dir, tmp_path / "single")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(EXAMPLES / "make_pseudo_masks.py"),
           "--checkpoint", str(run_dir), "--output", str(out), "--device", "cpu", *QUIET]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "pseudo_masks.json").read_text())
    assert summary["written"] == 10 and summary["world"] == 2 and summary["shard_items"] == 5
    assert summary["miou"] == pytest.approx(single["miou"]) and summary["coverage"] == pytest.approx(single["coverage"])
    assert _pngs(out) == _pngs(tmp_path / "single")
