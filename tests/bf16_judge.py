"""How the GPU tests judge a bf16 path: against an fp32 reference on the CPU, no further from it
than a trusted bf16 path (stock, eager, unpacked) is.

Two bf16 paths that compute the same sum round differently (other GEMM shapes and tilings, other
flex-attention blocks, fused or not): on these tiny models one LoRA gradient tensor of one path can
sit 2x further from fp32 than the other path's while both are right (H200: packed 12.2% vs
unpacked 6.0% on one expert lora_B; compiled 14.8% vs eager 7.0% on one q_proj lora_A). So the
whole set of LoRA gradients (one vector) must be within ``whole`` times the trusted path's error,
and each tensor within ``each`` times its own (or the bf16 floor).  A real fault is far outside
either: a mask that lets packed examples see each other moves the whole set by 80-100% (fp32, CPU),
a wrong or missing gradient moves its tensor by ~100%.
"""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative (Frobenius) error of a against b, on the CPU in fp32 (a may sit on the GPU)."""
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / (b.norm() + 1e-12))


def whole_rel(g: dict, ref: dict) -> float:
    """Relative error of all gradients as one vector."""
    keys = sorted(ref)
    diff = torch.cat([(g[k].float().cpu() - ref[k].float().cpu()).flatten() for k in keys])
    return float(diff.norm() / (torch.cat([ref[k].float().cpu().flatten() for k in keys]).norm() + 1e-12))


def assert_loss_no_further(l32: float, l_trusted: float, l_new: float, floor: float) -> None:
    assert abs(l_new - l32) <= max(2 * abs(l_trusted - l32), floor * abs(l32)), (l32, l_trusted, l_new)


def assert_grads_no_further(g32: dict, g_trusted: dict, g_new: dict, floor: float, *, whole: float = 1.5,
                            each: float = 3.0) -> None:
    assert g_new.keys() == g_trusted.keys() == g32.keys() and g32
    trusted, new = whole_rel(g_trusted, g32), whole_rel(g_new, g32)
    assert new <= max(whole * trusted, floor), ("all LoRA grads", trusted, new)
    for k in g32:
        err, err_new = rel(g_trusted[k], g32[k]), rel(g_new[k], g32[k])
        assert err_new <= max(each * err, floor), (k, err, err_new)
