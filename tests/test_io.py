"""Safe save/load: scale nodes, files of the previous format, foreign and tampered files, model specs."""
import json

import pytest
import torch
import torch.nn as nn

import hfp_fx
from hfp_fx.plan.report import GroupReport, PruneReport

X = torch.randn(2, 5, 8)


class Bilinear(nn.Module):
    """``q(x) @ k(x)^T`` contracts two activations: its gate cannot be folded into a weight, so
    ``finalize`` inserts an ``x * buffer`` scale node there."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.out = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.q(x) @ self.k(x).transpose(1, 2))


def finalized_with_scale_node():
    torch.manual_seed(0)
    prepared = hfp_fx.prepare(Bilinear(), X, {"macs": 0.7}, gates="channel")
    with torch.no_grad():
        prepared.hfp.gates.gate.uniform_(0.5, 1.5)
    small = hfp_fx.finalize(prepared).eval()
    assert small.meta["hfp"].scale_sites == ["matmul_0"]  # named after the consumer node and argument
    assert "_hfp_scale_matmul_0" in small.state_dict()
    return small


def rewrite(path, change_plan=None, change_state=None):
    blob = torch.load(path, weights_only=True)
    plan = json.loads(blob["plan"])
    if change_plan:
        change_plan(plan)
    if change_state:
        change_state(blob["state_dict"])
    torch.save({"plan": json.dumps(plan), "state_dict": blob["state_dict"]}, path)


def test_scale_nodes_round_trip_and_the_report_is_rebuilt_by_the_same_constructor(tmp_path):
    small = finalized_with_scale_node()
    hfp_fx.save(small, tmp_path / "m.pt")
    again = hfp_fx.load(tmp_path / "m.pt", Bilinear, X).eval()
    with torch.no_grad():
        assert torch.equal(again(X), small(X))
    assert again.meta["hfp"] == small.meta["hfp"]
    report = again.meta["hfp"]
    assert isinstance(report, PruneReport) and report.groups == {"g0": GroupReport("q", 6, 3)}
    assert report.achieved == hfp_fx.count(again, X) and report.inputs == [((2, 5, 8), "float32")]


def test_files_of_the_previous_format_load(tmp_path):
    """Format 1 named scale sites ``site{k}`` (k: index into the analysis' gate sites) and their
    buffers ``_hfp_scale_site{k}``, and recorded no input shapes or model spec."""
    small = finalized_with_scale_node()
    path = tmp_path / "old.pt"
    hfp_fx.save(small, path)
    sites = [s.name for s in hfp_fx.dependency_graph(Bilinear(), X).facts.gates]
    k = sites.index("matmul_0")

    def old_plan(plan):
        plan.update(format="hfp_fx.pruned/1", scale_sites=[f"site{k}"])
        del plan["inputs"], plan["model_spec"], plan["capture"], plan["input_names"], plan["removed_units"]
        del plan["depth_scales"]

    rewrite(path, old_plan, lambda state: state.__setitem__(f"_hfp_scale_site{k}", state.pop("_hfp_scale_matmul_0")))
    blob = torch.load(path, weights_only=True)
    assert sorted(json.loads(blob["plan"])) == ["achieved", "dense", "exclude", "format", "groups", "keep",
                                                "scale_sites", "target"]
    again = hfp_fx.load(path, Bilinear, X).eval()
    with torch.no_grad():
        assert torch.equal(again(X), small(X))
    assert again.meta["hfp"].scale_sites == ["matmul_0"]
    hfp_fx.save(again, tmp_path / "new.pt")  # saved again in the current format
    assert json.loads(torch.load(tmp_path / "new.pt", weights_only=True)["plan"])["format"] == hfp_fx.interop.io.FORMAT
    with torch.no_grad():
        assert torch.equal(hfp_fx.load(tmp_path / "new.pt", Bilinear).eval()(X), small(X))
    with pytest.raises(ValueError, match="records no example input shapes"):
        hfp_fx.load(path, Bilinear)


def test_unrelated_files_raise_value_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    tensor, plain, module = tmp_path / "t.pt", tmp_path / "d.pt", tmp_path / "m.pt"
    torch.save(torch.ones(3), tensor)
    torch.save({"state_dict": {}}, plain)
    torch.save(nn.Linear(2, 2), module)  # pickled code: weights_only refuses it
    for path in (text, tensor, plain, module):
        with pytest.raises(ValueError, match="is not an hfp_fx pruned-model file"):
            hfp_fx.load(path, Bilinear, X)
    with pytest.raises(FileNotFoundError):
        hfp_fx.load(tmp_path / "missing.pt", Bilinear, X)
    with pytest.raises(TypeError, match="expects a model returned by"):
        hfp_fx.save(hfp_fx.shrink(Bilinear(), X, {}), tmp_path / "x.pt")


@pytest.mark.parametrize("tamper,message", [
    (lambda s: s.pop("q.weight"), r"missing weights \['q.weight'\]"),
    (lambda s: s.__setitem__("extra.bias", torch.zeros(3)), r"unexpected weights \['extra.bias'\]"),
    (lambda s: s.__setitem__("k.weight", torch.zeros(6, 8)), r"wrong shapes \['k.weight: \(6, 8\) in the file, \(3, 8\)"),
    (lambda s: s.__setitem__("_hfp_scale_matmul_0", torch.ones(1, 1, 6)), r"wrong shapes \['_hfp_scale_matmul_0"),
], ids=["missing", "extra", "shape", "scale-shape"])
def test_tampered_weights_raise_a_clear_error(tmp_path, tamper, message):
    path = tmp_path / "m.pt"
    hfp_fx.save(finalized_with_scale_node(), path)
    rewrite(path, change_state=tamper)
    with pytest.raises(ValueError, match=message + ".*modified or damaged"):
        hfp_fx.load(path, Bilinear, X)


@pytest.mark.parametrize("tamper,message", [
    (lambda p: p.pop("keep"), r"lacks \['keep'\]"),
    (lambda p: p["keep"].__setitem__("g0", [0, 1]), "keeps 3 channels by its count and 2 by its keep list"),
    (lambda p: p["keep"].__setitem__("g7", [0]), r"names groups \['g7'\]"),
    (lambda p: p.__setitem__("scale_sites", ["nowhere_0"]), r"scale sites \['nowhere_0'\] do not exist"),
    (lambda p: p.__setitem__("groups", {"g0": [6]}), "malformed"),
], ids=["no-keep", "keep-count", "keep-group", "scale-site", "groups"])
def test_tampered_plans_raise_a_clear_error(tmp_path, tamper, message):
    path = tmp_path / "m.pt"
    hfp_fx.save(finalized_with_scale_node(), path)
    rewrite(path, change_plan=tamper)
    with pytest.raises(ValueError, match=message):
        hfp_fx.load(path, Bilinear, X)


def test_a_model_spec_makes_the_file_self_contained(tmp_path, monkeypatch):
    source = tmp_path / "nets.py"
    source.write_text("import torch.nn as nn\n"
                      "def build():\n"
                      "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from nets import build

    x = torch.randn(1, 3, 9, 9)
    small = hfp_fx.prune(build(), x, "50%").eval()
    hfp_fx.save(small, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"records no model spec.*hfp_fx.load\(path, model_factory, example_inputs\)"):
        hfp_fx.load(tmp_path / "plain.pt")
    hfp_fx.save(small, tmp_path / "spec.pt", model_spec="nets:build")
    again = hfp_fx.load(tmp_path / "spec.pt").eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    assert again.meta["hfp"].model_spec == "nets:build" and again.meta["hfp"].inputs == [((1, 3, 9, 9), "float32")]
    hfp_fx.save(again, tmp_path / "again.pt")  # the spec travels with the loaded model
    assert json.loads(torch.load(tmp_path / "again.pt", weights_only=True)["plan"])["model_spec"] == "nets:build"
    with pytest.raises(ValueError, match="different prune groups.*records input shapes"):
        hfp_fx.load(tmp_path / "spec.pt", lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1)))


def test_a_tampered_count_of_a_group_that_was_not_pruned_is_caught(tmp_path):
    """A group left whole has no keep list: its recorded count is checked against its dense size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 4, 4)
    small = hfp_fx.prune(model, x, {"macs": 0.7}, max_prune={"g1": 0.0})
    groups = small.meta["hfp"].groups
    assert groups["g1"].kept == groups["g1"].dense == 8 and groups["g0"].kept < 8
    path = tmp_path / "m.pt"
    hfp_fx.save(small, path)
    rewrite(path, change_plan=lambda p: p["groups"].__setitem__("g1", [8, 7]))
    with pytest.raises(ValueError, match="group g1 keeps 7 channels by its count and 8 by its keep list"):
        hfp_fx.load(path, lambda: model, x)
