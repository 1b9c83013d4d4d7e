"""Long calls report their stages: INFO logs always, a progress bar only when asked or on a TTY."""
import logging

import pytest
import torch
import torchvision

import hfp_fx

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(autouse=True)
def _reset_progress():
    yield
    hfp_fx.set_progress(None)


def test_prune_logs_each_stage_once_with_timing(caplog):
    hfp_fx.set_progress(False)
    with caplog.at_level(logging.INFO, logger="hfp_fx"):
        hfp_fx.prune(torchvision.models.resnet18(), X, "50%")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    for stage in ("dependency graph", "budget projection", "shrink"):
        assert sum(m.startswith(f"prune: {stage} done in") for m in messages) == 1, messages
    assert any(m.startswith("prune finished in") for m in messages)
    # the nested dependency_graph call reports under prune, not as a call of its own
    assert not any(m.startswith("dependency_graph") for m in messages)


def test_forced_bar_draws_on_stderr_and_disabled_bar_does_not(capsys):
    pytest.importorskip("tqdm")
    model = torchvision.models.resnet18()
    hfp_fx.set_progress(True)
    hfp_fx.dependency_graph(model, X)
    assert "hfp_fx.dependency_graph" in capsys.readouterr().err
    hfp_fx.set_progress(False)
    hfp_fx.dependency_graph(model, X)
    assert "hfp_fx" not in capsys.readouterr().err


def test_finalize_reports_its_stages(caplog):
    hfp_fx.set_progress(False)
    prepared = hfp_fx.prepare(torchvision.models.resnet18(), X, {"macs": 0.6})
    with caplog.at_level(logging.INFO, logger="hfp_fx"):
        hfp_fx.finalize(prepared)
    messages = [r.getMessage() for r in caplog.records]
    for stage in ("budget projection", "fold gates and shrink"):
        assert any(m.startswith(f"finalize: {stage} done in") for m in messages), messages
    assert not any("measure latency" in m for m in messages)  # only with a latency target
