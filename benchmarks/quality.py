"""Pruning quality on a trained model: hfp_fx next to Torch-Pruning's methods, one shared protocol.

The use case: "I have a trained model; make it 2.5x cheaper and lose as little as possible".
Every seed trains the dense Fashion-MNIST ResNet (``fashion_mnist.FashionResNet``, widths 24/48/96,
two blocks per stage) for ``E`` epochs (``--epochs``); every method then starts from those weights
and gets the same extra budget of ``F`` epochs (``--finetune-epochs``; one cosine schedule from
``--finetune-lr``, any pruning or sparsity phase included) to reach the same MACs target
(``--target``, 40% of dense, as ``hfp_fx.count`` counts MACs):

* ``dense``                the dense model trained ``F`` more epochs (the reference);
* ``hfp``                  ``hfp_fx.prepare(trained, x, {"macs": t})`` with per-group widths, ``H``
                           gated epochs (``--hfp-epochs``; the target ramps from dense over
                           ``--ramp-epochs``) with ``cross_entropy + hfp_fx.complexity_loss``, then
                           ``hfp_fx.finalize`` and ``F - H`` epochs of the small model;
* ``hfp_alloc``            HFP as the allocation search (docs/api.md's recipe): ``A`` gated epochs
                           (``--alloc-epochs``) choose the widths; the trained dense weights are cut to
                           them (each learned count a floor) by ``hfp_fx.prune(importance="taylor")`` on
                           ``--calib-batches`` training batches, then ``F - A`` epochs of the small model;
* ``hfp_search``           ``hfp_alloc`` whose search trains the widths only (the weights stay the
                           trained dense ones, as calibration does), so the small model gets all
                           ``F`` epochs;
* ``l1``                   ``hfp_fx.prune(trained, x, {"macs": t}, importance="l1")``, then ``F`` epochs;
* ``tp_magnitude``         Torch-Pruning's group magnitude (``GroupMagnitudeImportance(p=2)``,
                           global pruning), pruned in small steps until MACs <= t, then ``F`` epochs;
* ``tp_taylor``            the same with ``GroupTaylorImportance`` (the gradient of a training batch
                           before every step);
* ``tp_groupnorm_sparse``  Torch-Pruning's sparse training (``GroupNormPruner``, ``reg=5e-4`` as its
                           CIFAR ResNet-56 recipe, weight decay off while regularising) for ``H``
                           epochs, then pruned in steps to MACs <= t and fine-tuned ``F - H`` epochs;
* ``uniform``              every width scaled by one factor (MACs <= t), trained from scratch for
                           ``E + F`` epochs: the control (the whole budget);
* ``uniform_ft``           (not run by default) the same net trained from scratch for only ``F``
                           epochs: what the fine-tune budget alone buys without a dense model;
* ``hfp_latency``          (not run by default) ``hfp`` with a latency target instead of MACs: the
                           latency the same seed's ``hfp`` model measured (``--latency``, batch 1,
                           paired against the dense model), so the two compare at equal measured
                           latency: does spending the budget where latency is cheap buy accuracy?

Torch-Pruning's pruners run by its own API with its own settings (global pruning, at most 90% of a
layer, ``iterative_steps`` small steps); they stop at the first step where MACs <= t, so they may
land a little under the target; every row records its achieved MACs and params.  ``--distill``
adds knowledge distillation from the trained dense model to every method's training alike.

Results: a table (mean +- std over seeds) on stdout, ``benchmarks/results/quality.json`` with one
row per method and seed (threads and device recorded per row) and ``quality.png`` (accuracy vs
MACs).  The dense model of a seed is cached under ``~/.cache/hfp_fx/quality`` (``$HFP_FX_CACHE``)
so that processes splitting the methods share it (a file lock makes the second one wait).

    python benchmarks/quality.py                            # 9 methods x 3 seeds; the docs used --seeds 0 1 2 3 4
    python benchmarks/quality.py --methods hfp l1 --seeds 0 --out /tmp/a.json
    python benchmarks/quality.py --merge /tmp/a.json /tmp/b.json   # one table from split runs
    python benchmarks/quality.py --quick                    # minutes: a small net, 2k images, E=F=1
    python benchmarks/quality.py --quick --synthetic        # offline (no dataset), what the test runs
    python benchmarks/quality.py --methods hfp hfp_latency --latency --threads 2 \
        --out benchmarks/results/quality_latency.json       # HFP-MACs vs HFP-latency at equal latency

``--hfp-budget project`` trains hfp (and hfp_latency) with ``prepare(budget="project")``: the
widths are projected onto the ramped budget at every step instead of pushed by the penalty.
``hfp_latency`` calls ``hfp_fx.recalibrate_latency`` ``--recalibrate`` times during its gated
phase (from the end of the target ramp on), so its loss aims at the measured latency.

``--latency`` adds each final model's latency at batch 1 to its row, as a ratio to the dense model
(``hfp_fx.plan.latency.measure_latency``: ``--latency-rounds`` pairs of short alternating blocks, on
``--device`` with ``--threads`` threads); only measure on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see fashion_mnist.py

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # its sibling modules, however it is loaded
import fashion_mnist as fm  # noqa: E402

import hfp_fx  # noqa: E402
from hfp_fx.plan.latency import LatencyOptions, measure_latency  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("dense", "hfp", "hfp_alloc", "hfp_search", "l1", "tp_magnitude", "tp_taylor", "tp_groupnorm_sparse", "uniform", "uniform_ft",
           "hfp_latency")
#: run when --methods is not given; uniform_ft and hfp_latency are their own questions (module doc)
DEFAULT_METHODS = METHODS[:-2]
TP_METHODS = ("tp_magnitude", "tp_taylor", "tp_groupnorm_sparse")
NUM_CLASSES = 10


# ------------------------------------------------------------------------------------- data
def synthetic_data(n_train: int, n_test: int, seed: int = 0):
    """Offline stand-in for Fashion-MNIST: ten classes of noisy 28x28 templates (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(NUM_CLASSES, 1, 28, 28, generator=gen)
    templates = F.avg_pool2d(templates, 5, 1, 2) * 6

    def draw(n):
        y = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
        return templates[y] + torch.randn(n, 1, 28, 28, generator=gen), y

    return draw(n_train), draw(n_test)


# --------------------------------------------------------------------------------- training
class Phase:
    """One cosine schedule of ``steps`` steps from ``lr``; training runs ranges [start, stop) of it."""

    def __init__(self, data, args, steps: int, lr: float, seed: int):
        self.data, self.args, self.steps, self.lr, self.seed = data, args, max(1, steps), lr, seed

    def optimizer(self, model: nn.Module, gates: Sequence[torch.nn.Parameter] = (), weight_decay=None):
        a = self.args
        wd = a.weight_decay if weight_decay is None else weight_decay
        gate_ids = {id(p) for p in gates}
        decay = [p for p in model.parameters() if id(p) not in gate_ids and p.dim() > 1]
        no_decay = [p for p in model.parameters() if id(p) not in gate_ids and p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": wd, "base_lr": self.lr, "scheduled": True},
                  {"params": no_decay, "weight_decay": 0.0, "base_lr": self.lr, "scheduled": True}]
        if gates:  # HFP's widths: their own constant lr (fashion_mnist.py's settings)
            groups.append({"params": list(gates), "weight_decay": 0.0, "base_lr": a.gate_lr, "scheduled": False})
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True)

    def run(self, model: nn.Module, opt, start: int, stop: int, tag: str, *, hfp: bool = False,
            teacher: Optional[nn.Module] = None, after_backward: Optional[Callable[[], None]] = None) -> None:
        a = self.args
        (train_x, train_y), _ = self.data
        n, bs = len(train_y), a.batch_size
        per_epoch = math.ceil(n / bs)
        model.train()
        t0, seen, tot = time.perf_counter(), 0, 0.0
        for step in range(start, stop):
            epoch, b = divmod(step, per_epoch)
            if b == 0 or step == start:
                gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
                perm = torch.randperm(n, generator=gen)
            idx = perm[b * bs:(b + 1) * bs]
            x, y = train_x[idx], train_y[idx]
            if not a.synthetic:
                x = fm.augment(x, gen)
            f = 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * (f if g["scheduled"] else 1.0)
            out = model(x)
            loss = F.cross_entropy(out, y)
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = teacher(x)
                kd = hfp_fx.distillation_loss(out, teacher_out, a.kd_temperature)
                loss = (1 - a.kd_alpha) * loss + a.kd_alpha * kd
            if hfp:
                loss = loss + hfp_fx.complexity_loss(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            tot += float(loss.detach()) * len(y)
            seen += len(y)
        if stop > start:
            print(f"  [{tag}] steps {start}-{stop} of {self.steps}: loss {tot / max(seen, 1):.4f} "
                  f"test {evaluate(model, self.data):.2f}% ({time.perf_counter() - t0:.0f}s)", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, data) -> float:
    _, (test_x, test_y) = data
    was = model.training
    model.eval()
    correct = sum(int((model(test_x[i:i + 1000]).argmax(1) == test_y[i:i + 1000]).sum())
                  for i in range(0, len(test_y), 1000))
    model.train(was)
    return 100.0 * correct / len(test_y)


def device_name(device: str) -> str:
    """``cpu`` or the accelerator's name, recorded in every row."""
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def steps_per_epoch(data, args) -> int:
    return math.ceil(len(data[0][1]) / args.batch_size)


# ------------------------------------------------------------------------------ dense model
def cache_dir() -> Path:
    root = Path(os.environ.get("HFP_FX_CACHE") or Path.home() / ".cache" / "hfp_fx")
    path = root / "quality"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dense_signature(args, seed: int) -> dict:
    keys = ("epochs", "widths", "blocks", "batch_size", "lr", "weight_decay", "train_subset", "synthetic")
    return {**{k: getattr(args, k) for k in keys}, "seed": seed, "torch": str(torch.__version__)}


def trained_dense(data, args, seed: int) -> dict:
    """The dense model of ``seed`` after ``E`` epochs: from the cache, or trained (and cached)."""
    sig = dense_signature(args, seed)
    key = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    path, lock = cache_dir() / f"dense_{key}.pt", cache_dir() / f"dense_{key}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a second process waits for the first one's training
        if path.exists() and not args.no_cache:
            with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
                saved = torch.load(path, map_location="cpu", weights_only=True)
            print(f"dense seed {seed}: from {path} ({saved['accuracy']:.2f}%)", flush=True)
            return saved
        torch.manual_seed(seed)
        model = fm.FashionResNet(args.widths, args.blocks).to(args.device)
        phase = Phase(data, args, args.epochs * steps_per_epoch(data, args), args.lr, seed)
        t0 = time.perf_counter()
        phase.run(model, phase.optimizer(model), 0, phase.steps, f"dense seed {seed}")
        saved = {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "accuracy": evaluate(model, data),
                 "seconds": round(time.perf_counter() - t0, 1), "signature": sig}
        if not args.no_cache:
            torch.save(saved, path)
        return saved


# --------------------------------------------------------------------------------- methods
def tp_prune_to_target(model: nn.Module, example: torch.Tensor, method: str, target_macs: float,
                       data, args, pruner=None) -> dict:
    """Torch-Pruning's own pruner, stepped until ``hfp_fx.count`` MACs <= ``target_macs``."""
    import torch_pruning as tp

    if pruner is None:
        pruner = make_tp_pruner(model, example, method, args)
    (train_x, train_y), _ = data
    gen = torch.Generator().manual_seed(12345)
    model.eval()  # as its recipe prunes: BN statistics fixed
    steps = 0
    for steps in range(1, args.tp_steps + 1):
        if method == "tp_taylor":  # the gradient of one training batch, fresh for every step
            idx = torch.randint(0, len(train_y), (args.batch_size,), generator=gen)
            model.zero_grad()
            F.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
        pruner.step()
        if hfp_fx.count(model, example).macs <= target_macs:
            break
    model.zero_grad(set_to_none=True)
    return {"tp_steps": steps, "tp_version": tp.__version__}


def make_tp_pruner(model: nn.Module, example: torch.Tensor, method: str, args):
    import torch_pruning as tp

    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    common = dict(global_pruning=True, pruning_ratio=args.tp_max_ratio, max_pruning_ratio=args.tp_max_ratio,
                  iterative_steps=args.tp_steps, ignored_layers=ignored)
    if method == "tp_magnitude":
        return tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2), **common)
    if method == "tp_taylor":
        return tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupTaylorImportance(), **common)
    if method == "tp_groupnorm_sparse":
        return tp.pruner.GroupNormPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                         reg=args.tp_reg, **common)
    raise ValueError(method)


