"""A measured latency model: ``Target(latency=...)``.

Latency of the pruned model as a differentiable function of the kept channels, built by timing
the model's own ops on the device its parameters live on, with the example inputs' batch size
and dtype, in eval mode under ``torch.inference_mode`` (the latency users deploy).

Every op node that reads or writes prunable channels gets a term in the kept fractions ``f`` of
its channel axes::

    t_n = a_n + b_n * f_in + c_n * f_out + d_n * f_in * f_out   # two axes: a conv, a linear
    t_n = a_n + b_n * f                                         # one axis: batch norm, depthwise, add

with non-negative coefficients, fitted by least squares to the node's times in the dense model
and in ``variants`` shrunk copies whose widths are spread from 1/16 of dense to 7/8, each group
jittered around its copy's level and rounded to the plan's ``round_to``, so each node is measured
at several (f_in, f_out) points of its own.  Nodes are timed one by one (a :class:`NodeTimer`
interpreter repeats each node), which misses what the forward costs between nodes and drifts
with the machine's speed, so each copy is also timed whole against the dense model
(:func:`paired_times`: short alternating blocks, so drift cancels), its node times are rescaled
to that measured ratio, and the sum is calibrated on the whole-model times:
``T = s * sum_n t_n + c``.  Because ``f = kept / size`` is linear in the keep vector, the model
has the cost model's shape (products of at most two kept counts, :class:`LatencyTerms`), is
exact to evaluate for 0/1 keeps and differentiable for soft ones.

Node times are cached on disk (``~/.cache/hfp_fx/latency``, or ``$HFP_FX_CACHE``, or
``LatencyOptions.cache_dir``) per device name, torch version and thread count, keyed by the
node's signature (op, argument shapes and dtypes, module configuration), so a second build of
the same model, or of a model with the same layers, times nothing again.

    >>> import torch, torchvision
    >>> import hfp_fx
    >>> from hfp_fx.plan.latency import LatencyOptions
    >>> model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    >>> small = hfp_fx.prune(model, x, {"latency": 0.6}, latency_options=LatencyOptions(variants=3, corrections=0))
    >>> report = small.meta["hfp"].latency
    >>> report.predicted_ms < report.dense_ms
    True
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.utils.benchmark as benchmark

from hfp_fx.passes.channel_analysis import iter_maps
from hfp_fx.passes.shrink import shrink_model
from hfp_fx.progress import stages

__all__ = ["LatencyOptions", "LatencyTerms", "LatencyReport", "NodeTimer", "build_latency_model",
           "measure_latency", "paired_times", "device_key"]

#: the narrowest variant's width level (kept fraction); the others are spread from it to dense
LOWEST = 1 / 16
#: per-group factors around a variant's level, so each node is timed at (f_in, f_out) pairs of its own
JITTER = (0.75, 1.0, 1.25)


@dataclass(frozen=True)
class LatencyOptions:
    """How the latency model is measured, and how a latency target is checked.

    ``variants``: shrunk copies timed besides the dense model (more: a better fit, a slower
    build). ``node_time``: seconds of repeated runs per node timing. ``min_run_time``: seconds
    per block of whole-model runs. ``rounds``: pairs of alternating dense/pruned blocks per
    measured ratio (:func:`paired_times`). ``corrections``: how often ``prune``/``finalize`` may
    tighten the plan when the measured latency misses the target (0: measure and report only).
    ``tolerance``: how far over the budget a measured ratio may be (relative); ``slack``: how far
    under it before the plan is loosened again (relative). ``cache_dir``:
    where node timings are kept (``None``: ``$HFP_FX_CACHE`` or ``~/.cache/hfp_fx``).
    ``max_correction_cut``: in :func:`hfp_fx.finalize`, the largest share of the channels the
    trained gates kept that a correction may remove; a correction that would cut deeper is
    refused (the trained widths are kept, with a warning that says by how much the target is
    missed): call :func:`hfp_fx.recalibrate_latency` during training instead.
    """

    variants: int = 8
    node_time: float = 2e-3
    min_run_time: float = 0.05
    rounds: int = 30
    corrections: int = 2
    tolerance: float = 0.0
    slack: float = 0.05
    seed: int = 0
    cache_dir: Optional[str] = None
    max_correction_cut: float = 0.1


@dataclass
class LatencyTerms:
    """Latency in milliseconds = ``const + sum(coeff * prod(kept(row) for row in rows))``."""

    terms: List[Tuple[float, Tuple[torch.Tensor, ...]]]
    const: float
    dense_ms: float  #: the dense model's measured latency
    fit: Dict[str, float] = field(default_factory=dict)  #: calibration and fit diagnostics
    seconds: float = 0.0  #: time spent building the model
    #: the timed node each term comes from, and each timed node's share of ``const`` (ms): the
    #: latency without a removed residual branch drops its nodes' terms and shares
    term_nodes: List[str] = field(default_factory=list)
    node_const: Dict[str, float] = field(default_factory=dict)


@dataclass
class LatencyReport:
    """Predicted and measured latency of a pruned model (``report.latency``)."""

    dense_ms: float  #: the dense model, measured
    target_ms: float  #: the absolute budget
    predicted_ms: float  #: the latency model's value for the plan
    measured_ms: Optional[float] = None  #: the pruned model, measured in the same rounds as dense
    measured_ratio: Optional[float] = None  #: median of per-round pruned/dense ratios
    corrections: int = 0  #: times the plan was moved after a measurement
    model_seconds: float = 0.0  #: time spent building the latency model (0 when built earlier, by prepare)
    refused: Optional[str] = None  #: why finalize kept the trained widths instead of correcting them

    @property
    def prediction_error(self) -> Optional[float]:
        """Relative error of the predicted ratio against the measured one."""
        if self.measured_ratio is None:
            return None
        return (self.predicted_ms / self.dense_ms) / self.measured_ratio - 1.0


# -- timing ------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[], Any], device: torch.device, budget: float, samples: int = 3) -> float:
    """Median over ``samples`` of the mean time of enough back-to-back calls to fill ``budget``."""
    fn()
    _sync(device)
    reps, results = 1, []
    while True:  # find a repetition count that fills the budget
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= budget / samples or reps >= 1 << 16:
            break
        reps = min(1 << 16, max(reps * 2, int(reps * budget / samples / max(elapsed, 1e-9))))
    results.append(elapsed / reps)
    for _ in range(samples - 1):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        results.append((time.perf_counter() - start) / reps)
    return statistics.median(results)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        layout = "cl" if value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last) \
            and not value.is_contiguous() else ""
        return f"T{tuple(value.shape)}{str(value.dtype)[6:]}{layout}"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_describe(v)}" for k, v in sorted(value.items())) + "}"
    text = repr(value)
    return text if len(text) < 80 else hashlib.sha1(text.encode()).hexdigest()[:12]


class NodeTimer(torch.fx.Interpreter):
    """Run the graph once, timing each node in ``nodes`` by repeating it on its actual inputs.

    ``times[node name]`` is in seconds; ``cache`` (signature -> seconds) is read and filled.

        >>> import torch, torchvision
        >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18()).eval()
        >>> timer = NodeTimer(gm, {"conv1", "relu"}, budget=1e-4)
        >>> with torch.inference_mode():
        ...     _ = timer.run(torch.randn(1, 3, 32, 32))
        >>> sorted(timer.times)
        ['conv1', 'relu']
    """

    def __init__(self, gm: torch.fx.GraphModule, nodes: Sequence[str], budget: float = 2e-3,
                 cache: Optional[Dict[str, float]] = None):
        super().__init__(gm)
        self.nodes = set(nodes)
        self.budget = budget
        self.cache = {} if cache is None else cache
        self.times: Dict[str, float] = {}
        self.measured = 0

    def signature(self, n: torch.fx.Node, args, kwargs) -> str:
        if n.op == "call_module":
            module = self.fetch_attr(n.target)
            what = f"{type(module).__qualname__}:{module.extra_repr()}:" + ",".join(
                _describe(t) for t in list(module.parameters()) + list(module.buffers()))
        elif n.op == "call_method":
            what = f"method:{n.target}"
        else:
            what = f"{getattr(n.target, '__module__', '')}.{getattr(n.target, '__qualname__', str(n.target))}"
        return f"{n.op}|{what}|{_describe(args)}|{_describe(kwargs)}"

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.nodes:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            key = self.signature(n, args, kwargs)
            if key not in self.cache:
                call = getattr(self, n.op)
                device = out.device if isinstance(out, torch.Tensor) else torch.device("cpu")
                self.cache[key] = _seconds_per_call(lambda: call(n.target, args, kwargs), device, self.budget)
                self.measured += 1
            self.times[n.name] = self.cache[key]
        return out


def _model_seconds(gm: torch.nn.Module, inputs: Sequence[torch.Tensor], min_run_time: float) -> float:
    with torch.inference_mode():
        for _ in range(2):
            gm(*inputs)
        timer = benchmark.Timer(stmt="gm(*inputs)", globals={"gm": gm, "inputs": inputs},
                                num_threads=torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=min_run_time).median


def paired_times(a: Callable[..., Any], b: Callable[..., Any], inputs_a: Sequence[Any],
                 inputs_b: Optional[Sequence[Any]] = None, rounds: int = 30,
                 block: float = 0.05) -> Tuple[List[float], List[float]]:
    """Seconds per call of ``a(*inputs_a)`` and ``b(*inputs_b)``, timed in ``rounds`` pairs of
    back-to-back blocks of about ``block`` seconds each, the order flipping every round.

    Short alternating blocks are what make a ratio trustworthy on a shared machine: its speed
    drifts by tens of percent within a minute, and a pair of blocks 0.1 s apart sees the same
    speed.  On a 2-core VM, four repeats of one MobileNetV2 ratio spread over 0.773-0.799 with
    40 pairs of 30 ms blocks, and over 0.74-0.83 (five repeats) with 5 pairs of 0.3 s blocks.
    """
    inputs_b = inputs_a if inputs_b is None else inputs_b
    device = next((t.device for t in (*inputs_a, *inputs_b) if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def seconds(fn, xs, number: int) -> float:
        # plain perf_counter blocks: torch.utils.benchmark's timeit() runs two warm-up calls
        # before every block, which tripled the cost of one-call blocks of a large model
        _sync(device)
        start = time.perf_counter()
        for _ in range(number):
            fn(*xs)
        _sync(device)
        return (time.perf_counter() - start) / number

    calls = []
    with torch.inference_mode():
        for fn, xs in ((a, inputs_a), (b, inputs_b)):
            for _ in range(2):  # warm-up: oneDNN primitive caches, allocator, compiled code
                fn(*xs)
            calls.append((fn, xs, max(1, round(block / max(seconds(fn, xs, 1), 1e-9)))))
        times: Tuple[List[float], List[float]] = ([], [])
        for r in range(max(1, rounds)):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                times[i].append(seconds(*calls[i]))
    return times


def measure_latency(dense: torch.nn.Module, small: torch.nn.Module, inputs: Sequence[torch.Tensor],
                    rounds: int = 30, min_run_time: float = 0.05) -> Tuple[float, float, float]:
    """``(dense_ms, small_ms, ratio)`` from :func:`paired_times` (``min_run_time``: seconds per
    block); the ratio is the median of the per-round ``small / dense`` ratios."""
    dense_t, small_t = paired_times(dense, small, inputs, rounds=rounds, block=min_run_time)
    ratio = statistics.median(s / d for s, d in zip(small_t, dense_t))
    return statistics.median(dense_t) * 1e3, statistics.median(small_t) * 1e3, ratio


# -- the cache -------------------------------------------------------------------------------
def device_key(device: torch.device) -> str:
    """Device name, torch version and thread count: what node timings are valid for."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}-{platform.processor() or 'cpu'}-{torch.backends.cpu.get_cpu_capability()}"
    return f"{name}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def _cache_path(options: LatencyOptions, device: torch.device) -> Path:
    root = options.cache_dir or os.environ.get("HFP_FX_CACHE") or os.path.join(Path.home(), ".cache", "hfp_fx")
    key = device_key(device)
    return Path(root) / "latency" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _load_cache(path: Path) -> Dict[str, float]:
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text())["nodes"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a missing or unreadable cache only costs time


def _save_cache(path: Path, cache: Dict[str, float], key: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"device": key, "nodes": cache}))
        tmp.replace(path)
    except OSError:
        pass


