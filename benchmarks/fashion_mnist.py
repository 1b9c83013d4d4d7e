"""Evidence benchmark for HFP training: a ResNet-style CNN on Fashion-MNIST, pruned to 40% MACs.

Every run gets the same total budget of ``E`` training epochs (``--epochs``) over the 60k
training images, with one global cosine learning-rate schedule over those ``E`` epochs:

* ``dense``        the unpruned model, trained ``E`` epochs from scratch;
* ``hfp-macs40``   HFP: the dense run's state after ``W`` warm epochs (``--warm``, default 0: the
                   initial weights) is ``hfp_fx.prepare``-d with ``{"macs": 0.4}``, trained ``H``
                   epochs (``--hfp-epochs``) with ``cross_entropy + hfp_fx.complexity_loss``, then
                   ``hfp_fx.finalize``-d and the small model is trained on for ``E - W - H`` epochs;
* ``hfp-params40`` the same with ``{"params": 0.4}``;
* ``l1-macs40``    one-shot ``hfp_fx.prune(..., {"macs": 0.4}, importance="l1")`` of the same
                   ``W``-epoch dense state, trained on for ``E - W`` epochs;
* ``uniform``      the same architecture with every width scaled by one factor so that MACs are
                   at most 40% of dense (picked with ``hfp_fx.count``), trained ``E`` epochs from scratch.
* ``hfp-scratch``  the widths ``hfp-macs40`` found, re-initialised and trained from scratch for the
                   epochs left of the budget, ``E - W - H`` (``E + F - H`` with fine-tuning); it
                   separates the allocation from the training dynamics.

``--finetune-epochs F`` switches to the prune-a-trained-model protocol: the pruned runs start
from the dense model after all ``E`` epochs and get a new cosine schedule of ``F`` epochs from
``--finetune-lr``; ``uniform`` then trains ``E + F`` epochs from scratch (``--dense-checkpoint``
saves or reuses the trained dense model).

Defaults: widths 24/48/96 with two residual blocks per stage (392k params, 12.4M MACs), ``W=0``.
HFP hyper-parameters: the library's per-group widths (``--gates width``) in their own SGD group
(lr 0.17 constant, momentum 0.9, no weight decay), ``H=3`` gated epochs with the target ramped
from dense to 40% over the first 2 (``--ramp-epochs 2``), ``lambda_init=1e-3``,
``dual_rate=0.02``, ``warmup_steps=0``.  ``--gates channel`` runs the per-channel gates with the
settings found by sweeps of about 30 configurations (docs/benchmarks.md): ``H=1``, no ramp,
lr 0.01, ``threshold=0.3`` (library default 0.05), ``gate_max=1``, ``cost_power=0.5``.  With uncapped
gates and the library's threshold 0.05 the gates of a group shrink together (the consuming conv
is followed by batch norm, so a uniform shrink costs the task loss nothing) until they sit near
0.05, where the task-loss gradient of a gate grows roughly like 1/g.

Why ``W=0``: with this epoch budget, what the pruned network is trained for after pruning
matters more than what the dense network learned before it; learning the widths during the
first epoch and training the small network for the other nine beat pruning after two dense
epochs (``--warm 2 --hfp-epochs 2``) by 0.4 pt.  ``l1-macs40`` at ``W=0`` is magnitude pruning
at initialisation.

Data: Debian's ``dataset-fashion-mnist`` package (IDX files, gzipped, under
``/usr/share/datasets/fashion-mnist``); the script installs it with apt-get when it is missing.
Results: a markdown table on stdout, ``benchmarks/results/fashion_mnist.json`` and
``benchmarks/results/fashion_mnist.png``.

    python benchmarks/fashion_mnist.py            # full run: about 15 min on 2 idle CPU cores (53 min
                                                  # measured while another job kept the load at ~6)
    python benchmarks/fashion_mnist.py --quick    # smoke check: 6k images, E=3 (3.5 min measured under load)
    python benchmarks/fashion_mnist.py --runs dense hfp-macs40 --epochs 6
    python benchmarks/fashion_mnist.py --merge a.json b.json   # one table from runs split over processes
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

# OpenMP threads that sleep instead of spin when idle: far more robust on a shared 2-core
# machine (spinning threads made epochs up to 10x slower when another process was busy)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hfp_fx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEB_PACKAGE = "dataset-fashion-mnist"
FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
MEAN, STD = 0.2860, 0.3530
RUNS = ("dense", "hfp-macs40", "hfp-params40", "hfp-scratch", "l1-macs40", "uniform")


# --------------------------------------------------------------------------------------- data
def ensure_dataset(data_dir: Path) -> Path:
    """Return ``data_dir``; install the Debian package first when it is the default and absent."""
    if data_dir.is_dir() and any(data_dir.iterdir()):
        return data_dir
    if data_dir != DATA_DIR:
        raise SystemExit(f"error: {data_dir} does not exist or is empty (it should hold the Fashion-MNIST "
                         "IDX files: train-images-idx3-ubyte[.gz], ...)")
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit(f"error: {data_dir} is missing and apt-get is not available; install the Debian "
                         f"package {DEB_PACKAGE} or pass --data-dir DIR with the Fashion-MNIST IDX files")
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else [])
    print(f"{data_dir} is missing: installing the Debian package {DEB_PACKAGE} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    commands = [sudo + [apt, "install", "-y", DEB_PACKAGE]]
    ok = subprocess.run(commands[0], env=env, capture_output=True, text=True)
    if ok.returncode != 0:  # the package lists may be stale or empty: update once and retry
        commands = [sudo + [apt, "update"], sudo + [apt, "install", "-y", DEB_PACKAGE]]
        for cmd in commands:
            ok = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if ok.returncode != 0:
                break
    if ok.returncode != 0 or not data_dir.is_dir():
        tail = "\n".join((ok.stdout + ok.stderr).strip().splitlines()[-8:])
        raise SystemExit(f"error: could not install {DEB_PACKAGE} (`{' '.join(ok.args)}` exited "
                         f"{ok.returncode}):\n{tail}\nInstall it by hand (apt-get update && apt-get install -y "
                         f"{DEB_PACKAGE}) or pass --data-dir DIR with the Fashion-MNIST IDX files.")
    return data_dir


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): big-endian magic, dims, then the raw array."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"neither {candidates[0]} nor {candidates[1]} exists")
    opener = gzip.open if found.suffix == ".gz" else open
    with opener(found, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{found} is not an IDX file (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{found}: header says {shape} but holds {data.size} values")
    return data.reshape(shape).astype(np.dtype(dtypes[dtype_code]).newbyteorder("="))


def load_fashion_mnist(data_dir: Path):
    arrays = {k: read_idx(data_dir / v) for k, v in FILES.items()}

    def images(a):
        return ((torch.from_numpy(a.astype(np.float32)) / 255.0 - MEAN) / STD).unsqueeze(1).contiguous()

    train = (images(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64)))
    test = (images(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)))
    assert train[0].shape == (60000, 1, 28, 28) and test[0].shape == (10000, 1, 28, 28), (train[0].shape, test[0].shape)
    return train, test


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``pad`` pixels (zero padding)."""
    b, _, h, w = x.shape
    dev = x.device  # random draws on the CPU generator (same stream on every device), applied on x's device
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    xp = F.pad(x, (pad, pad, pad, pad), value=-MEAN / STD)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]
    return xp[torch.arange(b, device=dev)[:, None, None], 0, rows, cols].unsqueeze(1)


