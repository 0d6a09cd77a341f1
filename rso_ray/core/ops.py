"""Memory-aware ops around the target layers, used by RSO and the baselines alike.

Measured on transformers' LlamaForCausalLM: swapping the linears for RSO layers saves little unless the ops around them save
only what they need. A stock RMSNorm keeps its normalized output alive for its weight gradient, so the
block input of q/k/v is stored anyway; SiLU(gate) * up keeps SiLU(gate) as well as both inputs; and
the logits (tokens x vocab, float32) outweigh all blocks of a small model. Here:

- :func:`rms_norm` saves its input and 1/rms (tokens x 1) and recomputes the normalized value;
- :func:`swiglu` saves gate and up and recomputes SiLU (an RSO down_proj recomputes its input from them too);
- :func:`chunked_cross_entropy` never materializes all logits: chunk by chunk it computes the loss and,
  when gradients are needed, the gradients of the hidden states and of the output weight at once, so
  only those (tokens x hidden, vocab x hidden) are kept for backward, never tokens x vocab.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .layer import autocast_off, compute_dtype, mark_recomputable


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """At least float32 for the elementwise maths (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        xf = _upcast(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = (xf * rstd).to(x.dtype) * weight.to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)  # x is (..., n); rstd is tiny; weight is a parameter
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, rstd, weight = ctx.saved_tensors
        xhat = _upcast(x) * rstd  # recomputed, (..., n)
        dyf = _upcast(dy)
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dyf * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            g = dyf * _upcast(weight)
            # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat))
            dx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (LLaMA's): x / sqrt(mean(x^2) + eps) * weight, computed in float32."""
    return _RMSNormFn.apply(x, weight, eps)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)  # SiLU(gate) is recomputed in backward
        return _swiglu_value(gate, up)

    @staticmethod
    def backward(ctx: Any, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        gf = _upcast(gate)
        sig = torch.sigmoid(gf)
        silu = gf * sig
        dhf = _upcast(dh)
        dup = (dhf * silu).to(up.dtype)
        # silu'(g) = sig * (1 + g * (1 - sig))
        dgate = (dhf * _upcast(up) * sig * (1.0 + gf * (1.0 - sig))).to(gate.dtype)
        return dgate, dup


def _swiglu_value(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, saving only gate and up. The output is marked recomputable from them, so an RSO
    layer reading it (down_proj) keeps no Y P of its own."""
    return mark_recomputable(_SwiGLUFn.apply(gate, up), _swiglu_value, gate, up)


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class _ChunkedCEFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        chunk: int,
        dtype: torch.dtype,
        grad_enabled: bool,
    ) -> torch.Tensor:
        # hidden: (T, n); weight: (V, n); labels: (T,)
        valid = labels != ignore_index
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # softmax/accumulation precision
        denom = valid.sum().clamp(min=1).to(acc)  # a tensor: no host sync, and traceable on meta
        # Under no_grad (evaluation) autograd still marks a parameter as needing its gradient; forward runs
        # with grad mode off whatever the caller's, so the caller's mode comes in as ``grad_enabled``.
        need_dh = grad_enabled and ctx.needs_input_grad[0]
        need_dw = grad_enabled and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_dh else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        with autocast_off(hidden.device.type):
            w = weight.to(dtype)
            for lo, hi in _chunks(hidden.shape[0], chunk):
                h = hidden[lo:hi].to(dtype)  # (c, n)
                logits = (h @ w.t()).to(acc)  # (c, V): the only tokens x vocab tensor, one chunk at a time
                lab = labels[lo:hi]
                ok = valid[lo:hi]
                safe = torch.where(ok, lab, torch.zeros_like(lab))
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                target = logits.gather(1, safe[:, None]).squeeze(1)
                loss_sum += ((lse - target) * ok).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d loss / d logits = (softmax - onehot) / n_valid, zero on ignored rows
                p = torch.exp(logits.sub_(lse[:, None]))
                p[torch.arange(hi - lo, device=p.device), safe] -= 1.0
                p.mul_((ok.to(acc) / denom)[:, None])
                pc = p.to(dtype)
                if grad_h is not None:
                    grad_h[lo:hi] = (pc @ w).to(hidden.dtype)  # (c, V) @ (V, n)
                if grad_w is not None:
                    grad_w.add_((pc.t() @ h).to(acc))  # (V, c) @ (c, n)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return loss_sum / denom

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        grad_h = saved.pop(0) if ctx.has[0] else None
        grad_w = saved.pop(0) if ctx.has[1] else None
        dh = grad_h * dloss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * dloss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` without storing the logits.

    hidden: (..., n), weight: (V, n), labels: (...) with ``ignore_index`` for positions to skip.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    dtype = compute_dtype(hidden)
    return _ChunkedCEFn.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), ignore_index, chunk_tokens, dtype,
        torch.is_grad_enabled(),
    )
