"""Which Hugging Face decoder families hfp_fx prunes exactly and brings back to their own class.

For every family, a tiny random-init configuration (2 layers, hidden 48, 6 query heads over 2
key/value heads of dim 8 where the family has GQA, MLP 64, vocabulary 64) in eval mode, with the
default capture (no ``capture=`` argument):

* **groups**: the prunable groups and what they hold (stream, heads, mlp, whole experts, the
  experts' width);
* **exact**: ``shrink`` against ``mask`` on a random keep of half of every prunable group (max
  relative error of the logits);
* **params**: ``prune(model, x, {"params": t}, uniform_blocks=True)`` for the first of 50%, 70%,
  85% that is feasible (LayerNorm families keep the stream whole, which sets a higher floor);
* **round trip**: ``to_pretrained`` then ``save_pretrained`` / ``from_pretrained`` gives the pruned
  graph's logits, or the ``ValueError`` that names what works.

    python benchmarks/hf_families.py                    # all families (~2 min on 2 cores)
    python benchmarks/hf_families.py --families llama gemma2 --markdown

Writes ``benchmarks/results/hf_families.json``; ``--markdown`` prints the table of
``docs/transformers.md``.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

import hfp_fx

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = (0.5, 0.7, 0.85)  #: params targets tried in turn with uniform_blocks=True

_COMMON = dict(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
_MHA = dict(num_key_value_heads=None, head_dim=None)  # families without these config fields
#: 4 query heads of dim 12: the hidden size a config fit keeps is a multiple of the query heads
#: and, for torch._grouped_mm, of 8 (24 with 6 heads, too coarse for a 48-wide model)
_MOE = dict(num_attention_heads=4, head_dim=12, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=48)

#: family -> (config class, model class, config overrides); LayerNorm families use their own names
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _MHA),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=48, n_layer=2, n_head=6, n_positions=64, n_inner=64,
                                                   bos_token_id=0, eos_token_id=0, **_MHA)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=64, word_embed_proj_dim=48, **_MHA)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=False, multi_query=True,
                                                              head_dim=None, num_key_value_heads=None)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", _MOE),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _MOE),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _MOE),
}


def build(family: str, seed: int = 0, tie: bool = None):
    """A tiny random-init model of ``family`` in eval mode (weights drawn with ``seed``)."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    kwargs = {k: v for k, v in {**_COMMON, **extra}.items() if v is not None}  # None: the family has no such field
    if tie is not None:
        kwargs["tie_word_embeddings"] = tie
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_name)(**kwargs)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): draw them so a wrong rescale shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(p + 0.2 * torch.randn_like(p))
    return model


def example(seed: int = 1) -> dict:
    return {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))}


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (a.abs().max() + 1e-12))


def kind_of(group) -> str:
    """What a prunable group of a decoder holds, from its members' parameter names: ``stream``,
    ``heads``, ``mlp``, ``experts`` (whole experts: router rows) or ``expert_mlp`` (their width)."""
    names = [m.target for m in group.members]
    layers = {m.group(1) if m else None for m in (re.search(r"\.(\d+)\.", n) for n in names)}
    if len(layers) > 1:  # members in several layers (or outside them): the residual stream
        return "stream"
    if any(m.target.endswith("mlp.gate.weight") and m.dim == 0 for m in group.members):
        return "experts"
    if any("experts." in n for n in names):
        return "expert_mlp"
    if any(k in n for n in names for k in ("q_proj", "qkv", "query_key_value", "c_attn")):
        return "heads"
    return "mlp"


