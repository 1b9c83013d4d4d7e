"""A Llama from Hugging Face through HFP and back: prepare -> train -> finalize -> to_pretrained.

    python examples/prune_llama.py               # a tiny random-init Llama, 60 steps, 50% of the params
    python examples/prune_llama.py --steps 10    # a smoke run (what CI runs)

Needs transformers (``pip install -e ".[hf]"``).  The text is one sentence repeated, as bytes
(a vocabulary of 256, no tokenizer to download), so the example is self-contained; swap
``batches()`` for your data.  What it shows:

* ``capture="auto"`` captures the Hugging Face model with ``torch.export``;
* ``uniform_blocks=True`` keeps one width per kind of layer and a hidden size that is a
  multiple of the kept attention heads, so the result fits a ``LlamaConfig``;
* ``hfp_fx.to_pretrained`` turns the pruned graph back into a ``LlamaForCausalLM`` that
  ``save_pretrained`` / ``from_pretrained`` / ``generate`` work with.
"""
from __future__ import annotations

import argparse
import logging
import tempfile

import torch
import torch.nn.functional as F
import transformers

import hfp_fx

log = logging.getLogger("prune_llama")

TEXT = "the quick brown fox jumps over the lazy dog. "


def batches(steps: int, batch: int, length: int):
    """Random windows of the repeated sentence, all of one shape: the exported graph is specialised
    to the example's batch size and sequence length."""
    data = torch.tensor(list((TEXT * 20).encode()))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
        yield torch.stack([data[s:s + length] for s in starts.tolist()])


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied embedding / LM head counts once


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32, help="tokens per sequence")
    p.add_argument("--params", default="50%", help="parameter target (fraction, percent or absolute)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    # Llama has no dropout by default, so the captured graph is the same in train and eval mode
    model = transformers.LlamaForCausalLM(config).eval()
    data = batches(a.steps, a.batch, a.length)
    example = next(data)

    prepared = hfp_fx.prepare(model, {"input_ids": example}, {"params": a.params}, capture="auto",
                              uniform_blocks=True, lambda_init=0.005)
    gates = hfp_fx.gate_parameters(prepared)
    others = [q for q in prepared.parameters() if all(q is not g for g in gates)]
    # the widths get their own group: a fixed learning rate, no weight decay pulling them to 0
    opt = torch.optim.AdamW([{"params": others, "lr": 3e-3},
                             {"params": gates, "lr": 0.02, "weight_decay": 0.0}])
    prepared.train()  # the complexity loss adapts its weights in training mode only
    for step, ids in enumerate([example, *data]):
        loss = next_token_loss(prepared(ids), ids) + hfp_fx.complexity_loss(prepared)  # takes input_ids positionally
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, a.steps // 5) == 0 or step == a.steps - 1:
            log.info("step %d: loss %.3f, params %.3f of target", step, loss.item(),
                     hfp_fx.complexity(prepared)["params_ratio"])

    prepared.eval()
    small = hfp_fx.finalize(prepared)  # exact projection onto the target, then shrink
    report = small.meta["hfp"]

    # finalize's reference: the prepared model with every width set to what finalize kept
    with torch.no_grad():
        for i, gid in enumerate(prepared.hfp.group_ids):
            prepared.hfp.gates.width[i] = report.groups[gid].kept / report.groups[gid].dense
        gated, pruned = prepared(example), small(example)
    finalize_error = float((gated - pruned).abs().max())

    # back to the model's own class: the same logits at any sequence length, with a KV cache
    hf = hfp_fx.to_pretrained(small, like=model).eval()
    with torch.no_grad():
        to_pretrained_error = float((hf(example).logits - pruned).abs().max())
    folder = tempfile.mkdtemp()
    hf.save_pretrained(folder)
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        reload_error = float((loaded(example).logits - pruned).abs().max())
        prompt = torch.tensor([list(b"the quick")])
        generated = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
    text = bytes(generated[0].tolist()).decode(errors="replace")

    c = loaded.config
    log.info("params %d -> %d (target %d); hidden %d -> %d, heads %d -> %d, KV heads %d -> %d, MLP %d -> %d",
             params(model), params(loaded), report.target.params, config.hidden_size, c.hidden_size,
             config.num_attention_heads, c.num_attention_heads, config.num_key_value_heads, c.num_key_value_heads,
             config.intermediate_size, c.intermediate_size)
    log.info("max |logits difference|: finalize vs gated reference %.1e, to_pretrained %.1e, "
             "after from_pretrained %.1e", finalize_error, to_pretrained_error, reload_error)
    log.info("saved to %s; generate: %r", folder, text)
    return {"dense_params": params(model), "pruned_params": params(loaded), "target_params": report.target.params,
            "finalize_error": finalize_error, "to_pretrained_error": to_pretrained_error,
            "reload_error": reload_error, "config": c, "generated": text, "final_loss": loss.item()}


if __name__ == "__main__":
    main()