# -- the model ---------------------------------------------------------------------------------
@dataclass
class _NodeAxes:
    name: str
    rows: Tuple[torch.Tensor, ...]  # one or two channel axes (element ids)


def _timed_nodes(dg, prunable: torch.Tensor) -> List[_NodeAxes]:
    """Op nodes that read or write prunable channels, with their channel axes."""
    out: List[_NodeAxes] = []
    for node in dg.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        out_ids = next((m.ids for m in iter_maps(dg.channel_map(node.name))), None)
        in_ids = None
        for a in node.all_input_nodes:
            in_ids = next((m.ids for m in iter_maps(dg.channel_map(a.name))), None)
            if in_ids is not None:
                break
        rows = [r for r in (in_ids, out_ids) if r is not None and bool(prunable[r].any())]
        if len(rows) == 2 and torch.equal(torch.unique(dg.units_of(rows[0])), torch.unique(dg.units_of(rows[1]))):
            rows = rows[1:]  # elementwise: one axis
        if rows:
            out.append(_NodeAxes(node.name, tuple(rows)))
    return out


def _model_signature(gm: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> str:
    shapes = ",".join(f"{k}{_describe(t)}" for k, t in list(gm.state_dict().items()))
    return "model|" + hashlib.sha1((gm.code + shapes + _describe(tuple(inputs))).encode()).hexdigest()


def _fraction(alive: torch.Tensor, ids: torch.Tensor) -> float:
    return float(alive[ids].double().mean())


def _features(fs: Sequence[float]) -> Tuple[float, ...]:
    """A node's regressors: ``(1, f)`` for one channel axis, ``(1, f_in, f_out, f_in*f_out)`` for two.

    The single-axis terms carry what scales with one side only (reading the input, writing the
    output, per-channel work); the product carries the arithmetic.  At batch 1 on a CPU the
    memory terms dominate many layers, and a product-only fit made latency fall with the square
    of a uniform width where it falls about linearly.
    """
    if len(fs) == 1:
        return (1.0, fs[0])
    return (1.0, fs[0], fs[1], fs[0] * fs[1])


def _fit_nonnegative(xs: Sequence[Sequence[float]], ts: Sequence[float]) -> Tuple[float, ...]:
    """Least squares ``t ~ sum_j c_j x_j`` with every ``c_j >= 0``.

    Exhaustive over the active sets (at most four regressors): each subset's unconstrained fit is
    kept if it is non-negative, and the feasible one with the smallest residual wins.
    """
    X = torch.tensor(xs, dtype=torch.float64)
    t = torch.tensor(ts, dtype=torch.float64).unsqueeze(1)
    k = X.shape[1]
    best, best_err = (0.0,) * k, float((t ** 2).sum())
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sol = torch.linalg.lstsq(X[:, cols], t, driver="gelsd").solution.squeeze(1)
        if bool((sol < 0).any()):
            continue
        err = float(((X[:, cols] @ sol.unsqueeze(1) - t) ** 2).sum())
        if err < best_err * (1 - 1e-12):
            coef = [0.0] * k
            for j, c in zip(cols, sol.tolist()):
                coef[j] = c
            best, best_err = tuple(coef), err
    return best


def _variant_keeps(dg, count: int, seed: int, round_to: int = 1) -> List[Dict[str, List[int]]]:
    """``count`` keeps whose overall widths are spread from 1/16 to 7/8 of dense, each group
    jittered around its variant's level.

    The spread is what pins down the calibration's offset: variants that all sit near the same
    average width (every group drawing from one grid) leave the fitted constant free, and then a
    per-op overhead fitted at ~60% width was extrapolated to a floor far above the real one
    (MobileNetV2 at two threads: predicted 67% of dense with one channel per group, measured 39%).
    Widths are multiples of ``round_to``, as the plans will be: at two CPU threads a width one
    short of a multiple of 8 ran 17% slower (MobileNetV2 at half width), so timing widths the
    planner cannot choose would bias every node's fit.
    """
    rng = random.Random(seed)
    keeps = []
    for k in range(count):
        level = LOWEST + (1.0 - LOWEST) * k / count
        keep = {}
        for g in dg.prunable_groups:
            f = min(1.0, level * rng.choice(JITTER))
            step = round_to if g.channels >= round_to else g.channels
            n = min(g.channels, max(step, round(g.channels * f / step) * step))
            if n < g.channels:
                keep[g.id] = list(range(n))
        keeps.append(keep)
    rng.shuffle(keeps)  # no order effect between narrow and wide variants in the timings
    return keeps


def build_latency_model(dg, options: Optional[LatencyOptions] = None,
                        shrink: Optional[Callable[[torch.Tensor], torch.nn.Module]] = None,
                        round_to: int = 1) -> LatencyTerms:
    """Measure ``dg``'s model and fit a :class:`LatencyTerms` (see the module doc).

    ``shrink(alive)`` builds a pruned copy (default: :func:`hfp_fx.passes.shrink.shrink_model`).
    ``round_to``: the plans' width step; the variants are timed at such widths.
    """

    options = options or LatencyOptions()
    started = time.perf_counter()
    shrink = shrink or (lambda alive: shrink_model(dg.facts, alive, verify=False))
    inputs = tuple(dg.example_inputs)
    device = next((t.device for t in dg.gm.parameters()), inputs[0].device if inputs else torch.device("cpu"))
    prunable = torch.zeros(dg.num_elements, dtype=torch.bool)
    for g in dg.prunable_groups:
        prunable[g.units] = True
    prunable = prunable[dg.units_of(torch.arange(dg.num_elements))]  # per element
    axes = _timed_nodes(dg, prunable)
    path = _cache_path(options, device)
    cache = _load_cache(path)
    keeps = [{}] + _variant_keeps(dg, options.variants, options.seed, round_to)
    node_times: List[Dict[str, float]] = []  # per model: node name -> seconds
    whole: List[float] = []
    fractions: List[Dict[str, Tuple[float, ...]]] = []  # per model: node name -> regressors
    measured = 0
    dense_gm = None
    with stages("latency model", [f"model {i}/{len(keeps)}" for i in range(1, len(keeps) + 1)]) as stage:
        for i, keep in enumerate(keeps):
            with stage(f"model {i + 1}/{len(keeps)}"):
                alive = dg.alive(keep)
                gm = copy.deepcopy(dg.gm) if not keep else shrink(alive)
                gm.eval()
                timer = NodeTimer(gm, [a.name for a in axes], options.node_time, cache)
                with torch.inference_mode():
                    timer.run(*inputs)
                measured += timer.measured
                xs = {}
                for a in axes:
                    xs[a.name] = _features([_fraction(alive, r) for r in a.rows])
                fractions.append(xs)
                node_times.append({a.name: timer.times[a.name] for a in axes if a.name in timer.times})
                # whole-model timings: the dense model alone, every variant as a ratio to it from
                # alternating rounds (a machine's speed drifts by tens of percent in a minute)
                key = _model_signature(gm, inputs) + ("|paired ratio" if keep else "")
                if key not in cache:
                    if keep:
                        cache[key] = measure_latency(dense_gm, gm, inputs, options.rounds, options.min_run_time)[2]
                    else:
                        cache[key] = _model_seconds(gm, inputs, options.rounds * options.min_run_time)
                    measured += 1
                whole.append(cache[key] * whole[0] if keep else cache[key])
                if keep:
                    del gm
                else:
                    dense_gm = gm
    if measured:
        _save_cache(path, cache, device_key(device))
    samples: Dict[str, List[Tuple[Tuple[float, ...], float]]] = {a.name: [] for a in axes}
    for xs, times, total in zip(fractions, node_times, whole):
        # Node timings are not paired: each model's nodes are timed over some seconds, at that
        # moment's machine speed, or read from the cache of another day.  The paired whole-model
        # ratio is what is trusted; a model's node times keep their proportions but are rescaled
        # so that their sum stands to the dense model's sum as the measured ratio says.
        level = (total / whole[0]) * sum(node_times[0].values()) / max(sum(times.values()), 1e-12)
        for name, t in times.items():
            samples[name].append((xs[name], t * level))
    fits = {a.name: _fit_nonnegative(*zip(*samples[a.name])) if samples[a.name] else (0.0,) for a in axes}
    predicted = [sum(sum(c * x for c, x in zip(fits[n], feats)) for n, feats in xs.items()) for xs in fractions]
    scale, offset = _calibrate(predicted, whole)
    terms, term_nodes = [], []
    for a in axes:
        if len(a.rows) == 1:
            factors = [(a.rows[0],)]
        else:
            factors = [(a.rows[0],), (a.rows[1],), a.rows]
        for c, rows in zip(fits[a.name][1:], factors):
            if c > 0:  # f = kept / size, so the term is c / size * kept
                terms.append((scale * c * 1e3 / math.prod(r.numel() for r in rows), rows))
                term_nodes.append(a.name)
    const = (scale * sum(f[0] for f in fits.values()) + offset) * 1e3
    errors = [abs((scale * p + offset) / w - 1) for p, w in zip(predicted, whole)]
    fit = {"scale": scale, "offset_ms": offset * 1e3, "nodes": len(axes), "models": len(keeps),
           "timings": measured, "max_fit_error": max(errors), "median_fit_error": statistics.median(errors),
           # what the fit predicts for each timed model (the dense one first): the emitted terms
           # must give the same for the same keeps
           "predicted_ms": [(scale * p + offset) * 1e3 for p in predicted]}
    return LatencyTerms(terms, const, whole[0] * 1e3, fit, time.perf_counter() - started, term_nodes,
                        {name: scale * f[0] * 1e3 for name, f in fits.items()})


def _calibrate(predicted: Sequence[float], measured: Sequence[float]) -> Tuple[float, float]:
    """``measured ~ s * predicted + c`` with ``s > 0``; falls back to a pure scale."""
    n = len(predicted)
    mp, mm = sum(predicted) / n, sum(measured) / n
    spp = sum((p - mp) ** 2 for p in predicted)
    s = sum((p - mp) * (m - mm) for p, m in zip(predicted, measured)) / spp if spp > 0 else 0.0
    if s <= 0 or mm - s * mp < -0.5 * min(measured):
        return measured[0] / max(predicted[0], 1e-12), 0.0
    return s, mm - s * mp