def survey(family: str, seed: int = 0) -> dict:
    row = {"family": family}
    try:
        model, x = build(family, seed), example()
        layout = hfp_fx.plan.hf_layouts.layout_of(model)
        row.update({"class": type(model).__name__, "norm": layout.norm if layout else "?"})
        start = time.perf_counter()
        dg = hfp_fx.dependency_graph(model, x)
        row["build_s"] = round(time.perf_counter() - start, 2)
        kinds = {}
        for g in dg.prunable_groups:
            kinds[kind_of(g)] = kinds.get(kind_of(g), 0) + 1
        row.update(capture=dg.capture if hasattr(dg, "capture") else None, kinds=kinds,
                   prunable_fraction=round(dg.prunable_fraction(), 4),
                   blocked={g.reason for g in dg.groups if not g.prunable} and sorted(
                       {str(g.reason) for g in dg.groups if not g.prunable}))
        gen = torch.Generator().manual_seed(seed)
        keep = {g.id: sorted(torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 2)].tolist())
                for g in dg.prunable_groups}
        args = tuple(x.values())
        with torch.no_grad():
            row["random_keep_max_rel_err"] = max_rel_err(hfp_fx.mask(dg, keep=keep)(*args),
                                                         hfp_fx.shrink(dg, keep=keep)(*args))
    except Exception as exc:  # a row per family: the failure is the finding
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        row["trace"] = traceback.format_exc()[-1500:]
        return row
    for target in TARGETS:  # the smallest a config-loadable model reaches (LayerNorm: stream whole)
        try:
            small = hfp_fx.prune(model, x, {"params": target}, uniform_blocks=True)
        except hfp_fx.InfeasibleTargetError as exc:
            row.setdefault("infeasible", {})[str(target)] = str(exc)[:300]
            continue
        except Exception as exc:
            row["prune_error"] = f"{type(exc).__name__}: {exc}"[:400]
            return row
        report = small.meta["hfp"]
        row["target"], row["params_ratio"] = target, round(report.achieved.params / report.dense.params, 4)
        break
    else:
        return row
    try:
        hf = hfp_fx.to_pretrained(small, like=model).eval()
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            loaded = type(model).from_pretrained(folder).eval()
        with torch.no_grad():
            row["round_trip_max_rel_err"] = max_rel_err(loaded(**x).logits, small(*args))
        dense, pruned = model.config.to_dict(), loaded.config.to_dict()
        row["config_changes"] = {k: [dense[k], v] for k, v in pruned.items()
                                 if k in dense and dense[k] != v and isinstance(v, (int, float))
                                 and not isinstance(v, bool)}
    except ValueError as exc:
        row["round_trip_refused"] = str(exc)[:400]
    except Exception as exc:
        row["round_trip_error"] = f"{type(exc).__name__}: {exc}"[:400]
    return row


def markdown(rows) -> str:
    """The table of ``docs/transformers.md``."""
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["family"], r.get("class", ""), "", "error: " + r["error"][:60], "", "", "", ""])
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kinds"].items())) or "none"
        if "params_ratio" in r:
            reached = f"{r['params_ratio']:.1%} (target {r['target']:.0%})"
        else:
            reached = "infeasible" if "infeasible" in r else r.get("prune_error", "—")[:60]
        if "round_trip_max_rel_err" in r:
            changes = ", ".join(f"{k} {a}->{b}" for k, (a, b) in r.get("config_changes", {}).items()
                                if k != "rms_norm_eps")
            trip = f"yes ({r['round_trip_max_rel_err']:.0e}): {changes}"
        elif "round_trip_refused" in r:
            trip = "refused: " + r["round_trip_refused"].split(" (")[0].split(";")[0][:70]
        else:
            trip = r.get("round_trip_error", "—")[:60]
        table.append([r["family"], r["class"], r["norm"], kinds, f"{r['random_keep_max_rel_err']:.0e}",
                      "yes" if r["kinds"].get("stream") else "no", reached, trip])
    return tabulate(table, headers=["family", "class", "norm", "prunable groups", "shrink vs mask",
                                    "stream prunable", "prune(uniform_blocks=True)", "to_pretrained + save/load"],
                    tablefmt="github")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="*", default=list(FAMILIES))
    ap.add_argument("--out", default=str(RESULTS / "hf_families.json"))
    ap.add_argument("--markdown", action="store_true", help="print the docs table only")
    args = ap.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # save_pretrained / from_pretrained per family

    rows = []
    for family in args.families:
        row = survey(family)
        rows.append(row)
        if not args.markdown:
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    print(markdown(rows))
    Path(args.out).write_text(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