def hfp_allocation_cut(trained, example, data, args, phase, per_epoch: int, tag: str, teacher,
                       train_weights: bool = True):
    """HFP as the allocation search (docs/api.md's recipe): ``--alloc-epochs`` gated epochs (the
    target ramping over the first 40% of them) choose the widths; the trained dense weights are
    then cut to them by one-shot Taylor importance on ``--calib-batches`` training batches (true
    labels), each learned count a floor (``max_prune`` by group id).  Returns the small model and
    what the row records; its fine-tune continues the same cosine schedule from the gated steps.
    ``train_weights=False`` (``hfp_search``): only the widths learn, on the same batches, and the
    small model's fine-tune gets the whole budget."""
    gated = max(1, int(round(args.alloc_epochs * per_epoch)))
    prepared = hfp_fx.prepare(trained(), example, {"macs": args.target}, gates="width", budget=args.hfp_budget,
                              lambda_init=args.lambda_init, dual_rate=args.dual_rate, warmup_steps=0,
                              ramp_steps=int(round(0.4 * gated)))
    gates = hfp_fx.gate_parameters(prepared)
    if not train_weights:  # frozen weights get no gradient, so the optimizer steps the widths only
        gate_ids = {id(g) for g in gates}
        for prm in prepared.parameters():
            prm.requires_grad_(id(prm) in gate_ids)
    phase.run(prepared, phase.optimizer(prepared, gates), 0, gated, tag + " (allocation search)", hfp=True,
              teacher=teacher)
    prepared.eval()
    learned = hfp_fx.finalize(prepared).meta["hfp"]
    (train_x, train_y), _ = data
    bs = args.batch_size
    batches = [(train_x[i * bs:(i + 1) * bs], train_y[i * bs:(i + 1) * bs]) for i in range(args.calib_batches)]
    labels = {x.data_ptr(): y for x, y in batches}  # the calibration loss finds each batch's labels

    def loss(output, inputs):
        return F.cross_entropy(output, labels[inputs[0].data_ptr()])

    model = hfp_fx.prune(trained(), example, {"macs": args.target}, importance="taylor",
                         calibration=[x for x, _ in batches], calibration_loss=loss, max_prune=learned.max_prune())
    kept = {gid: g.kept for gid, g in model.meta["hfp"].groups.items()}
    return model, {"alloc_epochs": args.alloc_epochs, "calib_batches": args.calib_batches, "gated_steps": gated,
                   "learned_kept_per_group": {gid: g.kept for gid, g in learned.groups.items()},
                   "kept_per_group": kept}