# -------------------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class FashionResNet(nn.Module):
    """Stem conv (stride 2, 28 -> 14) and one stage of basic blocks per width (14 -> 7 -> 4)."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (1, 1, 1),
                 num_classes: int = 10):
        super().__init__()
        self.widths, self.blocks = tuple(int(w) for w in widths), tuple(int(b) for b in blocks)
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def uniform_widths(widths: Sequence[int], blocks: Sequence[int], example: torch.Tensor, ratio: float
                   ) -> Tuple[Tuple[int, ...], float, float]:
    """The largest single width factor whose model has MACs <= ``ratio`` x dense."""
    dense = hfp_fx.count(FashionResNet(widths, blocks), example)
    best = None
    for k in range(1000, 0, -1):
        s = k / 1000
        ws = tuple(max(1, int(round(w * s))) for w in widths)
        c = hfp_fx.count(FashionResNet(ws, blocks), example)
        if c.macs <= ratio * dense.macs:
            best = (ws, c.params / dense.params, c.macs / dense.macs)
            break
    assert best is not None
    return best


# ----------------------------------------------------------------------------------- training
class Trainer:
    """Global cosine schedule from ``lr`` over ``epochs`` epochs; each run trains a slice [start, stop)."""

    def __init__(self, train, test, args):
        self.device = torch.device(args.device)
        self.train_x, self.train_y = (t.to(self.device) for t in train)
        self.test_x, self.test_y = (t.to(self.device) for t in test)
        self.args = args
        self.epochs, self.lr = args.epochs, args.lr  # with_schedule() makes another schedule
        self.steps_per_epoch = math.ceil(len(self.train_y) / args.batch_size)
        self.total_steps = self.epochs * self.steps_per_epoch

    def with_schedule(self, epochs: int, lr: float) -> "Trainer":
        """The same data and options with another schedule (the fine-tuning phase)."""
        other = copy.copy(self)
        other.epochs, other.lr = int(epochs), float(lr)
        other.total_steps = other.epochs * other.steps_per_epoch
        return other

    def lr_factor(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def optimizer(self, model: nn.Module, gates: Sequence[torch.nn.Parameter] = ()) -> torch.optim.Optimizer:
        a = self.args
        gate_ids = {id(p) for p in gates}
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if id(p) in gate_ids:
                continue
            (no_decay if p.dim() <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": a.weight_decay, "base_lr": self.lr, "scheduled": True},
                  {"params": no_decay, "weight_decay": 0.0, "base_lr": self.lr, "scheduled": True}]
        if gates:
            groups.append({"params": list(gates), "weight_decay": 0.0, "base_lr": a.gate_lr,
                           "momentum": a.gate_momentum,
                           "nesterov": a.gate_momentum > 0, "scheduled": a.gate_lr_schedule})
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True)

    def set_lr(self, opt: torch.optim.Optimizer, step: int) -> None:
        f = self.lr_factor(step)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * (f if g["scheduled"] else 1.0)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        correct = 0
        for i in range(0, len(self.test_y), 1000):
            correct += int((model(self.test_x[i:i + 1000]).argmax(1) == self.test_y[i:i + 1000]).sum())
        model.train(was)
        return 100.0 * correct / len(self.test_y)

    def run(self, name: str, model: nn.Module, opt: torch.optim.Optimizer, start: int, stop: int,
            hfp: bool = False, log: Optional[dict] = None) -> None:
        """Train epochs [start, stop) of the global schedule (data order depends on seed and epoch)."""
        a = self.args
        model.train()
        n = len(self.train_y)
        for epoch in range(start, stop):
            gen = torch.Generator().manual_seed(a.seed * 1000 + epoch)
            perm = torch.randperm(n, generator=gen).to(self.device)
            t0, tot, seen = time.perf_counter(), 0.0, 0
            closs_sum = 0.0
            for b in range(self.steps_per_epoch):
                step = epoch * self.steps_per_epoch + b
                idx = perm[b * a.batch_size:(b + 1) * a.batch_size]
                x, y = self.train_x[idx], self.train_y[idx]
                if not a.no_augment:
                    x = augment(x, gen)
                self.set_lr(opt, step)
                ce = F.cross_entropy(model(x), y)
                loss = ce
                if hfp:
                    closs = hfp_fx.complexity_loss(model)
                    loss = ce + closs
                    closs_sum += float(closs.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(ce.detach()) * len(y)
                seen += len(y)
                if hfp and log is not None and (b % a.log_every == 0 or b == self.steps_per_epoch - 1):
                    record_hfp(log, model, step, epoch + b / self.steps_per_epoch, float(ce.detach()),
                               float(closs.detach()))
            acc = self.evaluate(model)
            extra = ""
            if hfp:
                c = hfp_fx.complexity(model)
                lam = model.hfp.lambdas.tolist()
                extra = (f" | hard params {c['params'] / c['dense_params']:.3f} macs {c['macs'] / c['dense_macs']:.3f}"
                         f" kept {c['kept_channels']}/{c['prunable_channels']} lambda {lam[0]:.3g}/{lam[1]:.3g}"
                         f" closs {closs_sum / self.steps_per_epoch:.3g}")
                if log is not None:
                    log.setdefault("epoch_acc", []).append([epoch + 1, acc])
            print(f"  [{name}] epoch {epoch + 1}/{self.epochs} lr {opt.param_groups[0]['lr']:.4f} "
                  f"loss {tot / seen:.4f} test {acc:.2f}% ({time.perf_counter() - t0:.1f}s){extra}", flush=True)


def record_hfp(log: dict, prepared, step: int, epoch: float, ce: float, closs: float) -> None:
    c = hfp_fx.complexity(prepared)
    hfp = prepared.hfp
    per_group = hfp.kept_per_group()
    g = hfp.trainable.detach()  # the widths or the per-channel gates
    log.setdefault("trace", []).append({
        "step": step, "epoch": round(epoch, 4), "ce": round(ce, 4), "closs": round(closs, 5),
        "params_ratio": round(c["params"] / c["dense_params"], 4), "macs_ratio": round(c["macs"] / c["dense_macs"], 4),
        "lambda_params": float(hfp.lambdas[0]), "lambda_macs": float(hfp.lambdas[1]),
        "gate_mean": round(float(g.mean()), 4), "gate_min": round(float(g.min()), 4),
        "gate_max": round(float(g.max()), 4), "kept": c["kept_channels"], "kept_per_group": per_group})


# ------------------------------------------------------------------------------------ helpers
def group_table(model: nn.Module, example: torch.Tensor) -> List[dict]:
    dg = hfp_fx.dependency_graph(copy.deepcopy(model).cpu().eval(), example)
    return [{"id": g.id, "name": g.name, "channels": g.channels, "modules": g.modules}
            for g in dg.prunable_groups]


def widths_of(model: nn.Module, example: torch.Tensor, dense_groups: List[dict]) -> Dict[str, int]:
    """Channels per prune group of ``model``, matched to the dense groups by group name."""
    by_name = {g["name"]: g["channels"] for g in group_table(model, example)}
    return {g["id"]: by_name.get(g["name"]) for g in dense_groups}


def counts_entry(model: nn.Module, example: torch.Tensor, dense: hfp_fx.Counts) -> dict:
    c = hfp_fx.count(copy.deepcopy(model).cpu().eval(), example)
    return {"params": c.params, "macs": c.macs, "params_ratio": c.params / dense.params,
            "macs_ratio": c.macs / dense.macs}


def git_describe() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hfp_fx", "passes"], cwd=root,
                               capture_output=True, text=True)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None
    except OSError:
        return None


def reinitialised(small: nn.Module) -> nn.Module:
    """A copy of ``small`` (a finalized model) with fresh weights, initialised like FashionResNet."""
    fresh = copy.deepcopy(small)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    with torch.no_grad():
        for name, buf in fresh.named_buffers():
            if name.startswith("_hfp_scale_"):
                buf.fill_(1.0)  # gate values that could not be folded: not part of a fresh model
    return fresh


def dense_signature(a) -> dict:
    """The options a saved dense model was trained with (all must match to reuse it)."""
    keys = ("epochs", "widths", "blocks", "batch_size", "lr", "weight_decay", "no_augment", "seed", "train_subset")
    return {k: getattr(a, k) for k in keys}


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    style = {"dense": ("k", "o"), "hfp-macs40": ("tab:red", "*"), "hfp-params40": ("tab:orange", "P"),
             "l1-macs40": ("tab:blue", "s"), "uniform": ("tab:green", "D")}
    for name, r in runs.items():
        color, marker = style.get(name, ("gray", "x"))
        ax1.scatter(r["macs_ratio"], r["accuracy"], c=color, marker=marker, s=110 if marker == "*" else 60,
                    label=f"{name} ({r['accuracy']:.2f}%)", zorder=3)
    if "target_macs" in result["config"]:
        ax1.axvline(result["config"]["target_macs"], color="gray", ls=":", lw=1, label="MACs target")
    if "dense" in runs:
        ax1.axhline(runs["dense"]["accuracy"] - 0.5, color="k", ls="--", lw=0.8, label="dense - 0.5 pt")
    ax1.set_xlabel("MACs / dense MACs")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"Fashion-MNIST, {result['config']['epochs']} epochs per run")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, loc="lower right")

    groups = result["groups"]
    labels = [f"{g['id']}\n{g['name']}" for g in groups]
    series = [("dense", [g["channels"] for g in groups], "lightgray")]
    for name, color in (("hfp-macs40", "tab:red"), ("hfp-params40", "tab:orange"), ("l1-macs40", "tab:blue"),
                        ("uniform", "tab:green")):
        if name in runs and runs[name].get("widths"):
            series.append((name, [runs[name]["widths"].get(g["id"]) or 0 for g in groups], color))
    x = np.arange(len(groups))
    width = 0.8 / len(series)
    for i, (name, vals, color) in enumerate(series):
        ax2.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name, color=color)
    ax2.set_xticks(x)
    ax2.set_xticklabels(labels, fontsize=7, rotation=35, ha="right")
    ax2.set_ylabel("kept channels")
    ax2.set_title("kept width per prune group")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    rows = ["| run | test acc (%) | Δ vs dense (pt) | params ratio | MACs ratio | params | MACs | train time (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    dense_acc = result["runs"].get("dense", {}).get("accuracy")
    for name, r in result["runs"].items():
        delta = "" if dense_acc is None else f"{r['accuracy'] - dense_acc:+.2f}"
        rows.append(f"| {name} | {r['accuracy']:.2f} | {delta} | {r['params_ratio']:.3f} | {r['macs_ratio']:.3f} | "
                    f"{r['params']:,} | {r['macs']:,} | {r['seconds']:.0f} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=10, help="total epoch budget E of every run")
    p.add_argument("--warm", type=int, default=0, help="dense warm epochs W before pruning (HFP and L1)")
    p.add_argument("--hfp-epochs", type=int, default=None,
                   help="epochs H of HFP training with gates (default: 3 for widths, 1 for per-channel gates)")
    p.add_argument("--target", type=float, default=0.4, help="params / MACs fraction of the pruned runs")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="F > 0: prune the dense model after all E epochs and give the pruned runs a new cosine "
                        "schedule of F epochs from --finetune-lr (uniform then trains E + F epochs from scratch); "
                        "0: the pruned runs continue the dense run's schedule after W epochs")
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--dense-checkpoint", type=Path, default=None,
                   help="with --finetune-epochs: load the trained dense model from this file if it exists, "
                        "else save it there")
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    p.add_argument("--quick", action="store_true", help="smoke check: 6k training images, E=3, H=1")
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0 = all)")
    p.add_argument("--widths", type=int, nargs="+", default=[24, 48, 96])
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 2, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-augment", action="store_true")
    # HFP hyper-parameters (hfp_fx.prepare and the gate parameter group)
    p.add_argument("--lambda-init", type=float, default=1e-3)
    p.add_argument("--dual-rate", type=float, default=0.02)
    p.add_argument("--gates", choices=("width", "channel"), default="width", help="prepare(gates=...)")
    p.add_argument("--threshold", type=float, default=0.3,
                   help="gates=channel: gate threshold (library default 0.05)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--gate-max", type=float, default=1.0,
                   help="cap on gate values (prepare(gate_max=...)); 0 = no cap")
    p.add_argument("--relative-gates", action="store_true", help="prepare(relative_gates=True)")
    p.add_argument("--cost-power", type=float, default=0.5, help="prepare(cost_power=...)")
    p.add_argument("--ramp-epochs", type=float, default=None,
                   help="prepare(ramp_steps=...) in epochs: the target falls from dense to --target over them "
                        "(default: 2 for widths, 0 for per-channel gates)")
    p.add_argument("--gate-lr", type=float, default=None,
                   help="constant SGD lr of the gate parameter group (default: 0.17 for widths, 0.01 for gates)")
    p.add_argument("--gate-momentum", type=float, default=0.9)
    p.add_argument("--gate-lr-schedule", action="store_true", help="gates follow the cosine schedule too")
    p.add_argument("--log-every", type=int, default=20, help="HFP trace period in steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="training device, e.g. cuda (figures in the docs: cpu)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes next to it)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only combine the runs of these result files (one configuration split over processes "
                        "with --runs) into OUT and its plot")
    a = p.parse_args(argv)
    width = a.gates == "width"  # per-kind defaults, from the runs in docs/benchmarks.md
    a.gate_lr = (0.17 if width else 0.01) if a.gate_lr is None else a.gate_lr
    a.hfp_epochs = (3 if width else 1) if a.hfp_epochs is None else a.hfp_epochs
    a.ramp_epochs = (2.0 if width else 0.0) if a.ramp_epochs is None else a.ramp_epochs
    if a.quick:
        a.epochs, a.hfp_epochs = 3, 1
        a.ramp_epochs = min(a.ramp_epochs, 0.5)
        a.train_subset = a.train_subset or 6000
        a.log_every = min(a.log_every, 5)
    if "hfp-scratch" in a.runs and "hfp-macs40" not in a.runs:
        p.error("the hfp-scratch run retrains the widths of the hfp-macs40 run: request both")
    if a.finetune_epochs:
        if a.warm or not 1 <= a.hfp_epochs <= a.finetune_epochs:
            p.error("with --finetune-epochs F: need --warm 0 and 1 <= hfp-epochs <= F")
    elif a.warm < 0 or a.hfp_epochs < 1 or a.warm + a.hfp_epochs > a.epochs:
        p.error("need warm >= 0, hfp-epochs >= 1 and warm + hfp-epochs <= epochs")
    if len(a.widths) != len(a.blocks):
        p.error("--widths and --blocks need the same length")
    if a.out is None:
        a.out = RESULTS / ("fashion_mnist_quick.json" if a.quick else "fashion_mnist.json")
    return a


# options that may differ between the parts of one merged result (they do not change a run's outcome)
MERGE_MAY_DIFFER = {"runs", "out", "threads", "log_every", "merge", "device", "data_dir", "dense_checkpoint"}


def load_mergeable(paths: Sequence[Path], may_differ: set) -> List[dict]:
    """The result files ``paths``, refused unless their ``config`` agree outside ``may_differ``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        differ = sorted(k for k in set(first["config"]) | set(part["config"])
                        if k not in may_differ and first["config"].get(k) != part["config"].get(k))
        if differ:
            raise SystemExit(f"error: cannot merge {path} into {paths[0]}: options differ: "
                             + ", ".join(f"{k}={part['config'].get(k)!r} vs {first['config'].get(k)!r}" for k in differ))
    return parts


