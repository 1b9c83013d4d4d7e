"""benchmarks/quality.py: the whole --quick protocol offline (synthetic data), and its merge."""
import json
from pathlib import Path

import pytest
from helpers import load_script

pytest.importorskip("torch_pruning")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"


def load():
    return load_script(SCRIPT, "quality")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    quality = load()
    out = tmp_path_factory.mktemp("quality") / "quick.json"
    quality.main(["--quick", "--synthetic", "--no-cache", "--threads", "1", "--out", str(out)])
    return quality, out, json.loads(out.read_text())


def test_quick_run_has_every_method_within_budget(quick):
    quality, out, result = quick
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(quality.DEFAULT_METHODS) and result["target_macs"] == 0.4
    assert rows["dense"]["macs_ratio"] == 1.0 and rows["dense"]["acc"] > 30  # it learned (chance: 10%)
    for method in ("hfp", "hfp_alloc", "hfp_search", "l1", "uniform", *quality.TP_METHODS):
        assert 0.3 < rows[method]["macs_ratio"] <= 0.4 + 1e-9, (method, rows[method]["macs_ratio"])
    for r in rows.values():
        assert {"method", "seed", "acc", "macs_ratio", "params_ratio", "epochs", "threads", "device"} <= set(r)
        assert r["epochs"] == 2 and r["threads"] == 1
    for method in quality.TP_METHODS:
        assert 1 <= rows[method]["tp_steps"] <= 100
    # hfp_alloc / hfp_search: the Taylor cut keeps at least every learned width
    for method in ("hfp_alloc", "hfp_search"):
        alloc = rows[method]["alloc"]
        assert set(alloc["kept_per_group"]) == set(alloc["learned_kept_per_group"])
        assert all(alloc["kept_per_group"][g] >= k for g, k in alloc["learned_kept_per_group"].items())
        assert alloc["gated_steps"] == round(result["config"]["alloc_epochs"] * 16)  # 16 steps per quick epoch
    summary = result["summary"]
    assert summary["hfp_fx_rows_over_budget"] == []
    assert summary["hfp_vs_best_tp"]["best_tp"] in quality.TP_METHODS
    assert out.with_suffix(".png").exists() and not out.with_suffix(".partial.json").exists()


def test_merge_joins_parts_and_refuses_a_row_twice(quick, tmp_path):
    quality, out, result = quick
    a, b = dict(result), dict(result)
    a["rows"] = [r for r in result["rows"] if r["method"] in ("hfp", "dense")]
    b["rows"] = [dict(r, seed=1) for r in result["rows"] if r["method"] != "dense"]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    merged = quality.merge([pa, pb])
    assert [(r["method"], r["seed"]) for r in merged["rows"]][:3] == [("dense", 0), ("hfp", 0), ("hfp", 1)]
    assert quality.summarize(merged["rows"], 0.4)["methods"]["hfp"]["n"] == 2
    with pytest.raises(SystemExit, match="appears twice"):
        quality.merge([pa, pa])
    other = dict(b, config=dict(b["config"], target=0.25))
    pb.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="options differ"):
        quality.merge([pa, pb])
    # an option that shapes only hfp may differ in a part without hfp rows, never between hfp parts
    c = dict(b, rows=[r for r in b["rows"] if r["method"] == "l1"], config=dict(b["config"], hfp_budget="x"))
    pc = tmp_path / "c.json"
    pc.write_text(json.dumps(c))
    merged = quality.merge([pc, pa])
    assert merged["config"]["hfp_budget"] == a["config"]["hfp_budget"] and len(merged["rows"]) == len(a["rows"]) + 1
    pb.write_text(json.dumps(dict(b, config=dict(b["config"], hfp_budget="x"))))
    with pytest.raises(SystemExit, match="hfp_budget"):
        quality.merge([pa, pb])


def test_distillation_flag_trains_against_the_dense_teacher(tmp_path, monkeypatch):
    quality = load()
    seen = []
    real = quality.F.kl_div

    def kl_div(*args, **kwargs):
        seen.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(quality.F, "kl_div", kl_div)
    out = tmp_path / "kd.json"
    result = quality.main(["--quick", "--synthetic", "--no-cache", "--threads", "1", "--methods", "l1",
                           "--distill", "--out", str(out)])
    (row,) = result["rows"]
    assert row["method"] == "l1" and row["distill"] and row["macs_ratio"] <= 0.4 + 1e-9
    assert len(seen) == 16  # one distillation term per fine-tuning step of l1 (the dense model trains without)


def test_hfp_latency_targets_the_latency_that_hfp_measured(tmp_path):
    quality = load()
    out = tmp_path / "latency.json"
    result = quality.main(["--quick", "--synthetic", "--no-cache", "--threads", "1", "--methods", "hfp", "hfp_latency",
                           "--out", str(out)])
    hfp, lat = result["rows"]
    assert (hfp["method"], lat["method"]) == ("hfp", "hfp_latency")
    assert 0 < hfp["latency_ratio"] < 1.5 and lat["latency_target"] == min(1.0, hfp["latency_ratio"])
    assert lat["library_latency_ratio"] > 0 and lat["predicted_latency_ratio"] > 0 and "latency_ratio" in lat
    # the gated phase measured its widths and rescaled the loss's latency (quick: ramp 0.25 of 0.5 epochs)
    steps = [r["step"] for r in lat["latency_recalibrations"]]
    assert steps == sorted(set(steps)) and len(steps) >= 1
    assert all(r["scale"] == pytest.approx(r["measured_ratio"] / r["predicted_ratio"])
               for r in lat["latency_recalibrations"])
    summary = result["summary"]["hfp_latency_vs_hfp"]
    assert summary["per_seed_pt"] == [lat["acc"] - hfp["acc"]]
    assert "hfp_latency vs hfp" in quality.markdown(result)
    with pytest.raises(SystemExit):  # its target comes from hfp's row, so hfp must run first
        quality.parse_args(["--methods", "hfp_latency", "hfp"])