def run_method(method: str, seed: int, dense: dict, data, args, example: torch.Tensor,
               dense_counts: hfp_fx.Counts, previous: Sequence[dict] = ()) -> dict:
    """Train ``method`` from the trained dense model of ``seed``; return its result row
    (``previous``: the rows so far, where ``hfp_latency`` finds its target)."""
    per_epoch = steps_per_epoch(data, args)
    total = args.finetune_epochs * per_epoch
    gated = min(total, int(round(args.hfp_epochs * per_epoch)))
    phase = Phase(data, args, total, args.finetune_lr, seed + 100)
    target_macs = args.target * dense_counts.macs

    def trained():
        m = fm.FashionResNet(args.widths, args.blocks)
        m.load_state_dict(dense["state"])
        return m.to(args.device)

    teacher = trained().eval() if args.distill else None
    torch.manual_seed(seed + 7)
    t0 = time.perf_counter()
    extra: Dict[str, object] = {}
    tag = f"{method} seed {seed}"
    if method == "dense":
        model = trained()
        phase.run(model, phase.optimizer(model), 0, total, tag, teacher=teacher)
    elif method in ("hfp", "hfp_latency"):
        if method == "hfp":
            budget, options = {"macs": args.target}, {"rerank_every": args.rerank_every}
        else:
            goal = next((r.get("latency_ratio") for r in previous if r["method"] == "hfp" and r["seed"] == seed), None)
            if goal is None:
                raise SystemExit("error: hfp_latency targets the latency the same seed's hfp model measured: "
                                 "run --methods hfp hfp_latency --latency")
            goal = extra["latency_target"] = min(goal, 1.0)  # a tiny net's pruned copy may time as slow as dense
            budget = {"latency": goal}
            options = {"latency_options": LatencyOptions(variants=3 if args.quick else 8, rounds=args.latency_rounds)}
        prepared = hfp_fx.prepare(trained(), example, budget, gates="width", budget=args.hfp_budget,
                                  lambda_init=args.lambda_init, dual_rate=args.dual_rate, warmup_steps=0,
                                  ramp_steps=int(round(args.ramp_epochs * per_epoch)), **options)
        opt = phase.optimizer(prepared, hfp_fx.gate_parameters(prepared))
        ramp = int(round(args.ramp_epochs * per_epoch))
        # hfp_latency: measure the current widths a few times once the ramp is over, so the loss
        # aims at the measured latency and finalize need not cut into the trained widths
        stops = sorted({min(gated, max(1, ramp + (gated - ramp) * k // args.recalibrate))
                        for k in range(args.recalibrate)} | {gated}) if method == "hfp_latency" and args.recalibrate \
            else [gated]
        start = 0
        for stop in stops:
            phase.run(prepared, opt, start, stop, tag + " (gated)", hfp=True, teacher=teacher)
            start = stop
            if stop < gated:
                prepared.eval()
                info = hfp_fx.recalibrate_latency(prepared)
                extra.setdefault("latency_recalibrations", []).append({"step": stop, **info})
                print(f"  [{tag}] step {stop}: predicted {info['predicted_ratio']:.3f}, measured "
                      f"{info['measured_ratio']:.3f} -> latency scale {info['scale']:.3f}", flush=True)
        prepared.eval()
        extra["acc_gated"] = evaluate(prepared, data)
        model = hfp_fx.finalize(prepared)
        report = model.meta["hfp"].latency
        if report is not None:  # a latency target: what the library predicted and measured
            extra.update(library_latency_ratio=report.measured_ratio,
                         predicted_latency_ratio=report.predicted_ms / report.dense_ms,
                         latency_corrections=report.corrections, latency_correction_refused=report.refused)
        extra["acc_after_prune"] = evaluate(model, data)
        phase.run(model, phase.optimizer(model), gated, total, tag, teacher=teacher)
    elif method in ("hfp_alloc", "hfp_search"):
        search = method == "hfp_search"  # the weights stay frozen, the fine-tune gets the whole budget
        model, extra["alloc"] = hfp_allocation_cut(trained, example, data, args, phase, per_epoch, tag, teacher,
                                                   train_weights=not search)
        extra["acc_after_prune"] = evaluate(model, data)
        phase.run(model, phase.optimizer(model), 0 if search else extra["alloc"]["gated_steps"], total, tag,
                  teacher=teacher)
    elif method == "l1":
        model = hfp_fx.prune(trained(), example, {"macs": args.target}, importance="l1")
        extra["acc_after_prune"] = evaluate(model, data)
        phase.run(model, phase.optimizer(model), 0, total, tag, teacher=teacher)
    elif method in ("tp_magnitude", "tp_taylor"):
        model = trained()
        extra.update(tp_prune_to_target(model, example, method, target_macs, data, args))
        extra["acc_after_prune"] = evaluate(model, data)
        phase.run(model, phase.optimizer(model), 0, total, tag, teacher=teacher)
    elif method == "tp_groupnorm_sparse":
        model = trained()
        pruner = make_tp_pruner(model, example, method, args)
        pruner.update_regularizer()
        # its recipe regularises with weight decay off: the group-norm penalty replaces it
        opt = phase.optimizer(model, weight_decay=0.0)
        phase.run(model, opt, 0, gated, tag + " (sparse)", teacher=teacher,
                  after_backward=lambda: pruner.regularize(model))
        extra.update(tp_prune_to_target(model, example, method, target_macs, data, args, pruner=pruner))
        extra["acc_after_prune"] = evaluate(model, data)
        phase.run(model, phase.optimizer(model), gated, total, tag, teacher=teacher)
    elif method in ("uniform", "uniform_ft"):
        widths, _, _ = fm.uniform_widths(args.widths, args.blocks, example.cpu(), args.target)
        extra["widths"] = list(widths)
        torch.manual_seed(seed + 3)
        model = fm.FashionResNet(widths, args.blocks).to(args.device)
        epochs = args.finetune_epochs + (args.epochs if method == "uniform" else 0)
        scratch = Phase(data, args, epochs * per_epoch, args.lr, seed + 3)
        scratch.run(model, scratch.optimizer(model), 0, scratch.steps, tag, teacher=teacher)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    counts = hfp_fx.count(copy.deepcopy(model).eval(), example)
    if args.latency or method == "hfp_latency":
        # both in eval mode at batch 1, the deployment the latency target describes
        _, _, extra["latency_ratio"] = measure_latency(trained().eval(), copy.deepcopy(model).eval(), (example,),
                                                       rounds=args.latency_rounds)
    row = {"method": method, "seed": seed, "acc": evaluate(model, data),
           "macs_ratio": counts.macs / dense_counts.macs, "params_ratio": counts.params / dense_counts.params,
           "epochs": args.finetune_epochs if method == "uniform_ft" else args.epochs + args.finetune_epochs,
           "dense_acc": dense["accuracy"],
           "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
           "device": device_name(args.device), "distill": bool(args.distill), **extra}
    print(f"==> {method} seed {seed}: {row['acc']:.2f}% MACs {row['macs_ratio']:.3f} "
          f"params {row['params_ratio']:.3f} ({row['seconds']:.0f}s)", flush=True)
    return row


# ---------------------------------------------------------------------------------- report
def summarize(rows: List[dict], target: float) -> dict:
    """Mean and std per method, and HFP's margin over the best Torch-Pruning method."""
    per = {}
    for method in METHODS:
        accs = [r["acc"] for r in rows if r["method"] == method]
        if not accs:
            continue
        macs = [r["macs_ratio"] for r in rows if r["method"] == method]
        latency = [r["latency_ratio"] for r in rows if r["method"] == method and "latency_ratio" in r]
        per[method] = {"latency_mean": statistics.mean(latency)} if latency else {}
        per[method].update({"n": len(accs), "acc_mean": statistics.mean(accs),
                       "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                       "macs_mean": statistics.mean(macs), "macs_max": max(macs),
                       "params_mean": statistics.mean(r["params_ratio"] for r in rows if r["method"] == method)})
    summary = {"methods": per,
               "hfp_fx_rows_over_budget": [f"{r['method']} seed {r['seed']}" for r in rows
                                           if r["method"] in ("hfp", "l1") and r["macs_ratio"] > target + 1e-9]}
    pairs = [(r, next(h for h in rows if h["method"] == "hfp" and h["seed"] == r["seed"]))
             for r in rows if r["method"] == "hfp_latency"]
    if pairs:  # the same seed's hfp row set the latency target
        diffs = [r["acc"] - h["acc"] for r, h in pairs]
        margin, std = statistics.mean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
        summary["hfp_latency_vs_hfp"] = {
            "acc_margin_pt": margin, "per_seed_pt": diffs, "std_pt": std,
            "macs_kept_x": statistics.mean(r["macs_ratio"] / h["macs_ratio"] for r, h in pairs),
            "latency_x": statistics.mean(r["latency_ratio"] / h["latency_ratio"] for r, h in pairs),
            "verdict": ("at least as accurate" if margin >= 0 else
                        "less accurate, inside the per-seed spread" if margin >= -std else "less accurate")}
    tps = [m for m in TP_METHODS if m in per]
    for ours in ("hfp", "hfp_alloc", "hfp_search"):
        if ours not in per or not tps:
            continue
        best = max(tps, key=lambda m: per[m]["acc_mean"])
        margin = per[ours]["acc_mean"] - per[best]["acc_mean"]
        noise = max(per[ours]["acc_std"], per[best]["acc_std"])
        summary[f"{ours}_vs_best_tp"] = {
            "best_tp": best, "margin_pt": margin, "seed_std_pt": noise,
            "verdict": ("win" if margin > noise else "tie (inside the seed-to-seed std)" if margin >= -noise
                        else "loss")}
    return summary


def markdown(result: dict) -> str:
    per = result["summary"]["methods"]
    lines = ["| method | test acc (%) mean +- std | seeds | MACs ratio (mean, max) | params ratio | latency ratio (b1) |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, s in per.items():
        latency = f"{s['latency_mean']:.3f}" if "latency_mean" in s else ""
        lines.append(f"| {method} | {s['acc_mean']:.2f} +- {s['acc_std']:.2f} | {s['n']} | "
                     f"{s['macs_mean']:.3f}, {s['macs_max']:.3f} | {s['params_mean']:.3f} | {latency} |")
    lat = result["summary"].get("hfp_latency_vs_hfp")
    if lat:
        lines.append(f"\nhfp_latency vs hfp at the latency hfp measured: {lat['acc_margin_pt']:+.2f} pt "
                     f"(per seed {', '.join(f'{d:+.2f}' for d in lat['per_seed_pt'])}), {lat['macs_kept_x']:.2f}x the MACs, "
                     f"{lat['latency_x']:.3f}x the measured latency: {lat['verdict']}")
    for ours in ("hfp", "hfp_alloc", "hfp_search"):
        cmp = result["summary"].get(f"{ours}_vs_best_tp")
        if cmp:
            lines.append(f"\n{ours} vs the best Torch-Pruning method ({cmp['best_tp']}): {cmp['margin_pt']:+.2f} pt, "
                         f"seed-to-seed std {cmp['seed_std_pt']:.2f} pt: {cmp['verdict']}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # every pruned method sits at the same MACs, so accuracy per method (seeds as dots) says more
    # than accuracy vs MACs; each label carries the method's mean MACs ratio
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    colors = {"dense": "k", "hfp": "tab:red", "hfp_alloc": "tab:pink", "hfp_search": "tab:brown", "l1": "tab:blue", "tp_magnitude": "tab:purple",
              "tp_taylor": "tab:olive", "tp_groupnorm_sparse": "tab:cyan", "uniform": "tab:green", "uniform_ft": "tab:gray",
              "hfp_latency": "tab:orange"}
    methods = list(result["summary"]["methods"].items())
    for i, (method, s) in enumerate(methods):
        rows = [r for r in result["rows"] if r["method"] == method]
        color = colors.get(method, "gray")
        ax.scatter([i + 0.12] * len(rows), [r["acc"] for r in rows], color=color, alpha=0.45, s=20)
        ax.errorbar(i, s["acc_mean"], yerr=s["acc_std"], color=color, marker="*" if method == "hfp" else "o",
                    ms=12 if method == "hfp" else 7, capsize=4)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([f"{m}\nMACs {s['macs_mean']:.3f}" for m, s in methods], fontsize=8)
    ax.set_ylabel("test accuracy (%): mean +- std, dots = seeds")
    cfg = result["config"]
    ax.set_title(f"Fashion-MNIST, pruned to {cfg['target']:.0%} MACs after {cfg['epochs']} dense epochs, "
                 f"+{cfg['finetune_epochs']} epochs each (uniform: {cfg['epochs'] + cfg['finetune_epochs']} from scratch)",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    result["summary"] = summarize(result["rows"], result["config"]["target"])
    print()
    print(markdown(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    with contextlib.suppress(ImportError):
        plot(result, out.with_suffix(".png"))
    print(f"\nwrote {out}")


# options that may differ between the parts of one merged result
MERGE_MAY_DIFFER = {"methods", "seeds", "out", "threads", "merge", "no_cache", "data_dir", "device",
                    "alloc_epochs", "calib_batches",  # (hfp_alloc rows record theirs)
                    "merged_from"}  # (a merged result may be merged again)


#: options that shape only hfp and hfp_latency: a part without those rows may differ in them
HFP_ONLY = {"hfp_budget", "ramp_epochs", "gate_lr", "lambda_init", "dual_rate", "rerank_every", "recalibrate"}


def merge(paths: Sequence[Path]) -> dict:
    """One result holding the rows of ``paths`` (methods or seeds split over processes)."""
    raw = [json.loads(Path(p).read_text()) for p in paths]
    with_hfp = [p for p, part in zip(paths, raw) if any(r["method"].startswith("hfp") for r in part["rows"])]
    fm.load_mergeable(with_hfp or paths[:1], MERGE_MAY_DIFFER)  # hfp's own options agree among its parts
    ordered = list(with_hfp) + [p for p in paths if p not in with_hfp]
    parts = fm.load_mergeable(ordered, MERGE_MAY_DIFFER | HFP_ONLY)
    first = parts[0]
    seen = set()
    for part in parts:
        for r in part["rows"]:
            if (r["method"], r["seed"]) in seen:
                raise SystemExit(f"error: {r['method']} seed {r['seed']} appears twice")
            seen.add((r["method"], r["seed"]))
    order = {m: i for i, m in enumerate(METHODS)}
    merged = copy.deepcopy(first)  # the first part with hfp rows, so its hfp options are the config's
    merged["rows"] = sorted((r for part in parts for r in part["rows"]), key=lambda r: (order[r["method"]], r["seed"]))
    merged["config"]["merged_from"] = [f for p, part in zip(ordered, parts)
                                       for f in part["config"].get("merged_from") or [str(p)]]
    merged["cpu_seconds"] = round(sum(p["cpu_seconds"] for p in parts), 1)
    return merged


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--target", type=float, default=0.4, help="MACs fraction every pruned method must reach")
    p.add_argument("--epochs", type=int, default=3, help="E: epochs of the dense model")
    p.add_argument("--finetune-epochs", type=int, default=2, help="F: the extra epochs every method gets")
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--hfp-epochs", type=float, default=1.0,
                   help="H: gated epochs of hfp (and sparse-training epochs of tp_groupnorm_sparse), part of F")
    p.add_argument("--alloc-epochs", type=float, default=0.5,
                   help="hfp_alloc: gated epochs of the allocation search (of the F)")
    p.add_argument("--calib-batches", type=int, default=8, help="hfp_alloc: training batches of its Taylor cut")
    p.add_argument("--ramp-epochs", type=float, default=0.5, help="hfp: the target ramps from dense over these")
    p.add_argument("--lambda-init", type=float, default=1e-3)
    p.add_argument("--dual-rate", type=float, default=0.02)
    p.add_argument("--gate-lr", type=float, default=0.17, help="hfp: constant SGD lr of the widths")
    p.add_argument("--rerank-every", type=int, default=0,
                   help="hfp: prepare(rerank_every=N), re-rank channels by Taylor importance every N steps")
    p.add_argument("--hfp-budget", default="penalty", choices=("penalty", "project"),
                   help="hfp, hfp_latency: prepare(budget=...), how the gated phase meets the target")
    p.add_argument("--recalibrate", type=int, default=3,
                   help="hfp_latency: hfp_fx.recalibrate_latency calls during the gated phase, from the end of "
                        "the target ramp on (0: none)")
    p.add_argument("--tp-steps", type=int, default=200, help="Torch-Pruning iterative_steps")
    p.add_argument("--tp-max-ratio", type=float, default=0.9, help="Torch-Pruning pruning_ratio / max_pruning_ratio")
    p.add_argument("--tp-reg", type=float, default=5e-4, help="tp_groupnorm_sparse: GroupNormPruner(reg=...)")
    p.add_argument("--distill", action="store_true", help="knowledge distillation from the dense model, every method")
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=4.0)
    p.add_argument("--widths", type=int, nargs="+", default=[24, 48, 96])
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="dense and uniform: peak lr of the cosine schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--train-subset", type=int, default=0, help="only the first N training images (0 = all)")
    p.add_argument("--quick", action="store_true", help="minutes: widths 8/16/32, one block per stage, 2k images, "
                   "E=F=1, one seed")
    p.add_argument("--synthetic", action="store_true", help="random class templates instead of Fashion-MNIST")
    p.add_argument("--no-cache", action="store_true", help="train the dense models again, save nothing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency", action="store_true", help="measure every final model's batch-1 latency vs dense")
    p.add_argument("--latency-rounds", type=int, default=60, help="pairs of alternating timing blocks per ratio")
    p.add_argument("--device", default="cpu", help="training device, e.g. cuda")
    p.add_argument("--data-dir", type=Path, default=fm.DATA_DIR)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only combine these result files (methods or seeds split over processes) into --out")
    a = p.parse_args(argv)
    if a.quick:
        a.widths, a.blocks, a.epochs, a.finetune_epochs = [8, 16, 32], [1, 1, 1], 1, 1
        a.hfp_epochs, a.ramp_epochs, a.alloc_epochs, a.tp_steps = 0.5, 0.25, 0.25, 100
        a.train_subset = a.train_subset or 2000
        a.latency_rounds = min(a.latency_rounds, 10)
        a.seeds = a.seeds if argv and "--seeds" in argv else [0]
    if "hfp_latency" in a.methods:
        if "hfp" not in a.methods or a.methods.index("hfp") > a.methods.index("hfp_latency"):
            p.error("hfp_latency targets the latency of the same seed's hfp model: list hfp before it")
        a.latency = True
    if not 0 < a.hfp_epochs <= a.finetune_epochs:
        p.error("need 0 < --hfp-epochs <= --finetune-epochs")
    if not 0 < a.alloc_epochs < a.finetune_epochs:
        p.error("need 0 < --alloc-epochs < --finetune-epochs (hfp_alloc fine-tunes after its search)")
    if a.out is None:
        a.out = RESULTS / ("quality_quick.json" if a.quick else "quality.json")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.merge:
        result = merge(a.merge)
        write(result, a.out)
        return result
    torch.set_num_threads(a.threads)
    t_start = time.process_time()
    if a.synthetic:
        data = synthetic_data(a.train_subset or 4000, 1000)
    else:
        data = fm.load_fashion_mnist(fm.ensure_dataset(a.data_dir))
        if a.train_subset:
            data = ((data[0][0][:a.train_subset], data[0][1][:a.train_subset]), data[1])
    if any(m in TP_METHODS for m in a.methods) and importlib.util.find_spec("torch_pruning") is None:
        raise SystemExit("error: the tp_* methods need Torch-Pruning: pip install -e '.[bench]'")
    data = tuple(tuple(t.to(a.device) for t in part) for part in data)
    example = data[1][0][:1].clone()
    dense_counts = hfp_fx.count(fm.FashionResNet(a.widths, a.blocks).to(a.device), example)
    print(f"{len(data[0][1])} train / {len(data[1][1])} test images; FashionResNet({a.widths}, {a.blocks}): "
          f"{dense_counts}; E={a.epochs} F={a.finetune_epochs} H={a.hfp_epochs}; {torch.get_num_threads()} threads",
          flush=True)
    result = {"target_macs": a.target,
              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "dense": {"params": dense_counts.params, "macs": dense_counts.macs},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpus": os.cpu_count(), "git": fm.git_describe()},
              "rows": []}
    for seed in a.seeds:
        dense = trained_dense(data, a, seed) if any(m not in ("uniform", "uniform_ft") for m in a.methods) else {"accuracy": None}
        for method in a.methods:
            result["rows"].append(run_method(method, seed, dense, data, a, example, dense_counts, result["rows"]))
            result["cpu_seconds"] = round(time.process_time() - t_start, 1)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.with_suffix(".partial.json").write_text(json.dumps(result, indent=1))
    result["cpu_seconds"] = round(time.process_time() - t_start, 1)
    write(result, a.out)
    a.out.with_suffix(".partial.json").unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    main()
