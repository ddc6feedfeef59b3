"""Markdown tables and inline values for the documentation site, generated from the committed JSON.

The site's hook (``docs/_hooks/results.py``) calls :func:`render` on every page; it replaces

* ``<!-- results: NAME -->`` (optionally ``<!-- results: NAME FILE.json -->``) by the table
  ``NAME`` of :data:`TABLES`, with a line giving its data configuration, seeds, device and source;
* ``<!-- value: EXPR -->`` or ``<!-- value: EXPR | FORMAT -->`` by one number (or a list of
  numbers) read from the JSON: see :func:`evaluate` for ``EXPR`` and :func:`format_value` for
  ``FORMAT``.

A marker that names an unknown table, a missing file or a missing key raises
:class:`ResultsError`, so a broken reference fails the site build.

    python benchmarks/results_tables.py                 # prints every table
    python benchmarks/results_tables.py NAME [FILE]     # prints one table
    python benchmarks/results_tables.py --write-history # rebuilds results/history_cpu.json from git

The training-step, k-means and ISM tables are those of ``benchmarks/perf_tables.py`` (imported
by path, unchanged).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import operator
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

#: short names usable in ``<!-- value: ... -->`` expressions (any file stem of ``RESULTS`` works too)
ALIASES: dict[str, str] = {
    "synthetic": "reproduce_synthetic_cpu.json",
    "seg": "reproduce_seg_cpu.json",
    "matrix": "reproduce_matrix_cpu.json",
    "pretrained": "reproduce_pretrained_cpu.json",
    "pcm": "reproduce_pcm_cpu.json",
    "swt": "reproduce_swtformer_cpu.json",
    "cpal": "reproduce_cpal_cpu.json",
    "rerun": "reproduce_rerun_cpu.json",
    "ssl": "ssl_mechanism_cpu.json",
    "sweep": "doei_sweep_cpu.json",
    "confirm": "doei_af_confirm_cpu.json",
    "history": "history_cpu.json",
    "pilot": "reproduce_matrix_pilot300_cpu.jsonl",
    # outside benchmarks/results: the committed fractal checkpoint's record
    "fractal": "../../examples/weights/vit_tiny_p8_64_fractal.json",
}


class ResultsError(ValueError):
    """A marker that cannot be rendered: unknown table, missing file or key, bad expression."""


# --------------------------------------------------------------------------------------------
# loading


def load(name: str) -> Any:
    """The parsed JSON ``RESULTS / name`` (``.json`` added when missing; ``.jsonl``: a list)."""
    if not name.endswith((".json", ".jsonl")):
        name += ".json"
    path = (RESULTS / name).resolve()
    if not path.is_file():
        raise ResultsError(f"results file not found: {_rel(path)}")
    text = path.read_text()
    try:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ResultsError(f"{name}: not valid JSON ({e})") from e


def _rel(path: Path) -> str:
    path = path.resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _source(*names: str) -> str:
    return ", ".join(f"`{_rel(RESULTS / n)}`" for n in names)


def _perf_tables() -> Any:
    """``benchmarks/perf_tables.py``, imported by path (its behaviour is not changed here)."""
    mod: Any = sys.modules.get("_wsss_perf_tables")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_wsss_perf_tables", HERE / "perf_tables.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_wsss_perf_tables"] = mod
        spec.loader.exec_module(mod)
    mod.RESULTS = RESULTS  # follow this module's RESULTS (tests point it elsewhere)
    return mod


# --------------------------------------------------------------------------------------------
# formatting helpers


def pm(agg: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of ``agg[key]`` (fractions shown in percent)."""
    if key not in agg:
        return "-"
    return f"{scale * agg[key]['mean']:.{digits}f} ± {scale * agg[key]['std']:.{digits}f}"


def pct(x: float, digits: int = 1, sign: bool = False) -> str:
    return f"{100 * x:{'+' if sign else ''}.{digits}f}"


def _seed_list(seeds: Any) -> str:
    return ", ".join(str(s) for s in seeds)


def device(d: dict[str, Any], *, threads: bool = True) -> str:
    """The device line of a result: CPU or GPU, model, threads, torch, load at the start."""
    env = d.get("environment") or {}
    dev = str(d.get("device") or env.get("device") or "cpu")
    name = d.get("cpu") or d.get("device_name") or env.get("device_name") or d.get("machine")
    if dev not in ("cpu", "cuda") and not dev.startswith("cuda"):
        name, dev = name or dev, "cpu"  # step / prototypes files store the CPU model in "device"
    parts = [("GPU" if dev.startswith("cuda") else "CPU") + (f" ({name})" if name else "")]
    n_threads = d.get("threads") or env.get("threads")
    if threads and n_threads:
        parts.append(f"{n_threads} thread{'s' if n_threads != 1 else ''}")
    cores = d.get("cpu_count") or env.get("cpu_count")
    if cores:
        parts.append(f"{cores} cores")
    if d.get("torch") or env.get("torch"):
        parts.append(f"torch {d.get('torch') or env.get('torch')}")
    load_avg = d.get("loadavg_before") or d.get("load_average_at_start")
    if load_avg:
        parts.append(f"load average {load_avg[0]:.1f} at the start")
    return ", ".join(parts)


def caption(*, data: str, seeds: Any = None, dev: str, source: str, note: str = "") -> str:
    """The line under every table: data configuration, seeds, device, source file."""
    bits = [f"**Data:** {data.rstrip('.')}."]
    if seeds is not None:
        bits.append(f"**Seeds:** {seeds if isinstance(seeds, str) else _seed_list(seeds)}.")
    bits.append(f"**Device:** {dev}.")
    bits.append(f"**Source:** {source}.")
    if note:
        bits.append(note)
    return " ".join(bits)


def gpu_note(*stems: str) -> str:
    """"not yet measured on a GPU" unless a ``*_cuda.json`` of the benchmark is committed."""
    found = [f"{s}_cuda.json" for s in stems if (RESULTS / f"{s}_cuda.json").is_file()]
    if found:
        return f"**GPU:** see {_source(*found)}."
    return "**GPU:** not yet measured on a GPU."


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _chance(d: dict[str, Any]) -> str:
    c = d.get("chance")
    if not c:
        return ""
    return (f"Chance levels on the same images: all background {pct(c['all_background'])}, first present "
            f"class everywhere {pct(c['fill_first_present_class'])}.")


def _steps(d: dict[str, Any]) -> str:
    steps = {r["steps"] for runs in d.get("per_seed", {}).values() for r in runs if "steps" in r}
    return "/".join(str(s) for s in sorted(steps)) if steps else "?"


SYNTHETIC_DEFAULT = ("the default synthetic scenes of `examples/train.py` (6 classes in 3 shared-body pairs, "
                     "64 px), tiny random-init ViT (depth 4, width 96, patch 8), batch 16, {steps} steps, "
                     "evaluation on 128 validation images")

# --------------------------------------------------------------------------------------------
# the tables

TABLES: dict[str, Callable[..., str]] = {}
#: the JSON files each table reads (for the tests and the error messages)
TABLE_FILES: dict[str, tuple[str, ...]] = {}


