"""Functions that pruned graphs call in place of ops whose original code ties sizes together.

torchvision's ``shifted_window_attention`` derives the head dim, the softmax scale and the
output width from the input's channel count ``C``.  Once heads or channels are removed those
sizes no longer agree, so the shrink pass retargets such nodes to :func:`window_attention`,
which computes the same thing with every size read from its own tensor (input width from
``x``, heads from ``num_heads``, head dim from ``qkv_weight``, output width from
``proj_weight``) and the scale passed in explicitly (the dense model's, which pruning heads
must not change).

The functions are ``torch.fx.wrap``-ped so that tracing a pruned model again keeps each call one
node (the Swin rules in :mod:`hfp_fx.passes.rules_swin` handle them as well).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["window_attention"]

#: value added to the logits of token pairs that a cyclic shift brought together from
#: different image regions (the Swin papers' choice; exp(-100) is 0 in float32)
_FAR = -100.0


def _regions(n: int, window: int, shift: int, device) -> torch.Tensor:
    """Which of the (up to) three bands of a shifted axis each position came from.

    After rolling by ``-shift`` the last window mixes the image's far edge with wrapped-around
    positions; attention must not cross those bands.  Without a shift there is one band.
    """
    pos = torch.arange(n, device=device)
    if shift == 0:
        return torch.zeros_like(pos)
    return (pos >= n - window).long() + (pos >= n - shift).long()


def _to_windows(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``(B, Hp, Wp, C)`` -> ``(B * windows, wh * ww, C)``, windows in row-major order."""
    B, Hp, Wp, C = x.shape
    x = x.reshape(B, Hp // wh, wh, Wp // ww, ww, C).transpose(2, 3)
    return x.reshape(B * (Hp // wh) * (Wp // ww), wh * ww, C)


def _from_windows(x: torch.Tensor, B: int, Hp: int, Wp: int, wh: int, ww: int) -> torch.Tensor:
    """Inverse of :func:`_to_windows`."""
    C = x.shape[-1]
    x = x.reshape(B, Hp // wh, Wp // ww, wh, ww, C).transpose(2, 3)
    return x.reshape(B, Hp, Wp, C)


def _shift_mask(Hp: int, Wp: int, wh: int, ww: int, sh: int, sw: int, like: torch.Tensor) -> torch.Tensor:
    """``(windows, N, N)`` additive mask: ``_FAR`` between tokens of different bands, else 0."""
    rows = _regions(Hp, wh, sh, like.device)
    cols = _regions(Wp, ww, sw, like.device)
    label = (rows[:, None] * 3 + cols[None, :]).to(like.dtype)[None, :, :, None]
    label = _to_windows(label, wh, ww).squeeze(-1)  # (windows, N)
    differ = label[:, :, None] != label[:, None, :]
    return torch.where(differ, torch.full_like(differ, _FAR, dtype=like.dtype),
                       torch.zeros_like(differ, dtype=like.dtype))


def window_attention(x: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: Sequence[int], num_heads: int,
                     shift_size: Sequence[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                     logit_scale: Optional[torch.Tensor] = None, training: bool = True,
                     scale: Optional[float] = None) -> torch.Tensor:
    """(Shifted) window multi-head self-attention on ``x`` of shape ``(B, H, W, C_in)``.

    The same computation as torchvision's ``shifted_window_attention`` (Swin V1, and V2 when
    ``logit_scale`` is given: cosine attention, no key bias), with independent sizes:
    ``qkv_weight`` is ``(3 * num_heads * head_dim, C_in)``, ``proj_weight`` is
    ``(C_out, num_heads * head_dim)`` and the result ``(B, H, W, C_out)``.  ``scale``
    multiplies the queries of V1 (default ``head_dim ** -0.5``); a pruned model passes the
    dense model's value.
    """
    B, H, W, _ = x.shape
    wh, ww = int(window_size[0]), int(window_size[1])
    pad_h, pad_w = (-H) % wh, (-W) % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    # a window that covers the whole (padded) axis has nothing to shift
    sh = int(shift_size[0]) if wh < Hp else 0
    sw = int(shift_size[1]) if ww < Wp else 0
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    windows = _to_windows(x, wh, ww)
    BW, N, _ = windows.shape

    if logit_scale is not None and qkv_bias is not None:
        third = qkv_bias.shape[0] // 3  # V2 uses no key bias, whatever the parameter holds
        qkv_bias = torch.cat([qkv_bias[:third], torch.zeros_like(qkv_bias[third:2 * third]), qkv_bias[2 * third:]])
    qkv = F.linear(windows, qkv_weight, qkv_bias)
    qkv = qkv.reshape(BW, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (BW, heads, N, head_dim)
    if logit_scale is not None:
        logits = F.normalize(q, dim=-1).matmul(F.normalize(k, dim=-1).transpose(-2, -1))
        logits = logits * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        if scale is None:
            scale = q.shape[-1] ** -0.5
        logits = (q * scale).matmul(k.transpose(-2, -1))
    logits = logits + relative_position_bias
    if sh or sw:
        mask = _shift_mask(Hp, Wp, wh, ww, sh, sw, logits)  # (windows, N, N)
        logits = logits.view(B, mask.shape[0], num_heads, N, N) + mask[None, :, None]
        logits = logits.view(BW, num_heads, N, N)
    attn = F.dropout(F.softmax(logits, dim=-1), p=attention_dropout, training=training)

    out = attn.matmul(v).transpose(1, 2).reshape(BW, N, -1)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)
    out = _from_windows(out, B, Hp, Wp, wh, ww)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()


torch.fx.wrap("window_attention")
