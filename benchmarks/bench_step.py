"""What a training step costs: every recipe's full step against the plain classification step.

One *step* is what ``examples/train.py`` does per batch, built from the trainer's own pieces
(``_build_net`` / ``TrainNet``, ``build_optimizer``, ``build_scheduler``, ``_optimizer_step``,
``Recipe.after_step``): forward under the run's autocast, the weighted loss sum, backward,
AdamW step, scheduler step and the recipe's state update. The plain step is the ``baseline``
recipe (GMP classifier, multilabel soft margin) on the same backbone; ``swtformer`` needs a
Swin, so it is compared with ``baseline`` on that Swin.

Each recipe runs in a fresh subprocess (so that peak memory is its own): it builds the model,
runs ``--warmup`` steps, then times ``--steps`` steps (median and min of the per-step wall
time; CUDA synchronised). With the defaults (2 + 5) the timed steps are 3..7: cpal's warm-up
recluster at step 4 (``CPAL.update`` runs k-means over its bank) is one of them, so it shows in ``step_max_ms``
but not in the median. Memory: on CUDA ``torch.cuda.max_memory_allocated`` growth over the
allocation after the warm-up steps' first step starts (``peak_extra_mb``); on CPU the growth of
the process's peak resident set (``resource.getrusage(...).ru_maxrss``) from just before the
first step to the end (``maxrss_delta_mb``: the first step's activations, gradients and
optimiser state; tracemalloc does not see torch's allocator). The baseline of each backbone
runs first and again last, and ratios use the mean of the two runs, so load drift on a shared
machine shows up as the difference between them. Periodic work (e.g. cpews' prototype pool
rebuild every ``pool_refresh`` steps) runs only if due within the steps measured.

    python benchmarks/bench_step.py                      # CPU: ViT-S/16 at 224, B=4
    python benchmarks/bench_step.py --device cuda        # GPU: ViT-B/16 at 448, B=4
    python benchmarks/bench_step.py --tiny --out /tmp/s.json   # seconds-long smoke run

Writes ``benchmarks/results/step_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT / "examples")):
    if p not in sys.path:
        sys.path.insert(0, p)

RECIPES = ("baseline", "cpal", "cpews", "doei", "mct", "pcm", "swtformer")
SWIN_ONLY = ("swtformer",)
CONFIGS = {
    # model, img_size, batch, swin model; tiny: a 2-block ViT / 1-1 Swin at 64 px (smoke test)
    # batch 4: pcm's 2x2 mosaic needs B divisible by 4, and every recipe runs the same batch
    "cpu": dict(model="vit_small_patch16_224", img_size=224, batch=4, swin="swin_tiny_patch4_window7_224"),
    "cuda": dict(model="vit_base_patch16_224", img_size=448, batch=4, swin="swin_base_patch4_window7_224"),
    "tiny": dict(model="vit_tiny_patch16_224", img_size=64, batch=4, swin="swin_tiny_patch4_window7_224",
                 vit_args=["--patch-size", "8", "--depth", "4", "--embed-dim", "48", "--num-heads", "3"],
                 swin_args=["--patch-size", "2", "--depths", "1,1,1,1", "--embed-dim", "24", "--num-heads",
                            "1,2,3,6", "--window-size", "4"]),
}


def _maxrss_mb() -> float:
    # ru_maxrss is KiB on Linux (bytes on macOS)
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_one(recipe: str, swin: bool, conf: dict[str, Any], device: str, steps: int, warmup: int,
            num_classes: int) -> dict[str, Any]:
    """Build ``recipe`` with the trainer's code and time ``steps`` full training steps."""
    import torch
    from _config import parse_config
    from _optim import build_optimizer, build_scheduler
    from recipes import LoopServices
    from torch import nn
    from train import _autocast_factory, _build_net, _optimizer_step

    model = conf["swin"] if swin else conf["model"]
    argv = ["--data", "synthetic", "--model", model, "--img-size", str(conf["img_size"]), "--recipe", recipe,
            "--batch-size", str(conf["batch"]), "--device", device, "--iterations", "1000", "--warmup", "0"]
    argv += conf.get("swin_args" if swin else "vit_args", [])
    cfg = parse_config(argv)
    torch.manual_seed(0)
    dev = torch.device(device)
    info = {"num_classes": num_classes, "class_names": ["background", *[f"c{i}" for i in range(num_classes)]],
            "palette": None, "superclasses": None}
    net, _ = _build_net(cfg, info)
    net = net.to(dev).train()
    heads = net.recipe if net.decoder is None else nn.ModuleList([net.recipe, net.decoder])
    optimizer = build_optimizer(net.backbone, heads, lr=cfg.lr, head_lr_mult=cfg.head_lr_mult,
                                weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup=cfg.warmup, max_steps=cfg.iterations,
                                warmup_ratio=cfg.warmup_ratio, power=cfg.power)
    autocast, amp = _autocast_factory(cfg.amp, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")
    gen = torch.Generator().manual_seed(0)
    b, s = conf["batch"], conf["img_size"]

    def make_batch() -> dict[str, Any]:
        labels = (torch.rand(b, num_classes, generator=gen) < 0.2).float()
        labels[:, 0] = 1.0  # every image has a class
        return {"image": torch.randn(b, 3, s, s, generator=gen).to(dev), "labels": labels.to(dev),
                "valid": torch.ones(b, s, s, dtype=torch.bool, device=dev),
                "mask": torch.zeros(b, s, s, dtype=torch.long, device=dev)}

    services = LoopServices(backbone=net.backbone, config=cfg, device=dev,
                            train_eval_loader=lambda n: [make_batch() for _ in range(max(1, n // b))],
                            autocast=autocast, log=lambda msg: None)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(i: int) -> None:
        with autocast():
            terms = net(batch, i)
        total = sum(t.weight * t.value.float() for t in terms.values() if t.weight != 0)
        _optimizer_step(total, optimizer, scaler, net.parameters(), cfg.clip_grad)
        scheduler.step()
        net.recipe.after_step(i, services)

    batch = make_batch()
    sync()
    rss0 = _maxrss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    for i in range(1, warmup + 1):
        step(i)
    times = []
    for i in range(warmup + 1, warmup + steps + 1):
        batch = make_batch()
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
    out = {"recipe": recipe, "model": model, "img_size": s, "batch": b, "amp": amp,
           "step_median_ms": 1e3 * statistics.median(times), "step_min_ms": 1e3 * min(times),
           "step_max_ms": 1e3 * max(times),
           "steps": steps, "warmup": warmup,
           "params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    if dev.type == "cuda":
        out["peak_extra_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        out["maxrss_delta_mb"] = _maxrss_mb() - rss0
    return out


def _subprocess(args: argparse.Namespace, recipe: str, swin: bool) -> dict[str, Any]:
    if args.in_process:  # tests: no interpreter start-up; memory numbers then share one process
        try:
            return run_one(recipe, swin, CONFIGS[args.config], args.device, args.steps, args.warmup,
                           args.num_classes)
        except Exception as err:  # noqa: BLE001 - reported in the JSON like a failed subprocess
            return {"recipe": recipe, "error": repr(err)}
    cmd = [sys.executable, __file__, "--one", recipe, "--device", args.device, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--config", args.config, "--num-classes", str(args.num_classes)]
    if swin:
        cmd.append("--swin")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"recipe": recipe, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--config", default=None, choices=sorted(CONFIGS), help="default: the device's")
    ap.add_argument("--tiny", action="store_true", help="--config tiny --steps 2 --warmup 1")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--num-classes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--in-process", action="store_true", help="no subprocess per recipe (smoke tests)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--swin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.tiny:
        args.config, args.steps, args.warmup = "tiny", 2, 1
    if args.config is None:
        args.config = "cuda" if args.device.startswith("cuda") else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    conf = CONFIGS[args.config]
    if args.one is not None:
        res = run_one(args.one, args.swin, conf, args.device, args.steps, args.warmup, args.num_classes)
        print(json.dumps(res))
        return res

    from _timing import environment

    names = [r for r in args.recipes.split(",") if r]
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    plain: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for swin in (False, True):
        chosen = [r for r in names if (r in SWIN_ONLY) == swin and r != "baseline"]
        if not chosen:
            continue
        plain[swin].append(_subprocess(args, "baseline", swin))
        rows += [_subprocess(args, r, swin) | {"swin": swin} for r in chosen]
        plain[swin].append(_subprocess(args, "baseline", swin))
    for swin, runs in plain.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            continue
        ref_ms = statistics.mean(r["step_median_ms"] for r in ok)
        for row in rows:
            if row.get("swin") == swin and "error" not in row:
                row["vs_plain"] = row["step_median_ms"] / ref_ms
                row["plain_step_ms"] = ref_ms
    env = environment(args.device)
    res = {"device": env["device_name"], "torch": env["torch"], "python": env["python"],
           "threads": env["threads"], "cpu_count": env["cpu_count"], "config": args.config,
           "shapes": {k: v for k, v in conf.items() if not k.endswith("_args")},
           "steps": args.steps, "warmup": args.warmup, "num_classes": args.num_classes,
           "memory": "cuda max_memory_allocated growth" if args.device.startswith("cuda")
           else "peak RSS (ru_maxrss) growth over the first step and after, fresh process per recipe",
           "plain_runs": {"vit" if not s else "swin": runs for s, runs in plain.items() if runs},
           "recipes": rows,
           "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    path = args.out or HERE / "results" / f"step_{'tiny_' if args.config == 'tiny' else ''}{dev}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
