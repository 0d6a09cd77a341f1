"""Measured memory against independent closed-form counts of what each op must keep."""

from __future__ import annotations

import pytest
import torch

from rso_ray.core.memory import measure_step, paper_estimates
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.models import build_model, model_config


def _measure(name: str, rank: int, device: str = "cpu", b: int = 2, s: int = 32, **kwargs):
    model = build_model("llama-micro", seed=0, device=device)
    method = build_method(model, MethodConfig(name=name, rank=rank, total_steps=4, **kwargs))
    ids = torch.randint(0, 8192, (b, s)) if device == "cpu" else torch.empty(b, s, dtype=torch.long, device=device)
    return model, method, measure_step(model, method, ids)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_block_activations_match_closed_form(device: str) -> None:
    """Per token and block, float32. AdamW keeps: block input x and attention output h (the norms' inputs),
    the norms' outputs (read by q/k/v and by gate/up), q, k, v and the attention output (SDPA; o_proj reads a
    view of it), gate and up (SwiGLU), the SwiGLU output (down_proj), 2 x 1/rms and the attention lse.
    RSO keeps Y P (r) instead of each of the two norm outputs; o_proj reuses SDPA's output and down_proj
    rebuilds its input from the SwiGLU's gate and up (with recompute_inputs=False it keeps its own Y P).
    Once for all blocks: the rotary cos and sin tables (seq x head_dim each)."""
    cfg = model_config("llama-micro")
    n, f, h, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers
    r, tokens, rope = 16, 2 * 32, 2 * 32 * cfg.head_dim * 4
    _, _, adam = _measure("adamw", r, device)
    _, _, rso = _measure("rso", r, device)
    # On meta the CUDA flash kernel is traced; it also keeps its RNG seed and offset (a few bytes a block).
    slack = 0 if device == "cpu" else 32 * L
    assert 0 <= adam.activations_in_blocks - (L * tokens * (8 * n + 3 * f + 2 + h) * 4 + rope) <= slack
    assert 0 <= rso.activations_in_blocks - (L * tokens * (6 * n + 2 * f + 2 * r + 2 + h) * 4 + rope) <= slack
    _, _, kept = _measure("rso", r, device, recompute_inputs=False)
    assert 0 <= kept.activations_in_blocks - (L * tokens * (6 * n + 2 * f + 3 * r + 2 + h) * 4 + rope) <= slack
    ratio = rso.activations_in_blocks / adam.activations_in_blocks
    assert ratio < 0.8


def test_gradients_and_optimizer_states() -> None:
    cfg = model_config("llama-micro")
    n, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    r = 16
    model, _, adam = _measure("adamw", r)
    params = sum(p.numel() for p in model.parameters())
    target = L * (4 * n * n + 3 * n * f)
    assert adam.parameters == adam.gradients == params * 4
    assert adam.target_optimizer_states == 2 * target * 4
    _, _, rso = _measure("rso", r)
    b_numel = L * r * (4 * n + 2 * f + n)  # B is r x out: q,k,v,o,gate,up,down
    others = params - target
    assert rso.gradients == (b_numel + others) * 4  # no weight gradient for the targets
    # Optimizer state of the target layers: Adam moments of B (r x n) versus of W (m x n).
    assert rso.target_optimizer_states == 2 * b_numel * 4
    # Non-target parameters: embeddings and lm_head (V x n each), 2 norms a block and the final norm.
    assert others == 2 * V * n + (2 * L + 1) * n


def test_target_state_ratio_is_r_over_m() -> None:
    """On layers of one input size (attention only), RSO/AdamW optimizer-state bytes = r/m exactly."""
    r = 16
    out = {}
    for name in ("adamw", "rso"):
        model = build_model("llama-micro", seed=0)
        method = build_method(model, MethodConfig(name=name, rank=r, total_steps=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        out[name] = measure_step(model, method, torch.randint(0, 8192, (1, 16))).target_optimizer_states
    assert out["rso"] / out["adamw"] == r / model_config("llama-micro").hidden_size


def test_paper_estimates() -> None:
    est = paper_estimates(hidden=2048, batch=16, seq_len=256, rank=512)
    assert est["adamw"]["optimizer_states"] == 24 * 2048**2
    assert est["rso"]["gradients"] == 12 * 2048 * 512
    assert est["rso"]["activations"] == 8 * 16 * 256 * 2048 + 4 * 16 * 256 * 512 + 2 * 16 * 256**2
