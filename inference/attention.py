"""GPT-OSS attention with sinks through PyTorch's fused ``scaled_dot_product_attention``, for grading.

GPT-OSS gives every head a learnt *sink*: one more logit in each query's softmax with no value
behind it, so a head may attend to nothing. transformers refuses ``sdpa`` for GPT-OSS because SDPA
has no such logit, and its eager attention writes the whole [batch, heads, queries, keys] score
tensor and then runs half a dozen passes over it (the sink column concatenated, max, subtract,
softmax, slice): on an item-grading batch that is most of the attention's time (BENCHMARKS.md,
"Round 3 on the device").

The sink is an ordinary key in disguise: give queries and keys one more dimension (padded to eight),
holding ``sink / scale`` in each query and 1 in a key prepended to the sequence (0 in every real
key), with a zero value. That key's logit is then exactly the head's sink and it adds nothing to
the output, which is the sink's definition; everything else is SDPA's own fused kernel. Grouped
query heads are folded into the query length ([batch, kv heads, group x queries, dim]) so keys and
values are never repeated per head. ``SINKS_SDPA`` is registered with transformers under that name
(with SDPA's boolean masks, never skipped, since the sink column needs a mask to sit beside); a
model switches with ``model.set_attn_implementation(SINKS_SDPA)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SINKS_SDPA = "fused_sinks"  # no "sdpa" in the name: transformers refuses sdpa for GPT-OSS by name
_PAD = 8  # the extra query/key dimensions: the sink's one, padded to a multiple of 8 for the kernels


def sinks_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       s_aux: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function signature: query [B, H, q, D], key/value [B, KV, k, D],
    ``attention_mask`` boolean [B, 1, q, k] (True: attend) or additive float; returns
    ([B, q, H, D], None)."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    g = h // kv
    scale = scaling if scaling is not None else d ** -0.5
    # fold the g query heads of each key/value head into the query length
    qf = query.reshape(b, kv, g * q, d)  # [B, KV, G, q, D] as heads are h = kv * G + g
    extra = query.new_zeros(b, kv, g, q, _PAD)
    if s_aux is not None:
        extra[..., 0] = (s_aux.to(query.dtype) / scale).view(1, kv, g, 1)
    qx = torch.cat([qf, extra.view(b, kv, g * q, _PAD)], dim=-1)
    sink_key = key.new_zeros(b, kv, 1, d + _PAD)
    sink_key[..., d] = 1.0
    kx = torch.cat([sink_key, F.pad(key, (0, _PAD))], dim=2)
    vx = torch.cat([value.new_zeros(b, kv, 1, value.shape[-1]), value], dim=2)
    mask = None
    if attention_mask is not None:
        m = attention_mask[:, :, -q:, :]  # [B, 1 or H, q, k]
        if m.shape[1] != 1:
            m = m.reshape(b, kv, g * q, m.shape[-1])
        else:
            m = m.unsqueeze(2).expand(b, 1, g, q, m.shape[-1]).reshape(b, 1, g * q, m.shape[-1])
        sink_col = (torch.ones if m.dtype == torch.bool else torch.zeros)(*m.shape[:-1], 1, dtype=m.dtype,
                                                                             device=m.device)
        mask = torch.cat([sink_col, m], dim=-1)
    elif q > 1:
        raise ValueError("sinks_sdpa_forward needs an explicit attention mask for more than one query")
    out = F.scaled_dot_product_attention(qx, kx, vx, attn_mask=mask, scale=scale,
                                         dropout_p=dropout if module.training else 0.0)
    return out.view(b, kv, g, q, -1).reshape(b, h, q, -1).transpose(1, 2).contiguous(), None


def _sinks_mask(*args, **kwargs):
    """SDPA's boolean mask, always built (SDPA may skip it for plain causal attention; this cannot)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register ``SINKS_SDPA`` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SINKS_SDPA, sinks_sdpa_forward)
    AttentionMaskInterface.register(SINKS_SDPA, _sinks_mask)
    return SINKS_SDPA