def merge_results(paths: Sequence[Path]) -> dict:
    """One result holding the runs of ``paths``, which must share every outcome-changing option."""
    parts = load_mergeable(paths, MERGE_MAY_DIFFER)
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:]):
        twice = sorted(set(first["runs"]) & set(part["runs"]))
        if twice:
            raise SystemExit(f"error: runs {twice} appear in more than one file")
    merged = copy.deepcopy(first)
    merged["config"]["runs"] = [r for part in parts for r in part["config"]["runs"]]
    merged["config"]["merged_from"] = [str(p) for p in paths]
    for part in parts[1:]:
        merged["runs"].update(part["runs"])
        merged.setdefault("warm", part.get("warm"))
    order = {name: i for i, name in enumerate(RUNS)}
    merged["runs"] = dict(sorted(merged["runs"].items(), key=lambda kv: order.get(kv[0], len(order))))
    merged["seconds_total"] = round(sum(part["seconds_total"] for part in parts), 1)
    return merged


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.merge:
        result = merge_results(a.merge)
        print(markdown_table(result))
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, a.out.with_suffix(".png"))
        print(f"\nwrote {a.out} and {a.out.with_suffix('.png')}")
        return result
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    data_dir = ensure_dataset(a.data_dir)
    train, test = load_fashion_mnist(data_dir)
    if a.train_subset:
        train = (train[0][:a.train_subset], train[1][:a.train_subset])
    trainer = Trainer(train, test, a)
    example = test[0][:1].clone()  # counts are per image
    dense_counts = hfp_fx.count(FashionResNet(a.widths, a.blocks), example)
    target_macs = {"macs": a.target}
    print(f"Fashion-MNIST: {len(train[1])} train / {len(test[1])} test images from {data_dir}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model FashionResNet(widths={a.widths}, blocks={a.blocks}): {dense_counts}; "
          f"E={a.epochs} W={a.warm} H={a.hfp_epochs}, {trainer.steps_per_epoch} steps/epoch", flush=True)

    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "dense": {"params": dense_counts.params, "macs": dense_counts.macs},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count()},
              "git": git_describe(), "runs": {}}
    result["config"]["target_macs"] = a.target
    groups = group_table(FashionResNet(a.widths, a.blocks), example)
    result["groups"] = [{k: g[k] for k in ("id", "name", "channels")} for g in groups]
    dense_widths = {g["id"]: g["channels"] for g in groups}

    def finish(name: str, model: nn.Module, seconds: float, **extra) -> None:
        entry = {"accuracy": trainer.evaluate(model), **counts_entry(model, example, dense_counts),
                 "seconds": round(seconds, 1), **extra}
        entry.setdefault("widths", widths_of(model, example, groups))
        result["runs"][name] = entry
        print(f"==> {name}: {entry['accuracy']:.2f}% params {entry['params_ratio']:.3f} "
              f"MACs {entry['macs_ratio']:.3f} widths {list(entry['widths'].values())} ({seconds:.0f}s)", flush=True)

    need_warm = any(r in a.runs for r in ("hfp-macs40", "hfp-params40", "l1-macs40"))
    warm_state = None
    # The pruned runs' schedule: the rest of the global one (fine-tune 0), or a new one of F epochs
    # that starts from the fully trained dense model (fine-tune F)
    if a.finetune_epochs:
        phase, start, end = trainer.with_schedule(a.finetune_epochs, a.finetune_lr), 0, a.finetune_epochs
    else:
        phase, start, end = trainer, a.warm, a.epochs
    # (0) dense baseline; its state after W epochs (all E with fine-tuning) starts every pruned run
    def warm_model() -> nn.Module:
        m = FashionResNet(a.widths, a.blocks)
        m.load_state_dict(warm_state)
        return m.eval()

    checkpoint = a.dense_checkpoint
    if a.finetune_epochs and checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved["signature"] != dense_signature(a):
            raise SystemExit(f"error: {checkpoint} was trained with other options: {saved['signature']}")
        warm_state = saved["state"]
        result["warm"] = {"epochs": a.epochs, "accuracy": saved["accuracy"], "seconds": saved["seconds"],
                          "checkpoint": str(checkpoint)}
        print(f"dense model from {checkpoint}: {saved['accuracy']:.2f}%", flush=True)
        if "dense" in a.runs:
            finish("dense", warm_model().to(trainer.device), saved["seconds"], widths=dense_widths)
    elif "dense" in a.runs or need_warm:
        seed_all(a.seed)
        model = FashionResNet(a.widths, a.blocks).to(trainer.device)
        opt = trainer.optimizer(model)
        t0 = time.perf_counter()
        warm_epochs = a.epochs if a.finetune_epochs else a.warm
        trainer.run("dense", model, opt, 0, warm_epochs)
        warm_seconds = time.perf_counter() - t0
        warm_state = copy.deepcopy(model.state_dict())
        warm_acc = trainer.evaluate(model) if warm_epochs else None
        result["warm"] = {"epochs": warm_epochs, "accuracy": warm_acc, "seconds": round(warm_seconds, 1)}
        if a.finetune_epochs and checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": warm_state, "accuracy": warm_acc, "seconds": round(warm_seconds, 1),
                        "signature": dense_signature(a)}, checkpoint)
        if "dense" in a.runs:
            trainer.run("dense", model, opt, warm_epochs, a.epochs)
            finish("dense", model, time.perf_counter() - t0, widths=dense_widths)

    # (a) HFP
    for name, target in (("hfp-macs40", {"macs": a.target}), ("hfp-params40", {"params": a.target})):
        if name not in a.runs:
            continue
        seed_all(a.seed + 1)
        t0 = time.perf_counter()
        channel_options = dict(threshold=a.threshold, gate_max=a.gate_max or None, cost_power=a.cost_power,
                               relative_gates=a.relative_gates) if a.gates == "channel" else {}
        prepared = hfp_fx.prepare(warm_model(), example, target, gates=a.gates,
                                  lambda_init=a.lambda_init, dual_rate=a.dual_rate, warmup_steps=a.warmup_steps,
                                  ramp_steps=int(round(a.ramp_epochs * trainer.steps_per_epoch)),
                                  **channel_options).to(trainer.device)
        opt = phase.optimizer(prepared, hfp_fx.gate_parameters(prepared))
        log: dict = {"target": target}
        stop = start + a.hfp_epochs
        phase.run(name, prepared, opt, start, stop, hfp=True, log=log)
        before = trainer.evaluate(prepared)
        prepared.eval()
        c = hfp_fx.complexity(prepared)
        small = hfp_fx.finalize(prepared)
        after = trainer.evaluate(small)
        report = small.meta["hfp"]
        print(f"  [{name}] finalize: gated model {before:.2f}% (hard params {c['params'] / c['dense_params']:.3f}, "
              f"MACs {c['macs'] / c['dense_macs']:.3f}) -> small model {after:.2f}% "
              f"(params {report.achieved.params / report.dense.params:.3f}, "
              f"MACs {report.achieved.macs / report.dense.macs:.3f})", flush=True)
        opt = phase.optimizer(small)
        phase.run(name, small, opt, stop, end)
        log.update({"acc_gated_before_finalize": before, "acc_after_finalize": after,
                    "hard_ratio_before_finalize": {"params": c["params"] / c["dense_params"],
                                                   "macs": c["macs"] / c["dense_macs"]}})
        widths = {gid: g.kept for gid, g in report.groups.items()}
        finish(name, small, time.perf_counter() - t0 + result["warm"]["seconds"], widths=widths, hfp=log)
        if name == "hfp-macs40" and "hfp-scratch" in a.runs:
            found = reinitialised(small)
            seed_all(a.seed + 4)
            # the widths cost W + H epochs to find: the rest of the budget trains them from scratch
            scratch = trainer.with_schedule(a.epochs + a.finetune_epochs - a.warm - a.hfp_epochs, a.lr)
            opt = scratch.optimizer(found)
            t1 = time.perf_counter()
            scratch.run("hfp-scratch", found, opt, 0, scratch.epochs)
            finish("hfp-scratch", found, time.perf_counter() - t1, widths=widths)

    # (b) one-shot L1 + fine-tune
    if "l1-macs40" in a.runs:
        seed_all(a.seed + 2)
        t0 = time.perf_counter()
        small = hfp_fx.prune(warm_model(), example, target_macs, importance="l1").to(trainer.device)
        acc0 = trainer.evaluate(small)
        print(f"  [l1-macs40] one-shot pruned model before fine-tuning: {acc0:.2f}%", flush=True)
        opt = phase.optimizer(small)
        phase.run("l1-macs40", small, opt, start, end)
        widths = {gid: g.kept for gid, g in small.meta["hfp"].groups.items()}
        finish("l1-macs40", small, time.perf_counter() - t0 + result["warm"]["seconds"], widths=widths,
               acc_after_prune=acc0)

    # (c) uniform width scaling, from scratch
    if "uniform" in a.runs:
        ws, pr, mr = uniform_widths(a.widths, a.blocks, example, a.target)
        print(f"  [uniform] widths {ws}: params {pr:.3f}, MACs {mr:.3f}", flush=True)
        seed_all(a.seed + 3)
        model = FashionResNet(ws, a.blocks).to(trainer.device)
        scratch = trainer.with_schedule(a.epochs + a.finetune_epochs, a.lr)  # the same total epochs
        opt = scratch.optimizer(model)
        t0 = time.perf_counter()
        scratch.run("uniform", model, opt, 0, scratch.epochs)
        finish("uniform", model, time.perf_counter() - t0, stage_widths=list(ws))

    result["seconds_total"] = round(time.perf_counter() - t_start, 1)
    print()
    print(markdown_table(result))
    print()
    for name, r in result["runs"].items():
        print(f"{name:>13}: " + ", ".join(f"{g['id']}:{r['widths'].get(g['id'])}/{g['channels']}" for g in groups))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    png = a.out.with_suffix(".png")
    plot(result, png)
    print(f"\nwrote {a.out} and {png} in {result['seconds_total']:.0f}s")
    return result


if __name__ == "__main__":
    main()