def table(name: str, *files: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        TABLES[name] = fn
        TABLE_FILES[name] = files
        return fn
    return register


def _metric_rows(summary: dict[str, Any], labels: dict[str, str] | None = None,
                 per_seed: dict[str, list[dict[str, Any]]] | None = None, cpu: bool = True) -> list[list[str]]:
    rows = []
    for key, agg in summary.items():
        row = [(labels or {}).get(key, key), pm(agg, "cam_miou"), pm(agg, "cam_miou_best"),
               pm(agg, "pseudo_miou"), pm(agg, "pseudo_coverage")]
        if per_seed is not None:
            row.append(" / ".join(pct(r["cam_miou_best"]) for r in per_seed[key]))
        if cpu:
            row.append(f"{agg['cpu_s']['mean']:.0f}" if "cpu_s" in agg else "-")
        rows.append(row)
    return rows


METRIC_HEAD = ["run", "CAM mIoU (thr 0.3)", "best CAM mIoU", "pseudo mIoU", "coverage"]
MEAN_STD = "mean ± std over seeds, percent"


@table("synthetic", "reproduce_synthetic_cpu.json")
def t_synthetic(name: str = "reproduce_synthetic_cpu.json") -> str:
    """Each paper's direction: baseline, cpews, mct, doei on the default synthetic scenes."""
    d = load(name)
    rows = _metric_rows(d["summary"], per_seed=d["per_seed"])
    return "\n\n".join([
        _table(METRIC_HEAD + ["best CAM mIoU per seed", "CPU s"], rows),
        caption(data=SYNTHETIC_DEFAULT.format(steps=_steps(d)) + "; " + MEAN_STD, seeds=d["seeds"],
                dev=device(d), source=_source(name), note=_chance(d)),
    ])


@table("synthetic-directions", "reproduce_synthetic_cpu.json")
def t_synthetic_directions(name: str = "reproduce_synthetic_cpu.json") -> str:
    """Differences of the seed means (points) from the same file."""
    d = load(name)
    dirs = d["directions"]
    rows = [[f"{k} − baseline", pct(v["cam_miou_best_delta_vs_baseline"], sign=True),
             pct(v["pseudo_miou_delta_vs_baseline"], sign=True)]
            for k, v in dirs.items() if isinstance(v, dict)]
    if "doei_vs_mct_cam_miou_best" in dirs:
        rows.append(["doei − mct", pct(dirs["doei_vs_mct_cam_miou_best"], sign=True), "-"])
    return "\n\n".join([
        _table(["difference of seed means", "best CAM mIoU (points)", "pseudo mIoU (points)"], rows),
        caption(data="the runs of the table above", seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


def _options(opts: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in opts.items()) or "defaults"


@table("doei-sweep", "doei_sweep_cpu.json")
def t_doei_sweep(name: str = "doei_sweep_cpu.json") -> str:
    d = load(name)
    rows = []
    for key, agg in d["summary"].items():
        cfg = d["configs"][key]
        rows.append([key, f"`{cfg['recipe']}` " + _options(cfg["opts"]), pm(agg, "cam_miou_best"),
                     " / ".join(pct(r["cam_miou_best"]) for r in d["per_seed"][key]),
                     pm(agg, "pseudo_miou"), pm(agg, "pseudo_coverage")])
    best = d.get("best_of_sweep_by_cam_miou_best", "")
    return "\n\n".join([
        _table(["run", "recipe and options", "best CAM mIoU", "per seed", "pseudo mIoU", "coverage"], rows),
        caption(data="MCT + DOEI, one factor at a time around the defaults plus the paper's Table 4 ablation; "
                     + SYNTHETIC_DEFAULT.format(steps=_steps(d)) + "; unrefined attention CAMs of all blocks; "
                     + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name),
                note=f"Highest mean best CAM mIoU of the sweep: {best}." if best else ""),
    ])


@table("doei-af-confirm", "doei_af_confirm_cpu.json")
def t_doei_af_confirm(name: str = "doei_af_confirm_cpu.json") -> str:
    d = load(name)
    rows = [[k, pm(agg, "cam_miou_best"), " / ".join(pct(r["cam_miou_best"]) for r in d["per_seed"][k]),
             pm(agg, "pseudo_miou"), pm(agg, "pseudo_coverage")] for k, agg in d["summary"].items()]
    a, b = list(d["summary"])[:2]
    rows.append([f"paired difference {b} − {a}", "", " / ".join(
        pct(x, sign=True) for x in d["paired_diff_cam_miou_best"]), "", ""])
    return "\n\n".join([
        _table(["run", "best CAM mIoU", "per seed", "pseudo mIoU", "coverage"], rows),
        caption(data="the sweep's best setting against the defaults on seeds the sweep did not use; "
                     + SYNTHETIC_DEFAULT.format(steps=_steps(d)) + "; " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


@table("seg", "reproduce_seg_cpu.json")
def t_seg(name: str = "reproduce_seg_cpu.json") -> str:
    d = load(name)
    rows = []
    for key, agg in d["summary"].items():
        rows.append([key, pm(agg, "cam_miou"), pm(agg, "cam_miou_best"), pm(agg, "pseudo_miou"),
                     pm(agg, "pseudo_coverage"), pm(agg, "seg_miou"), pm(agg, "seg_crf_miou"),
                     f"{agg['cpu_s']['mean']:.0f}"])
    return "\n\n".join([
        _table(METRIC_HEAD + ["seg mIoU", "seg + CRF mIoU", "CPU s"], rows),
        caption(data=SYNTHETIC_DEFAULT.format(steps=_steps(d)) + "; `--seg --seg-crf` adds the LargeFOV "
                     "decoder (loss from half the schedule) and the CRF evaluation; seg mIoU is the decoder's "
                     "argmax (single scale, no image labels), seg + CRF the same probabilities after the "
                     "dense CRF; " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name), note=_chance(d)),
    ])


REFINES = ("none", "par", "crf", "par+crf")


@table("seg-masks", "reproduce_seg_cpu.json")
def t_seg_masks(name: str = "reproduce_seg_cpu.json") -> str:
    d = load(name)
    tm = d["train_masks"]
    rows = []
    for key, modes in tm["summary"].items():
        rows.append([key] + [f"{pm(modes[m], 'miou')} / {pct(modes[m]['coverage']['mean'], 0)}"
                             if m in modes else "-" for m in REFINES])
    return "\n\n".join([
        _table(["run"] + [f"`{m}` mIoU / coverage" for m in REFINES], rows),
        caption(data=f"`examples/make_pseudo_masks.py` on the first {tm['images']} training images of each "
                     "CAM-only run of the table above (single-scale CAM, low 0.25 / high 0.7, `--refine` per "
                     "column); mIoU on the confident pixels, coverage = confident share; " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


@table("seg-deltas", "reproduce_seg_cpu.json")
def t_seg_deltas(name: str = "reproduce_seg_cpu.json") -> str:
    d = load(name)
    rows = []
    for r, c in d["comparisons"].items():
        masks = d["train_masks"]["summary"].get(r, {})
        none = masks.get("none", {}).get("miou", {}).get("mean")
        mask_cells = [pct(masks[m]["miou"]["mean"] - none, sign=True) if none is not None and m in masks else "-"
                      for m in ("par", "crf", "par+crf")]
        rows.append([r, pct(c["seg_miou_minus_cam_miou_best_of_same_run"], sign=True),
                     pct(c["seg_miou_minus_cam_miou_best_without_seg"], sign=True),
                     pct(c["cam_miou_best_with_seg_minus_without"], sign=True),
                     pct(c["pseudo_miou_with_seg_minus_without"], sign=True),
                     pct(c["seg_crf_miou_minus_seg_miou"], sign=True), *mask_cells])
    return "\n\n".join([
        _table(["recipe", "seg − best CAM (same run)", "seg − best CAM (CAM-only run)", "best CAM: with − without "
                "`--seg`", "pseudo: with − without `--seg`", "CRF on the decoder", "masks: `par` − `none`",
                "`crf` − `none`", "`par+crf` − `none`"], rows),
        caption(data="differences of seed means (mIoU points) of the two tables above", seeds=d["seeds"],
                dev=device(d), source=_source(name)),
    ])


@table("pretrained", "reproduce_pretrained_cpu.json")
def t_pretrained(name: str = "reproduce_pretrained_cpu.json") -> str:
    d = load(name)
    rows = _metric_rows(d["summary"], per_seed=d["per_seed"])
    return "\n\n".join([
        _table(["recipe, regime"] + METRIC_HEAD[1:] + ["best CAM mIoU per seed", "CPU s"],
               [[r[0].replace(" | ", ", ")] + r[1:] for r in rows]),
        caption(data=SYNTHETIC_DEFAULT.format(steps=_steps(d)) + f", from random init and from `{d['weights']}`; "
                     "mct / doei unrefined (all blocks) in both regimes, cpews with the paper-form SSL; "
                     + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name), note=_chance(d)),
    ])


@table("pretrained-change", "reproduce_pretrained_cpu.json")
def t_pretrained_change(name: str = "reproduce_pretrained_cpu.json") -> str:
    d = load(name)
    s, change, vs = d["summary"], d["pretrained_minus_random"], d["best_cam_minus_baseline_per_regime"]
    rows = []
    for recipe, ch in change.items():
        rnd, pre = s[f"{recipe} | random init"], s[f"{recipe} | fractal-pretrained"]
        rows.append([recipe, pm(rnd, "cam_miou_best"), pm(pre, "cam_miou_best"), pct(ch["cam_miou_best"], sign=True),
                     pm(rnd, "pseudo_miou"), pm(pre, "pseudo_miou"),
                     pct(vs["random init"][recipe], sign=True) if recipe in vs["random init"] else "-",
                     pct(vs["fractal-pretrained"][recipe], sign=True) if recipe in vs["fractal-pretrained"] else "-"])
    return "\n\n".join([
        _table(["recipe", "best CAM mIoU, random init", "best CAM mIoU, pretrained", "change", "pseudo mIoU, random "
                "init", "pseudo mIoU, pretrained", "− baseline, random init", "− baseline, pretrained"], rows),
        caption(data="the runs of the table above; changes and differences to the baseline of the same regime "
                     "are differences of seed means in points", seeds=d["seeds"], dev=device(d),
                source=_source(name)),
    ])


@table("fractal-checkpoint")
def t_fractal() -> str:
    f = load(ALIASES["fractal"])
    lp, cfg = f["linear_probe"], f["config"]
    rnd = lp["random_init_seeds_0_1_2"]
    rows = [
        ["training", f"{cfg['iterations']} steps, batch {cfg['batch_size']}, {cfg['classes']} fractal classes, "
                     f"{f['train_time_s'] / 60:.0f} min",
         f"accuracy over the last 25 steps {pct(f['final_train']['accuracy_last_25_steps'], 0)} %"],
        ["linear probe: per-patch labels (mIoU)", pct(lp["fractal_pretrained"]["patch_miou"]),
         "random init, 3 seeds: " + ", ".join(pct(x) for x in rnd["patch_miou"])],
        ["linear probe: image labels (mAP)", pct(lp["fractal_pretrained"]["image_map"]),
         "random init, 3 seeds: " + ", ".join(pct(x) for x in rnd["image_map"])],
    ]
    return "\n\n".join([
        _table(["", "fractal-pretrained checkpoint", "reference"], rows),
        caption(data=f"ViT depth {cfg['depth']}, width {cfg['embed_dim']}, patch {cfg['patch_size']}, "
                     f"{cfg['img_size']} px; linear probe: {lp['what']}", seeds=f"pretraining seed {cfg['seed']}",
                dev=f"CPU, {cfg['threads']} thread ({f['machine']})",
                source="`examples/weights/vit_tiny_p8_64_fractal.json`"),
    ])


def _matrix_data_line(d: dict[str, Any]) -> str:
    return (f"tiny random-init ViT (depth 4, width 96, patch 8), batch 16, {d['steps']} steps, best CAM mIoU over "
            "background thresholds on 128 validation images")


@table("matrix-configs", "reproduce_matrix_cpu.json")
def t_matrix_configs(name: str = "reproduce_matrix_cpu.json") -> str:
    d = load(name)
    rows = []
    for cfg, c in d["configs"].items():
        scene = _options(c.get("scene", {})) if c.get("scene") else "the defaults (6 classes, superclass = body pair)"
        path = ("written as a VOC tree by `examples/synthetic_to_voc.py`, trained with `--data voc`"
                if c.get("voc") else "generated on the fly (`--data synthetic`)")
        rows.append([f"`{cfg}`", scene, f"{c['img_size']} px", path, str(len(d["config_rows"].get(cfg, [])))])
    return "\n\n".join([
        _table(["configuration", "`SyntheticScenes` options", "image size", "data path", "rows run"], rows),
        caption(data=_matrix_data_line(d), seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


@table("matrix", "reproduce_matrix_cpu.json")
def t_matrix(name: str = "reproduce_matrix_cpu.json", metric: str = "cam_miou_best") -> str:
    d = load(name)
    cfgs = list(d["summary"])
    rows = []
    for r in d["rows"]:
        cells = []
        for c in cfgs:
            a = d["summary"][c].get(r)
            cells.append("" if a is None else f"{pm(a, metric)} (n={a['n']})")
        if any(cells):
            rows.append([r] + cells)
    return "\n\n".join([
        _table(["run"] + [f"`{c}`" for c in cfgs], rows),
        caption(data=_matrix_data_line(d) + "; mean ± std over the seeds run (n), percent", seeds=d["seeds"],
                dev=device(d), source=_source(name)),
    ])


def _merged_order(lists: list[list[str]]) -> list[str]:
    """Keys of several ordered lists in one order that keeps each list's order where it can."""
    out: list[str] = []
    for keys in lists:
        prev: str | None = None
        for k in keys:
            if k not in out:
                out.insert(out.index(prev) + 1 if prev is not None and prev in out else len(out), k)
            prev = k
    return out


@table("matrix-verdicts", "reproduce_matrix_cpu.json")
def t_matrix_verdicts(name: str = "reproduce_matrix_cpu.json") -> str:
    d = load(name)
    v = d["verdicts"]
    cfgs = list(v)
    rows = []
    for key in _merged_order([list(v[c]) for c in cfgs]):
        cells = []
        for c in cfgs:
            e = v[c].get(key)
            if e is None:
                cells.append("")
                continue
            dd = e["delta_best_cam_miou"]
            cells.append(f"{pct(dd['mean'], sign=True)} {e['verdict']} (n={len(dd['seeds'])})")
        rows.append([key] + cells)
    return "\n\n".join([
        _table(["comparison (best CAM mIoU, paired)"] + [f"`{c}`" for c in cfgs], rows),
        caption(data=_matrix_data_line(d) + f"; mean paired difference in points; rule: {d['verdict_rule']}",
                seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


@table("matrix-pilot", "reproduce_matrix_pilot300_cpu.jsonl")
def t_matrix_pilot(name: str = "reproduce_matrix_pilot300_cpu.jsonl") -> str:
    runs = load(name)
    rows = [[f"`{r['config']}`", r["row"], str(r["seed"]), str(r["steps"]), pct(r["cam_miou_best"]),
             pct(r["pseudo_miou"]), pct(r["pseudo_coverage"])] for r in runs]
    seeds = sorted({r["seed"] for r in runs})
    steps = sorted({r["steps"] for r in runs})
    return "\n\n".join([
        _table(["configuration", "run", "seed", "steps", "best CAM mIoU", "pseudo mIoU", "coverage"], rows),
        caption(data=f"pilot of the matrix at {'/'.join(map(str, steps))} steps, one seed, percent",
                seeds=seeds, dev="CPU (threads and torch not recorded in this file)", source=_source(name)),
    ])


SSL_PAPER_FORM = "paper form (raw CAM logits, mean over Phi)"  # the key of SSL in the paper's form
SSL_VARIANTS = {
    "cam_scale=max": "`ssl_cam_scale=\"max\"`",
    "denominator=gate": "`ssl_denominator=\"gate\"`",
    "max + gate": "max and gate",
}


def _ssl_runs(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``config -> the run of its first (only) seed``."""
    return {cfg: runs[sorted(runs)[0]] for cfg, runs in d["results"].items()}


def _ssl_ratio(g: dict[str, float]) -> float:
    return g["grad/ssl/backbone"] / g["grad/cls_final/backbone"]


def _ssl_caption(d: dict[str, Any], name: str) -> str:
    seeds = sorted({s for runs in d["results"].values() for s in runs})
    return caption(data=f"`benchmarks/ssl_mechanism.py`: the `cpews` recipe with the paper-form SSL, {d['steps']}; "
                        "synthetic configurations of the robustness matrix", seeds=seeds,
                   dev=f"CPU (threads not recorded in this file), torch {d.get('torch', '?')}", source=_source(name))


@table("ssl-mechanism", "ssl_mechanism_cpu.json")
def t_ssl_mechanism(name: str = "ssl_mechanism_cpu.json") -> str:
    d = load(name)
    runs = _ssl_runs(d)
    table_key = "superclass table (paper)"
    cols = list(runs)

    def row(title: str, fn: Callable[[dict[str, Any]], str]) -> list[str]:
        return [title] + [fn(runs[c]) for c in cols]

    rows = [
        row("`Phi` tokens on the class's own context (the false activation SSL is for)",
            lambda r: f"{pct(r['suppression_set'][table_key]['phi_share']['own_context'])} %"),
        row("`Phi` tokens on the class's own object (part + body)",
            lambda r: f"{pct(r['suppression_set'][table_key]['phi_share']['own_part'] + r['suppression_set'][table_key]['phi_share']['own_body'])} %"),  # noqa: E501
        row("share of the class's activated own-object tokens suppressed",
            lambda r: f"{pct(r['suppression_set'][table_key]['own_object_share_suppressed'])} %"),
        row("SSL / classification gradient norm at the pool build, backbone (paper form)",
            lambda r: f"{_ssl_ratio(r['grad_norms_at_pool_step (ssl weight 0.2)'][SSL_PAPER_FORM]):.1f}x"),
    ]
    return "\n\n".join([_table([""] + [f"`{c}`" for c in cols], rows), _ssl_caption(d, name)])


@table("ssl-gradients", "ssl_mechanism_cpu.json")
def t_ssl_gradients(name: str = "ssl_mechanism_cpu.json") -> str:
    d = load(name)
    runs = _ssl_runs(d)
    cols = list(runs)
    variants = list(next(iter(runs.values()))["grad_norms_at_pool_step (ssl weight 0.2)"])
    rows = [[SSL_VARIANTS.get(v, v)]
            + [f"{_ssl_ratio(runs[c]['grad_norms_at_pool_step (ssl weight 0.2)'][v]):.2f}x" for c in cols]
            for v in variants]
    return "\n\n".join([
        _table(["SSL form (weight 0.2)"] + [f"`{c}`: SSL / classification, backbone" for c in cols], rows),
        _ssl_caption(d, name)])


@table("ssl-filter", "ssl_mechanism_cpu.json")
def t_ssl_filter(name: str = "ssl_mechanism_cpu.json") -> str:
    d = load(name)
    runs = _ssl_runs(d)
    rows = []
    for cfg, r in runs.items():
        for key, s in r["suppression_set"].items():
            rows.append([f"`{cfg}`", key, ", ".join(str(x) for x in s["kept_negatives_per_class"]),
                         f"{s['phi_tokens']:.0f}", f"{pct(s['phi_share']['own_context'])} %",
                         f"{pct(s['phi_share']['own_part'] + s['phi_share']['own_body'])} %"])
    return "\n\n".join([
        _table(["configuration", "suppression set", "negatives kept per class", "`Phi` tokens", "on own context",
                "on own object"], rows),
        _ssl_caption(d, name)])


def _per_seed_rows(d: dict[str, Any], labels: dict[str, str] | None = None) -> list[list[str]]:
    return _metric_rows(d["summary"], labels=labels, per_seed=d["per_seed"])


@table("pcm", "reproduce_pcm_cpu.json")
def t_pcm(name: str = "reproduce_pcm_cpu.json") -> str:
    d = load(name)
    return "\n\n".join([
        _table(METRIC_HEAD + ["best CAM mIoU per seed", "CPU s"], _per_seed_rows(d)),
        caption(data=SYNTHETIC_DEFAULT.format(steps=_steps(d)) + "; the pcm CAM is "
                     "`(Q_k / (Q_k + Q_0))^gamma` of the label-renormalised patch probabilities; " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name), note=_chance(d)),
    ])


SWT_LABELS = {
    "v1": "v1 (CLS; CAM head)",
    "v2_cls": "v2, CLS only (R-CAM of an untrained HFF)",
    "v2_cls_gsc": "v2, CLS + GSC",
    "v2_cls_gsc_ccl": "v2, CLS + GSC + CCL (full V2)",
    "v2_bg_scale1": "v2 full, `bg_scale=1` (diagnostic)",
}


@table("swtformer", "reproduce_swtformer_cpu.json")
def t_swtformer(name: str = "reproduce_swtformer_cpu.json") -> str:
    d = load(name)
    rows = _per_seed_rows(d, SWT_LABELS)
    for row, key in zip(rows, d["summary"], strict=True):
        row.insert(1, _options(d["rows"].get(key, {})))
    return "\n\n".join([
        _table(["run", "options"] + METRIC_HEAD[1:] + ["best CAM mIoU per seed", "CPU s"], rows),
        caption(data="the default synthetic scenes (64 px), tiny random-init Swin (" + " ".join(d["swin_flags"])
                     + f"), batch 16, {_steps(d)} steps, 128 validation images; V2 rows evaluate the foreground "
                     "R-CAM (area-pooled to the stride-32 grid), V1 the CAM head; " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name), note=_chance(d)),
    ])


SWT_DIRECTIONS = {
    "table3_gsc_over_cls": "+GSC over CLS (the paper's Table 3, row 1 = V1)",
    "table3_ccl_over_gsc": "+CCL over +GSC",
    "v2_over_v1": "V2 over V1",
    "bg_scale1_over_v2": "`bg_scale=1` over V2 (not in the paper)",
}


@table("swtformer-directions", "reproduce_swtformer_cpu.json")
def t_swtformer_directions(name: str = "reproduce_swtformer_cpu.json") -> str:
    d = load(name)
    dirs = d["directions_cam_miou_best"]
    paper = dirs.get("paper", {})
    rows = [[SWT_DIRECTIONS.get(k, k), pct(v, sign=True), f"{paper[k]:+.2f}" if k in paper else "-"]
            for k, v in dirs.items() if k != "paper"]
    return "\n\n".join([
        _table(["step", "here: best CAM mIoU (points)", f"paper: {paper.get('unit', '')}"], rows),
        caption(data="differences of seed means of the table above; the paper's column is its VOC result",
                seeds=d["seeds"], dev=device(d), source=_source(name)),
    ])


@table("cpal", "reproduce_cpal_cpu.json")
def t_cpal(name: str = "reproduce_cpal_cpu.json") -> str:
    d = load(name)
    rows = _per_seed_rows(d)
    paired = d["paired_best_cam_vs_baseline"]
    for row, key in zip(rows, d["summary"], strict=True):
        row.insert(-1, " / ".join(pct(x, sign=True) for x in paired[key]) if key in paired else "-")
    return "\n\n".join([
        _table(METRIC_HEAD + ["best CAM mIoU per seed", "paired − baseline", "CPU s"], rows),
        caption(data=SYNTHETIC_DEFAULT.format(steps=_steps(d)) + ", GMP classifier, `--recipe cpal`; the CAM is "
                     "the classifier's (no PACAM at inference); " + MEAN_STD,
                seeds=d["seeds"], dev=device(d), source=_source(name), note=_chance(d)),
    ])


@table("cpal-previous", "history_cpu.json")
def t_cpal_previous(name: str = "history_cpu.json") -> str:
    h = load(name)
    (entry,) = h["files"]["reproduce_cpal_cpu.json"]
    d = entry["data"]
    rows = _per_seed_rows(d)
    paired = d.get("paired_best_cam_vs_baseline", {})
    for row, key in zip(rows, d["summary"], strict=True):
        row.insert(-1, " / ".join(pct(x, sign=True) for x in paired[key]) if key in paired else "-")
    return "\n\n".join([
        _table(METRIC_HEAD + ["best CAM mIoU per seed", "paired − baseline", "CPU s"], rows),
        caption(data="the same runs before the k-means++ sampling change (other k-means draws for the same seed); "
                     + MEAN_STD, seeds=d["seeds"], dev=device(d),
                source=_source(name) + f" (`reproduce_cpal_cpu.json` as of commit {entry['commit']})"),
    ])


@table("rerun", "reproduce_rerun_cpu.json")
def t_rerun(name: str = "reproduce_rerun_cpu.json") -> str:
    d = load(name)
    rows = []
    for key, r in d["rows"].items():
        for s in r["per_seed"]:
            rows.append([key, f"`{r['source']}`", str(s["seed"]),
                         f"{s['cam_miou_best_committed']:.1f} → {s['cam_miou_best_rerun']:.1f}",
                         f"{s['pseudo_miou_committed']:.1f} → {s['pseudo_miou_rerun']:.1f}"])
    return "\n\n".join([
        _table(["row", "committed in", "seed", "best CAM mIoU, committed → rerun", "pseudo mIoU, committed → rerun"],
               rows),
        caption(data="committed reproduction rows rerun with their recorded options and seeds on the current code "
                     "(default synthetic configuration only), percent", seeds=d["seeds"], dev=device(d),
                source=_source(name)),
    ])


# ---- performance ------------------------------------------------------------------------------


def _perf(fn_name: str, name: str) -> str:
    load(name)  # raises when missing (perf_tables would print a placeholder instead)
    out = getattr(_perf_tables(), fn_name)(name)
    if out.startswith("(no "):
        raise ResultsError(f"perf_tables.{fn_name}: no {name}")
    return out.rstrip("\n")


@table("kmeans", "prototypes_t1_cpu.json")
def t_kmeans(name: str = "prototypes_t1_cpu.json") -> str:
    return _perf("kmeans_table", name) + "\n\n" + gpu_note("prototypes", "prototypes_d768")


@table("step", "step_cpu.json")
def t_step(name: str = "step_cpu.json") -> str:
    return _perf("step_table", name) + "\n\n" + gpu_note("step")


@table("ism", "cpews_ism_floor_cpu.json")
def t_ism(name: str = "cpews_ism_floor_cpu.json") -> str:
    return _perf("ism_table", name) + "\n\n" + gpu_note("cpews_ism_floor", "cpews")


def _history(name: str, file: str) -> list[tuple[str, dict[str, Any]]]:
    h = load(name)
    return [(f"commit {e['commit']}", e["data"]) for e in h["files"].get(file, [])] + [("current", load(file))]


@table("kmeans-history", "history_cpu.json", "prototypes_t1_cpu.json", "prototypes_t2_cpu.json", "prototypes_cpu.json")
def t_kmeans_history(name: str = "history_cpu.json") -> str:
    rows = []
    for file in ("prototypes_t1_cpu.json", "prototypes_t2_cpu.json", "prototypes_cpu.json"):
        for when, r in _history(name, file):
            q = r["cpu_time_ratios"]
            load_avg = r.get("loadavg_before")
            rows.append([f"`{file}`", when, str(r["threads"]), f"{load_avg[0]:.1f}" if load_avg else "-",
                         f"{q['kmeans_vs_floor']:.2f}x", f"{q['lloyd_vs_floor']:.2f}x", f"{q['seed_vs_floor']:.2f}x",
                         f"{q['speedup_vs_sklearn']:.2f}x" if q.get("speedup_vs_sklearn") else "-",
                         f"{q['speedup_vs_loop']:.2f}x" if q.get("speedup_vs_loop") else "-"])
    return "\n\n".join([
        _table(["file", "version", "threads", "load average", "k-means / floor", "Lloyd / its matmuls",
                "seeding / its matvecs", "speed-up over scikit-learn", "over the loop"], rows),
        caption(data="`prototypes.kmeans` on (21, 1000, 256), 50 centres, 20 Lloyd steps; CPU-time ratios; every "
                     "committed version of the k-means results", dev="CPU (x86_64, 2 cores)",
                source=_source(name, "prototypes_t1_cpu.json", "prototypes_t2_cpu.json", "prototypes_cpu.json"),
                note=gpu_note("prototypes", "prototypes_d768")),
    ])


@table("bank", "prototypes_cpu.json")
def t_bank(name: str = "prototypes_cpu.json") -> str:
    r = load(name)
    rows = [["`ClassBank.update` (batched)", f"{r['bank_update_batched_ms']:.2f} ms"],
            ["per-item loop", f"{r['bank_update_loop_ms']:.2f} ms"],
            ["speed-up", f"{r['bank_speedup']:.1f}x"]]
    s = r["shapes"]
    return "\n\n".join([
        _table(["", "wall time"], rows),
        caption(data=f"bank of {s['classes']} classes x {s['capacity']} slots x {s['dim']}, a batch of "
                     f"{s['batch']} images; median of {s['repeats']} rounds", dev=device(r), source=_source(name),
                note=gpu_note("prototypes")),
    ])


@table("step-history", "history_cpu.json", "step_cpu.json")
def t_step_history(name: str = "history_cpu.json") -> str:
    versions = _history(name, "step_cpu.json")
    recipes: list[str] = []
    for _, r in versions:
        recipes += [x["recipe"] for x in r["recipes"] if x["recipe"] not in recipes]
    rows = []
    for when, r in versions:
        by = {x["recipe"]: x for x in r["recipes"]}
        load_avg = r.get("loadavg_before")
        rows.append([when, f"{load_avg[0]:.1f}" if load_avg else "-"]
                    + [f"{by[x]['vs_plain']:.2f}x" if x in by and "vs_plain" in by[x] else "-" for x in recipes])
    return "\n\n".join([
        _table(["version", "load average"] + recipes, rows),
        caption(data="one training step of each recipe against the plain step (`vs plain step`), "
                     "vit_small_patch16_224 at 224, B=4 (swtformer: Swin-T); every committed version of the "
                     "training-step results", dev="CPU (x86_64, 2 cores), 2 threads",
                source=_source(name, "step_cpu.json"), note=gpu_note("step")),
    ])


@table("ism-history", "history_cpu.json", "cpews_ism_floor_cpu.json")
def t_ism_history(name: str = "history_cpu.json") -> str:
    rows = []
    for when, r in _history(name, "cpews_ism_floor_cpu.json"):
        rows.append([when, f"{r['loadavg_before'][0]:.1f}", f"{r['floor_bmm_fwd_bwd_ms']:.0f} ms",
                     f"{r['ism_ms']:.0f} ms", f"{r['ism_over_floor']:.2f}x", f"{r['toco_over_floor']:.2f}x"])
    return "\n\n".join([
        _table(["version", "load average", "floor", "`ism_loss`", "ISM / floor", "ToCo's form / floor"], rows),
        caption(data="ISM forward + backward at B=4, N=784, D=768 against the bare similarity bmm; every committed "
                     "version", dev="CPU (x86_64), 1 thread", source=_source(name, "cpews_ism_floor_cpu.json"),
                note=gpu_note("cpews_ism_floor", "cpews")),
    ])


@table("cpews-bench", "cpews_cpu.json")
def t_cpews_bench(name: str = "cpews_cpu.json") -> str:
    d = load(name)
    res = d["results"]
    ks = list(res)
    names = {"pdl+ssl": "PDL + SSL", "pdl": "PDL", "ssl": "SSL", "pdl_dense": "PDL, dense all-classes path",
             "ssl_dense": "SSL, dense all-classes path", "ism": "ISM", "accumulate": "`accumulate` (no grad)"}
    rows = []
    for key, title in names.items():
        cells = []
        for k in ks:
            e = res[k][key]
            cells.append(f"{e['ours_ms']:.1f} vs {e['reference_ms']:.1f} ms, {e['speedup']:.1f}x")
        rows.append([title] + cells)
    rows.append(["`finalize` (k-means, no grad)"] + [
        f"{res[k]['finalize']['ours_ms'] / 1000:.2f} s ({res[k]['finalize']['kmeans_iters']} k-means steps, store "
        f"{'x'.join(str(x) for x in res[k]['finalize']['store'])})" for k in ks])
    rows.append(["ISM `(B, N, N)` masks: bytes ours / ToCo's"] + [
        f"{res[k]['ism_peak_memory']['mask_ratio_ours_over_toco']:.2f}x" for k in ks])
    rows.append(["ISM measured peak: ours / ToCo's"] + [
        f"{res[k]['ism_peak_memory']['peak_ratio_ours_over_toco']:.2f}x" for k in ks])
    sh = d["shapes"]
    return "\n\n".join([
        _table(["forward + backward: ours vs the per-(image, class) loop of the released code"] + ks, rows),
        caption(data=f"ViT-B/16 448² shapes B={sh['B']}, N={sh['N']}, D={sh['D']}, M={sh['M']}, "
                     f"{sh['present_classes_per_image']} present classes per image; {d['what']}; memory: "
                     f"{d['memory_method']}", dev=device(d), source=_source(name), note=gpu_note("cpews")),
    ])


@table("doei-bench", "doei_cpu.json")
def t_doei_bench(name: str = "doei_cpu.json") -> str:
    d = load(name)
    rows = []
    for r in d["results"]:
        ev, tr, mem = r["eval_forward_s"], r["train_fwd_bwd_s"], r["saved_for_backward_MB"]
        rows.append([str(r["C"]), f"{ev['unpatched']:.2f} / {ev['patched']:.2f} s",
                     f"{r['eval_forward_ratio_patched_over_unpatched']:.2f}x",
                     f"{tr['unpatched']:.2f} / {tr['patched']:.2f} s",
                     f"{r['train_ratio_patched_over_unpatched']:.2f}x",
                     f"{mem['unpatched']:.0f} / {mem['patched']:.0f} MB"])
    return "\n\n".join([
        _table(["class tokens", "eval forward, unpatched / patched", "ratio", "training fwd + bwd, unpatched / "
                "patched", "ratio", "saved for backward, unpatched / patched"], rows),
        caption(data=f"{d['setting']}; target: {d['target']}; {d['note']}", dev=device(d), source=_source(name),
                note=gpu_note("doei")),
    ])


@table("pcm-bench", "pcm_cpu.json")
def t_pcm_bench(name: str = "pcm_cpu.json") -> str:
    d = load(name)
    sh, ops, hv, pmask = d["shapes"], d["pcm_ops"], d["hv_bilstm"], d["pseudo_mask"]
    g = f"{sh['grid'][0]}×{sh['grid'][1]}"
    rows = [
        [f"PCM ops, B = {ops['batch']} (mosaic of {sh['image']}² images, teacher warp, ET fwd+bwd, MCE fwd+bwd)",
         f"{ops['ours_ms']:.1f} ms", f"{ops['loop_ms']:.1f} ms", f"{ops['speedup']:.1f}x"],
        [f"HV-BiLSTM forward, B = {hv['loop_batch']}, {g} (loop: one row / column sequence at a time)",
         f"{hv['fwd_ms']:.1f} ms", f"{hv['loop_fwd_ms']:.1f} ms", f"{hv['speedup']:.1f}x"],
        [f"HV-BiLSTM forward + backward, B = {hv['train_batch']}, {g}", f"{hv['fwd_bwd_ms']:.0f} ms", "", ""],
        ["HV-BiLSTM forward, 60×60 (960 px inference)", f"{hv['infer_60x60_fwd_ms']:.0f} ms", "", ""],
        [f"`pseudo_mask` 60×60 → 500×375, B = {pmask['batch']}", f"{pmask['ms']:.1f} ms", "", ""],
    ]
    return "\n\n".join([
        _table(["", "ours", "per-sample loop", "speed-up"], rows),
        caption(data=f"{g} grid, D = {sh['dim']}, K = {sh['K']}, tiles {sh['tile']}, crop {sh['crop']}; "
                     f"{d['scaled']}; `training_losses`: {d['training_losses']}", dev=device(d),
                source=_source(name), note=gpu_note("pcm")),
    ])


@table("swtformer-bench", "swtformer_cpu.json")
def t_swtformer_bench(name: str = "swtformer_cpu.json") -> str:
    d = load(name)
    rows = []
    for size, b in d["block"].items():
        rows.append([f"{size} (S4 {b['stage_grids'][-1][0]}×{b['stage_grids'][-1][1]}, `F_hie` "
                     f"{b['F_hie'][0]}×{b['F_hie'][1]})" if isinstance(b["stage_grids"][-1], list) else size,
                     f"{b['ours_time']['median_ms']:.0f} ms, {b['ours_peak_bytes'] / 2**20:.0f} MiB",
                     f"{b['sipe_broadcast_time']['median_ms']:.0f} ms, "
                     f"{b['sipe_broadcast_peak_bytes'] / 2**20:.0f} MiB",
                     f"{b['speedup_time']:.1f}x faster, {b['memory_ratio_naive_over_ours']:.1f}x less memory",
                     f"{b['loss_abs_diff']:.1g}"])
    first = next(iter(d["block"].values()))
    return "\n\n".join([
        _table(["input", "ours", "SIPE broadcast forms", "", "loss difference"], rows),
        caption(data=f"the V2 block (head, background, seeds, HFF, prototypes, R-CAM, CLS+GSC+CCL) on precomputed "
                     f"Swin-T stage maps, B={first['B']}, K={first['K']}, forward + backward, median of "
                     f"{first['ours_time']['repeats']} repeats; memory: {d['memory_method']}", dev=device(d),
                source=_source(name), note=gpu_note("swtformer")),
    ])


@table("swtformer-step", "swtformer_cpu.json")
def t_swtformer_step(name: str = "swtformer_cpu.json") -> str:
    d = load(name)
    rows = [[size, str(s["B"]), f"{s['v1_time']['median_ms']:.0f} ms", f"{s['v2_time']['median_ms']:.0f} ms",
             f"{s['v2_over_v1_time']:.2f}x", str(s["v1_time"]["repeats"]),
             f"{s['v1_peak_bytes'] / 2**20:.0f} / {s['v2_peak_bytes'] / 2**20:.0f} MiB"]
            for size, s in d["step"].items()]
    return "\n\n".join([
        _table(["input", "B", "V1 step", "V2 step", "V2 / V1", "timed repeats", "peak RSS growth V1 / V2"], rows),
        caption(data=f"full training step of a random-init Swin-T, scaled down: {d['scaled']}", dev=device(d),
                source=_source(name), note=gpu_note("swtformer")),
    ])


@table("cpal-bench", "cpal_cpu.json", "history_cpu.json")
def t_cpal_bench(name: str = "cpal_cpu.json") -> str:
    d = load(name)
    r = d["results"]
    mib = 2**20
    rows = [
        ["projection head alone, fwd + bwd", f"{r['head']['median_ms']:.0f} ms",
         f"{r['head']['saved_bytes'] / mib:.0f} MiB"],
        ["head + CPAL + bank update, fwd + bwd", f"{r['head_cpal_update']['median_ms']:.0f} ms",
         f"{r['head_cpal_update']['saved_bytes'] / mib:.0f} MiB"],
        ["CPAL after the head (+ update), fwd + bwd",
         f"{r['cpal_after_head']['median_ms']:.0f} ms ({r['cpal_after_head_over_head']:.2f}x the head; target < 1x)",
         f"{r['cpal_after_head']['saved_bytes'] / mib:.0f} MiB"],
        [f"`recluster()` ({r['shape']['K'] + 1} x {r['shape']['L']} x {r['shape']['P']} → {r['shape']['M']} centres)",
         f"{r['recluster']['median_ms']:.0f} ms", "—"],
    ]
    for when, old in _history("history_cpu.json", "cpal_cpu.json")[:-1]:
        rows.append([f"`recluster()`, {when} (before the batched k-means changes)",
                     f"{old['results']['recluster']['median_ms']:.0f} ms", "—"])
    o = r["oracle"]
    rows.append([f"batched vs the loop oracle, fwd + bwd at B = {o['shape']['B']}, "
                 f"{o['shape']['grid'][0]}×{o['shape']['grid'][1]}",
                 f"{o['batched']['median_ms']:.1f} ms vs {o['loop']['median_ms'] / 1000:.1f} s "
                 f"({o['speedup']:.0f}x)", "—"])
    s = r["shape"]
    return "\n\n".join([
        _table(["measured (median)", "time", "autograd-saved memory"], rows),
        caption(data=f"B = {s['B']}, K = {s['K']}, D = {s['D']}, {s['grid'][0]}×{s['grid'][1]} grid, P = {s['P']}, "
                     f"a full bank of {s['L']} per class, M = {s['M']}, T = {s['T']}; median of "
                     f"{r['head']['repeats']}", dev=device(d), source=_source(name, "history_cpu.json"),
                note=gpu_note("cpal")),
    ])


@table("refine-bench", "refine_cpu.json", "history_cpu.json")
def t_refine_bench(name: str = "refine_cpu.json") -> str:
    rows = []
    for i, (when, d) in enumerate(_history("history_cpu.json", name), 1):
        c = d["results"]["cpu"]
        if "ours_ms" in c:
            ours, theirs, how = c["ours_ms"] / 1000, c["per_image_ms"] / 1000, "paired medians"
        else:
            ours, theirs, how = c["ours_s"]["min"], c["per_image_s"]["min"], "best of 3 calls"
        load_avg = d.get("load_average_at_start")
        rows.append([str(i), when, f"{load_avg[0]:.1f}" if load_avg else "not recorded", how, f"{ours:.2f} s",
                     f"{theirs:.2f} s", f"{c['speedup']:.1f}x",
                     f"{c['ours_peak_bytes'] / 1e6:.0f} MB / {c['per_image_peak_bytes'] / 1e6:.0f} MB",
                     f"{c['max_abs_diff_vs_per_image']:.1e}"])
    d = load(name)
    sh = d["shape"]
    return "\n\n".join([
        _table(["run", "version", "load average", "timing", "`par` (batched)", "ToCo form, per image", "speed-up",
                "peak RSS growth, ours / ToCo form", "max abs diff"], rows),
        caption(data=f"PAR at half resolution, B={sh['B']}, K={sh['K']}, {sh['crop']}x{sh['crop']} crops "
                     f"(PAR at {sh['par_size'][0]}x{sh['par_size'][1]}), {sh['neighbours']} neighbours, "
                     f"{sh['num_iter']} steps, no grad; every committed version of the PAR benchmark; memory: "
                     f"{d['memory_method_cpu']}", dev=device(d["environment"]),
                source=_source(name, "history_cpu.json"), note=gpu_note("refine") if "cuda" not in d["results"]
                else "**GPU:** see the `cuda` entry of the source file."),
    ])


@table("synthetic-bench", "synthetic_cpu.json")
def t_synthetic_bench(name: str = "synthetic_cpu.json") -> str:
    d = load(name)
    rows = [[f"{it['image_size'][0]}×{it['image_size'][1]}", f"{it['items_per_s']:,.0f}",
             f"{it['items_per_cpu_s']:,.0f}", f"{it['us_per_item']:.0f} µs"] for it in d["items"]]
    ras = d["rasterise_64x64_us"]
    return "\n\n".join([
        _table(["image size", "items / s (wall)", "items / CPU-s", "per item"], rows),
        caption(data=f"`SyntheticScenes` generation, one process; DataLoader at 64×64, batch 64: "
                     f"{d['dataloader_64x64_batch64_items_per_s']:,.0f} items/s; rasteriser "
                     f"{ras['vectorised_bbox']:.0f} µs vs {ras['per_pixel_loop_reference']:.0f} µs per scene for the "
                     f"per-pixel reference ({ras['speedup']:.1f}x); target {d['target_items_per_s_64x64']:,} "
                     f"items/s at 64×64: {'met' if d['meets_target'] else 'not met'}; {d['note']}", dev=device(d),
                source=_source(name)),
    ])


# --------------------------------------------------------------------------------------------
# inline values


_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
def _where(items: list[dict[str, Any]], *pairs: Any) -> dict[str, Any]:
    """The one item of ``items`` whose keys equal the given ``key, value, key, value, ...``."""
    if len(pairs) % 2 or not pairs:
        raise ResultsError("where(items, key, value, ...): give key / value pairs")
    conds = list(zip(pairs[::2], pairs[1::2], strict=True))
    hits = [x for x in items if all(x.get(k) == v for k, v in conds)]
    if len(hits) != 1:
        raise ResultsError(f"where{tuple(pairs)!r}: {len(hits)} matching items, expected exactly 1")
    return hits[0]


_FUNCS: dict[str, Callable[..., Any]] = {
    "abs": abs, "min": min, "max": max, "len": len, "sum": sum, "round": round,
    "mean": lambda xs: statistics.fmean(xs), "std": lambda xs: statistics.stdev(xs),
    "where": _where,
}


def _lookup(obj: Any, key: Any, expr: str) -> Any:
    if isinstance(obj, dict):
        if key not in obj:
            raise ResultsError(f"{expr}: no key {key!r} (keys: {', '.join(map(repr, list(obj)[:30]))})")
        return obj[key]
    if isinstance(obj, list):
        if isinstance(key, int):
            try:
                return obj[key]
            except IndexError as e:
                raise ResultsError(f"{expr}: index {key} out of range (length {len(obj)})") from e
        return [_lookup(x, key, expr) for x in obj]  # a key on a list maps over its items
    raise ResultsError(f"{expr}: cannot take {key!r} of a {type(obj).__name__}")


def _elementwise(op: Callable[[Any, Any], Any], a: Any, b: Any, expr: str) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        if isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                raise ResultsError(f"{expr}: lists of different lengths ({len(a)}, {len(b)})")
            return [op(x, y) for x, y in zip(a, b, strict=True)]
        return [op(x, b) for x in a] if isinstance(a, list) else [op(a, y) for y in b]
    return op(a, b)


def evaluate(expr: str) -> Any:
    """Value of a small, safe expression over the results files.

    * a name is a file of ``benchmarks/results`` by stem (``reproduce_seg_cpu``) or by one of the
      :data:`ALIASES` (``seg``);
    * ``.key`` and ``["key"]`` read a dict key (any text in the bracket form), ``[i]`` a list item;
      a key on a list reads it from every item (``per_seed.baseline.cam_miou_best``: one per seed);
    * ``+ - * /`` on numbers (element-wise on lists), unary minus, numbers, and the functions
      ``mean std min max sum len abs round``, and ``where(items, key, value, ...)``: the one item
      of a list whose keys have those values.
    """
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ResultsError(f"value expression {expr!r}: {e.msg}") from e

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in ALIASES:
                return load(ALIASES[node.id])
            return load(node.id + ".json")
        if isinstance(node, ast.Attribute):
            return _lookup(ev(node.value), node.attr, expr)
        if isinstance(node, ast.Subscript):
            return _lookup(ev(node.value), ev(node.slice), expr)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _elementwise(_BINOPS[type(node.op)], ev(node.left), ev(node.right), expr)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            sign = -1 if isinstance(node.op, ast.USub) else 1
            return [sign * x for x in v] if isinstance(v, list) else sign * v
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(x) for x in node.elts]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords):
            args = [ev(a) for a in node.args]
            return _FUNCS[node.func.id](*args)
        raise ResultsError(f"value expression {expr!r}: {ast.dump(node)[:60]} is not allowed")

    return ev(tree)


_FORMATS: dict[str, Callable[[float], str]] = {
    "pct": lambda x: f"{100 * x:.1f}",       # a fraction shown in percent, 1 decimal
    "pct0": lambda x: f"{100 * x:.0f}",
    "pct+": lambda x: f"{100 * x:+.1f}",     # signed percentage points
    "pct0+": lambda x: f"{100 * x:+.0f}",
    "x": lambda x: f"{x:.2f}x",              # a ratio
    "x1": lambda x: f"{x:.1f}x",
    "x0": lambda x: f"{x:.0f}x",
}


def format_value(value: Any, fmt: str = "") -> str:
    """``fmt``: one of ``pct pct0 pct+ pct0+ x x1 x0`` or a Python format spec (``.1f``, ``+.2f``);
    empty: numbers with ``.3g``, text as it is. Lists are formatted item by item, joined by ``, ``."""
    fmt = fmt.strip()
    if isinstance(value, list):
        return ", ".join(format_value(v, fmt) for v in value)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, str):
        if fmt:
            raise ResultsError(f"format {fmt!r} given for the text {value!r}")
        return value
    if not isinstance(value, (int, float)):
        raise ResultsError(f"cannot format a {type(value).__name__} ({str(value)[:60]})")
    if fmt in _FORMATS:
        return _FORMATS[fmt](value)
    try:
        return format(value, fmt or ".3g")
    except ValueError as e:
        raise ResultsError(f"bad format {fmt!r}: {e}") from e


# --------------------------------------------------------------------------------------------
# markers

MARKER = re.compile(r"<!--\s*(results?|values?)\s*:(.*?)-->", re.S)
# a results marker stands on its own line; its indentation is kept (tables inside list items)
TABLE_LINE = re.compile(r"^(?P<indent>[ \t]*)<!--\s*results\s*:(?P<arg>[^\n]*?)-->[ \t]*$", re.M)
# anything that looks like a marker of ours, to catch typos such as "<!-- result NAME -->"
LOOSE = re.compile(r"<!--\s*(results?|values?)\b", re.I)


def markers(markdown: str) -> list[tuple[str, str]]:
    """``(kind, argument)`` of every marker in ``markdown``; raises on a malformed one."""
    found = [(m.group(1), m.group(2).strip()) for m in MARKER.finditer(markdown)]
    if len(LOOSE.findall(markdown)) != len(found):
        bad = [m.group(0) for m in LOOSE.finditer(markdown)]
        raise ResultsError(f"malformed results marker(s) near: {bad}")
    for kind, _ in found:
        if kind not in ("results", "value"):
            raise ResultsError(f"unknown marker kind {kind!r} (use 'results' or 'value')")
    return found


def render_table(argument: str) -> str:
    parts = argument.split()
    if not parts:
        raise ResultsError("empty results marker")
    name, args = parts[0], parts[1:]
    if name not in TABLES:
        raise ResultsError(f"unknown results table {name!r} (known: {', '.join(sorted(TABLES))})")
    try:
        return TABLES[name](*args)
    except ResultsError:
        raise
    except (KeyError, IndexError, TypeError, ZeroDivisionError) as e:
        raise ResultsError(f"results table {argument!r}: {type(e).__name__}: {e}") from e


def render_value(argument: str) -> str:
    expr, _, fmt = argument.rpartition("|") if "|" in argument else (argument, "", "")
    try:
        return format_value(evaluate(expr), fmt)
    except ResultsError:
        raise
    except (KeyError, IndexError, TypeError, ZeroDivisionError, statistics.StatisticsError) as e:
        raise ResultsError(f"value {argument!r}: {type(e).__name__}: {e}") from e


def render(markdown: str, where: str = "") -> str:
    """``markdown`` with every results / value marker replaced; raises :class:`ResultsError`."""
    found = markers(markdown)
    prefix = f"{where}: " if where else ""
    n_tables = len(TABLE_LINE.findall(markdown))
    if n_tables != sum(kind == "results" for kind, _ in found):
        raise ResultsError(f"{prefix}a results marker must stand alone on its line")

    def table_sub(m: re.Match[str]) -> str:
        indent = m.group("indent")
        try:
            text = render_table(m.group("arg").strip())
        except ResultsError as e:
            raise ResultsError(f"{prefix}{m.group(0).strip()}: {e}") from e
        return "\n".join(indent + line if line else "" for line in text.split("\n"))

    def value_sub(m: re.Match[str]) -> str:
        if m.group(1) != "value":
            return m.group(0)
        try:
            return render_value(m.group(2).strip())
        except ResultsError as e:
            raise ResultsError(f"{prefix}{m.group(0).strip()}: {e}") from e

    markdown = TABLE_LINE.sub(table_sub, markdown)
    return MARKER.sub(value_sub, markdown)


# --------------------------------------------------------------------------------------------
# history: earlier committed versions of result files, copied verbatim from git

HISTORY: dict[str, list[str]] = {
    "refine_cpu.json": ["a8d9818", "3a87f01", "f023dc2", "d8e2be3"],
    "reproduce_cpal_cpu.json": ["85b3cdc"],
    "cpal_cpu.json": ["ed8bfee"],
    "cpews_ism_floor_cpu.json": ["a46e44f"],
    "step_cpu.json": ["d1164fa", "5a225ab", "80f1c88"],
    "prototypes_t1_cpu.json": ["4d33742", "5a225ab", "edb8cdd"],
    "prototypes_t2_cpu.json": ["315d168", "5a225ab", "edb8cdd"],
}


def write_history(path: Path | None = None) -> Path:
    """``results/history_cpu.json``: the versions of :data:`HISTORY` read with ``git show``."""
    files: dict[str, list[dict[str, Any]]] = {}
    for file, commits in HISTORY.items():
        for c in commits:
            text = subprocess.run(["git", "show", f"{c}:benchmarks/results/{file}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            files.setdefault(file, []).append({"commit": c, "data": json.loads(text)})
    payload = {
        "what": "earlier committed versions of result files that the documentation still reports (runs "
                "made before a code change or under another load), copied verbatim from git by "
                "`python benchmarks/results_tables.py --write-history`; the current versions are the files "
                "themselves",
        "files": files,
    }
    path = path or RESULTS / "history_cpu.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def main(argv: list[str]) -> None:
    if argv[:1] == ["--write-history"]:
        print(write_history())
        return
    if argv:
        print(render_table(" ".join(argv)))
        return
    for name in TABLES:
        print(f"## {name}\n\n{render_table(name)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
