"""The site's results pages render from the committed JSON, and their numbers are the JSON's.

Renders every marker of ``docs/reproductions.md`` and ``docs/performance.md`` through the hook
(``docs/_hooks/results.py``, no mkdocs build), checks that broken markers raise, and spot-checks
each table against the JSON it reads.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("reproductions.md", "performance.md")


def _import(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hook() -> Any:
    return _import("_test_docs_results_hook", ROOT / "docs" / "_hooks" / "results.py")


@pytest.fixture(scope="module")
def rt(hook: Any) -> Any:
    return hook.load_tables()


def _json(name: str) -> Any:
    return json.loads((ROOT / "benchmarks" / "results" / name).read_text())


def _p(x: float, sign: bool = False) -> str:
    return f"{100 * x:{'+' if sign else ''}.1f}"


def _pm(agg: dict[str, Any]) -> str:
    return f"{100 * agg['mean']:.1f} ± {100 * agg['std']:.1f}"


def _row(text: str, first_cell: str) -> str:
    """The table row of ``text`` whose first cell is ``first_cell``."""
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return line
    raise AssertionError(f"no row {first_cell!r} in:\n{text[:2000]}")


@pytest.mark.parametrize("page", PAGES)
def test_every_marker_of_the_page_renders(hook: Any, rt: Any, page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    found = rt.markers(text)
    assert any(kind == "results" for kind, _ in found) and any(kind == "value" for kind, _ in found)
    out = hook.render(text, page)
    assert "<!--" not in out  # every marker replaced
    for kind, arg in found:  # and each one on its own, too
        if kind == "results":
            table = rt.render_table(arg)
            # the data configuration, device and source of every table (perf_tables.py writes its own line)
            assert ("**Data:**" in table and "**Device:**" in table and "**Source:**" in table
                    or "thread(s)" in table and "benchmarks/results/" in table), arg
        else:
            assert re.search(r"\d", rt.render_value(arg)), arg
    # what the pages say is about the software only
    for word in (r"\bspec\b", r"\bissues? \d", r"\bsession", r"\blent\b", r"no GPU was"):
        assert not re.search(word, out, re.I), word


def test_every_table_is_on_a_page(rt: Any) -> None:
    used = {arg.split()[0] for page in PAGES for kind, arg in rt.markers((ROOT / "docs" / page).read_text())
            if kind == "results"}
    assert used == set(rt.TABLES)


def test_unknown_table_missing_file_and_bad_markers_raise(hook: Any, rt: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(rt.ResultsError, match="unknown results table"):
        hook.render("<!-- results: no-such-table -->\n")
    with pytest.raises(rt.ResultsError, match="not found"):
        hook.render("<!-- results: synthetic no_such_file_cpu.json -->\n")
    with pytest.raises(rt.ResultsError, match="not found"):
        hook.render("x <!-- value: no_such_file_cpu.a.b --> y")
    with pytest.raises(rt.ResultsError, match="no key"):
        hook.render("x <!-- value: synthetic.summary.nobody.cam_miou_best.mean | pct --> y")
    with pytest.raises(rt.ResultsError, match="not allowed"):
        hook.render("x <!-- value: __import__('os').getcwd() --> y")
    with pytest.raises(rt.ResultsError, match="malformed"):
        hook.render("<!-- result synthetic -->\n")
    with pytest.raises(rt.ResultsError, match="on its line"):
        hook.render("text <!-- results: synthetic --> more\n")
    with pytest.raises(rt.ResultsError, match="bad format"):
        hook.render("<!-- value: synthetic.seeds[0] | zz -->")
    # every file a page reads is required: with an empty results folder every table fails
    monkeypatch.setattr(rt, "RESULTS", tmp_path)
    for page in PAGES:
        with pytest.raises(rt.ResultsError, match="not found"):
            hook.render((ROOT / "docs" / page).read_text(), page)
    for name in rt.TABLES:
        with pytest.raises(rt.ResultsError, match="not found"):
            rt.render_table(name)


def test_values_and_formats(rt: Any) -> None:
    syn = _json("reproduce_synthetic_cpu.json")
    mean = syn["summary"]["cpews"]["cam_miou_best"]["mean"]
    assert rt.render_value("synthetic.summary.cpews.cam_miou_best.mean | pct") == f"{100 * mean:.1f}"
    assert rt.render_value('reproduce_synthetic_cpu["summary"]["cpews"].cam_miou_best.mean | .3f') == f"{mean:.3f}"
    per_seed = [r["cam_miou_best"] for r in syn["per_seed"]["cpews"]]
    assert rt.render_value("synthetic.per_seed.cpews.cam_miou_best | pct") == ", ".join(_p(x) for x in per_seed)
    assert rt.render_value("len(synthetic.seeds)") == str(len(syn["seeds"]))
    diff = syn["summary"]["doei"]["pseudo_miou"]["mean"] - syn["summary"]["mct"]["pseudo_miou"]["mean"]
    assert rt.render_value("synthetic.summary.doei.pseudo_miou.mean - synthetic.summary.mct.pseudo_miou.mean "
                           "| pct+") == _p(diff, sign=True)
    step = _json("step_cpu.json")
    doei = next(r for r in step["recipes"] if r["recipe"] == "doei")
    assert rt.render_value('where(step_cpu.recipes, "recipe", "doei").vs_plain | x') == f"{doei['vs_plain']:.2f}x"


def test_reproduction_tables_match_the_json(rt: Any) -> None:
    syn = _json("reproduce_synthetic_cpu.json")
    row = _row(rt.render_table("synthetic"), "cpews")
    assert _pm(syn["summary"]["cpews"]["cam_miou_best"]) in row and _pm(syn["summary"]["cpews"]["pseudo_miou"]) in row
    out = rt.render_table("synthetic")
    assert "**Seeds:** " + ", ".join(map(str, syn["seeds"])) in out and "**Device:** CPU" in out
    assert _p(syn["directions"]["doei_vs_mct_cam_miou_best"], True) in _row(rt.render_table("synthetic-directions"),
                                                                             "doei − mct")

    sweep = _json("doei_sweep_cpu.json")
    assert _pm(sweep["summary"]["af=0.5"]["cam_miou_best"]) in _row(rt.render_table("doei-sweep"), "af=0.5")
    confirm = _json("doei_af_confirm_cpu.json")
    assert " / ".join(_p(x, True) for x in confirm["paired_diff_cam_miou_best"]) in rt.render_table("doei-af-confirm")

    seg = _json("reproduce_seg_cpu.json")
    assert _pm(seg["summary"]["cpews --seg"]["seg_miou"]) in _row(rt.render_table("seg"), "cpews --seg")
    masks = seg["train_masks"]["summary"]["pcm"]["crf"]
    assert f"{_pm(masks['miou'])} / {100 * masks['coverage']['mean']:.0f}" in _row(rt.render_table("seg-masks"), "pcm")
    c = seg["comparisons"]["doei"]["seg_crf_miou_minus_seg_miou"]
    assert _p(c, True) in _row(rt.render_table("seg-deltas"), "doei")

    pre = _json("reproduce_pretrained_cpu.json")
    assert _pm(pre["summary"]["pcm | fractal-pretrained"]["cam_miou_best"]) in _row(
        rt.render_table("pretrained"), "pcm, fractal-pretrained")
    change = _row(rt.render_table("pretrained-change"), "cpews")
    assert _p(pre["pretrained_minus_random"]["cpews"]["cam_miou_best"], True) in change
    assert _p(pre["best_cam_minus_baseline_per_regime"]["fractal-pretrained"]["cpews"], True) in change
    fractal = json.loads((ROOT / "examples" / "weights" / "vit_tiny_p8_64_fractal.json").read_text())
    assert _p(fractal["linear_probe"]["fractal_pretrained"]["patch_miou"]) in rt.render_table("fractal-checkpoint")

    mx = _json("reproduce_matrix_cpu.json")
    a = mx["summary"]["voc_crossed96"]["mct refine last3"]
    assert f"{_pm(a['cam_miou_best'])} (n={a['n']})" in _row(rt.render_table("matrix"), "mct refine last3")
    assert f"{mx['configs']['voc_crossed96']['img_size']} px" in _row(rt.render_table("matrix-configs"),
                                                                      "`voc_crossed96`")
    v = mx["verdicts"]["crossed"]["cpews (SSL learned+gate) vs baseline"]
    assert (f"{_p(v['delta_best_cam_miou']['mean'], True)} {v['verdict']}"
            in _row(rt.render_table("matrix-verdicts"), "cpews (SSL learned+gate) vs baseline"))
    pilot = [json.loads(x) for x in (ROOT / "benchmarks/results/reproduce_matrix_pilot300_cpu.jsonl").read_text()
             .splitlines() if x.strip()]
    assert _p(pilot[0]["cam_miou_best"]) in rt.render_table("matrix-pilot").split("\n")[2]

    ssl = _json("ssl_mechanism_cpu.json")["results"]["crossed"]["0"]
    share = ssl["suppression_set"]["superclass table (paper)"]["phi_share"]["own_context"]
    assert f"{_p(share)} %" in rt.render_table("ssl-mechanism")
    g = ssl["grad_norms_at_pool_step (ssl weight 0.2)"]["denominator=gate"]
    assert f"{g['grad/ssl/backbone'] / g['grad/cls_final/backbone']:.2f}x" in rt.render_table("ssl-gradients")
    kept = ssl["suppression_set"]["table + learned confusions (source_share=0.5)"]["kept_negatives_per_class"]
    assert ", ".join(map(str, kept)) in rt.render_table("ssl-filter")

    pcm = _json("reproduce_pcm_cpu.json")
    row = _row(rt.render_table("pcm"), "pcm: MCE + ET")
    assert " / ".join(_p(r["cam_miou_best"]) for r in pcm["per_seed"]["pcm: MCE + ET"]) in row
    swt = _json("reproduce_swtformer_cpu.json")
    assert _pm(swt["summary"]["v1"]["cam_miou_best"]) in _row(rt.render_table("swtformer"), "v1 (CLS; CAM head)")
    assert _p(swt["directions_cam_miou_best"]["v2_over_v1"], True) in _row(rt.render_table("swtformer-directions"),
                                                                           "V2 over V1")
    cpal = _json("reproduce_cpal_cpu.json")
    key = "cpal: full, normalize_pacam"
    row = _row(rt.render_table("cpal"), key)
    assert _pm(cpal["summary"][key]["cam_miou_best"]) in row
    assert " / ".join(_p(x, True) for x in cpal["paired_best_cam_vs_baseline"][key]) in row
    old = _json("history_cpu.json")["files"]["reproduce_cpal_cpu.json"][0]["data"]
    assert _pm(old["summary"][key]["cam_miou_best"]) in _row(rt.render_table("cpal-previous"), key)
    rerun = _json("reproduce_rerun_cpu.json")["rows"]["doei"]["per_seed"][0]
    assert f"{rerun['cam_miou_best_committed']:.1f} → {rerun['cam_miou_best_rerun']:.1f}" in rt.render_table("rerun")


def test_performance_tables_match_the_json(rt: Any) -> None:
    t1 = _json("prototypes_t1_cpu.json")
    assert f"total / floor {t1['cpu_time_ratios']['kmeans_vs_floor']:.2f}x" in rt.render_table("kmeans")
    t2 = _json("prototypes_t2_cpu.json")
    assert f"{t2['cpu_time_ms']['kmeans_batched']:.0f} ms" in rt.render_table("kmeans prototypes_t2_cpu.json")
    assert "not yet measured on a GPU" in rt.render_table("kmeans")
    step = _json("step_cpu.json")
    cpal = next(r for r in step["recipes"] if r["recipe"] == "cpal")
    assert f"| cpal | {cpal['step_median_ms']:.0f} ms | {cpal['vs_plain']:.2f}x |" in rt.render_table("step")
    assert f"{cpal['vs_plain']:.2f}x" in _row(rt.render_table("step-history"), "current")
    ism = _json("cpews_ism_floor_cpu.json")
    assert f"| `ism_loss` | {ism['ism_ms']:.0f} ms | {ism['ism_over_floor']:.2f}x |" in rt.render_table("ism")
    first = _json("history_cpu.json")["files"]["cpews_ism_floor_cpu.json"][0]
    assert f"{first['data']['ism_over_floor']:.2f}x" in _row(rt.render_table("ism-history"),
                                                               f"commit {first['commit']}")
    assert f"{t1['cpu_time_ratios']['lloyd_vs_floor']:.2f}x" in rt.render_table("kmeans-history")
    proto = _json("prototypes_cpu.json")
    assert f"{proto['bank_speedup']:.1f}x" in rt.render_table("bank")

    cp = _json("cpews_cpu.json")["results"]["K=20"]["pdl+ssl"]
    assert f"{cp['ours_ms']:.1f} vs {cp['reference_ms']:.1f} ms, {cp['speedup']:.1f}x" in rt.render_table("cpews-bench")
    doei = _json("doei_cpu.json")["results"][1]
    assert f"{doei['eval_forward_ratio_patched_over_unpatched']:.2f}x" in _row(rt.render_table("doei-bench"), "20")
    pcm = _json("pcm_cpu.json")
    assert f"{pcm['pcm_ops']['ours_ms']:.1f} ms" in rt.render_table("pcm-bench")
    swt = _json("swtformer_cpu.json")
    assert f"{swt['block']['384']['speedup_time']:.1f}x faster" in rt.render_table("swtformer-bench")
    assert f"{swt['step']['384']['v2_over_v1_time']:.2f}x" in rt.render_table("swtformer-step")
    cpal_b = _json("cpal_cpu.json")["results"]
    assert f"{cpal_b['recluster']['median_ms']:.0f} ms" in rt.render_table("cpal-bench")
    ref = _json("refine_cpu.json")["results"]["cpu"]
    assert f"{ref['speedup']:.1f}x" in _row(rt.render_table("refine-bench"), "5")
    old = _json("history_cpu.json")["files"]["refine_cpu.json"][0]["data"]["results"]["cpu"]
    assert f"{old['ours_s']['min']:.2f} s" in _row(rt.render_table("refine-bench"), "1")
    syn = _json("synthetic_cpu.json")
    assert f"{syn['items'][0]['items_per_s']:,.0f}" in rt.render_table("synthetic-bench")


def test_gpu_note_follows_the_committed_files(rt: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "RESULTS", tmp_path)
    assert rt.gpu_note("step") == "**GPU:** not yet measured on a GPU."
    (tmp_path / "step_cuda.json").write_text("{}")
    assert "step_cuda.json" in rt.gpu_note("step")
