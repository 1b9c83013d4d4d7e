"""No public entry point writes into the user's model: no Proxy/Node left in its Python state,
no forward-time write (caches, counters, attributes) kept, and every call works twice."""
import pytest
import torch
import torch.fx

import hfp_fx


def _leftovers(model: torch.nn.Module):
    """Paths of every torch.fx Proxy or Node reachable from a module's ``__dict__``."""
    found = []

    def walk(value, path, seen):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, (torch.fx.Proxy, torch.fx.Node)):
            found.append(path)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k, f"{path}[key {k!r}]", seen)
                walk(v, f"{path}[{k!r}]", seen)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]", seen)

    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            walk(value, f"{name or '(root)'}.{attr}", set())
    return found


def _python_state(model: torch.nn.Module):
    """Everything but tensors and submodules in every module's ``__dict__``, as text."""
    out = {}
    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr in ("_parameters", "_buffers", "_modules") or isinstance(value, (torch.Tensor, torch.nn.Module)):
                continue
            out[f"{name}.{attr}"] = repr(value)
    return out


class DeviceCache(torch.nn.Module):
    """timm LeViT / EfficientFormer's pattern: an eval-mode cache keyed by device, read back."""

    def __init__(self, c):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(c))
        self.cache = {}

    def get_bias(self, device):
        if self.training:
            return self.bias
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        return x + self.get_bias(x.device).view(1, -1, 1, 1)


class Recorder(torch.nn.Module):
    """Writes to itself in forward: a list, a counter and a new attribute."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.calls = 0

    def forward(self, x):
        self.seen.append(x)
        self.calls += 1
        self.last_shape = x.shape
        return torch.relu(x)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.cached = DeviceCache(8)
        self.rec = Recorder()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.rec(self.cached(self.conv1(x)))
        return self.head(self.conv2(y).mean((2, 3)))


def _public_calls(model, x):
    dg = hfp_fx.dependency_graph(model, x)
    keep = {g.id: range(0, g.channels, 2) for g in dg.prunable_groups}
    prepared = hfp_fx.prepare(model, x, {"macs": 0.6})
    return {
        "dependency_graph": lambda: hfp_fx.dependency_graph(model, x),
        "count": lambda: hfp_fx.count(model, x),
        "mask": lambda: hfp_fx.mask(model, x, keep),
        "shrink": lambda: hfp_fx.shrink(model, x, keep),
        "prepare": lambda: hfp_fx.prepare(model, x, {"macs": 0.6}),
        "finalize": lambda: hfp_fx.finalize(prepared),
        "prune": lambda: hfp_fx.prune(model, x, {"macs": 0.6}),
    }


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_public_calls_leave_no_trace_in_a_caching_model(mode):
    torch.manual_seed(0)
    model = Net().train(mode == "train")
    x = torch.randn(2, 3, 8, 8)
    reference = model.eval()(x).detach() if mode == "eval" else None  # fills the cache
    model.train(mode == "train")
    before = _python_state(model)
    for name, call in _public_calls(model, x).items():
        first = call()
        second = call()  # works again on the same model
        if isinstance(first, torch.nn.Module):
            with torch.no_grad():
                assert torch.equal(first.eval()(x), second.eval()(x)), name
        elif isinstance(first, hfp_fx.DependencyGraph):
            assert first.summary() == second.summary()
        else:
            assert first == second, name
        assert _leftovers(model) == [], name
        assert _python_state(model) == before, f"{name} changed the model's Python state"
    if reference is not None:
        small = hfp_fx.shrink(model, x, {})
        assert torch.allclose(small.eval()(x), reference, atol=1e-6)


def test_levit_cache_survives_repeated_calls():
    """The held-out failure: timm LeViT caches `attention_bias_cache[str(device)]` in eval mode."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("levit_128s").eval()
    x = torch.randn(1, 3, 224, 224)
    hfp_fx.dependency_graph(model, x)
    assert _leftovers(model) == []
    small = hfp_fx.shrink(model, x, {})  # failed with "referenced nonexistent value" before
    assert _leftovers(model) == []
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:efficientformer_l1"])
def test_zoo_models_keep_no_proxy(name):
    if name.startswith("timm:"):
        pytest.importorskip("timm")
    from hfp_fx.interop.specs import load_spec

    model = load_spec(name)[0].eval()
    size = 224 if name.startswith("timm") else 64
    x = torch.randn(1, 3, size, size)
    before = _python_state(model)
    hfp_fx.dependency_graph(model, x)
    hfp_fx.prune(model, x, {"macs": 0.7})
    assert _leftovers(model) == []
    assert _python_state(model) == before
