"""LLaMA decoder built from a config, with no download; parameter names match transformers'
LlamaForCausalLM, so state dicts move between the two (tests/test_models.py checks the outputs agree).

Memory-aware by construction (rso_ray.core.ops): RMSNorm saves its input and 1/rms, SwiGLU saves gate and
up, the loss is a chunked cross-entropy that never holds all logits, and attention is SDPA with q/k/v
laid out (batch, seq, heads, dim) so that its output, which SDPA keeps for its own backward, *is* the
o_proj input (a view, not a copy). The o_proj linear is marked ``rso_input_is_saved`` for RSO.

    python -c "from rso_ray.models import build_model; print(build_model('llama-60m', device='meta'))"
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.ops import chunked_cross_entropy, rms_norm, swiglu


@dataclass(kw_only=True)
class LlamaConfig:
    """Architecture of a LLaMA decoder (the GaLore/RSO pre-training configs)."""

    hidden_size: int
    """Model width d (embedding and residual stream)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_attention_heads: int
    """Query heads; hidden_size must be divisible by it."""
    num_hidden_layers: int
    """Number of decoder blocks."""
    vocab_size: int = 32000
    """Vocabulary size (embedding rows and lm_head outputs)."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; None means equal to num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary embedding is meant for (used for validation only)."""
    rope_theta: float = 10000.0
    """Base of the rotary embedding frequencies."""
    initializer_range: float = 0.02
    """Std of the normal initialization of linear and embedding weights."""
    ce_chunk_tokens: int = 1024
    """Tokens per chunk of the cross-entropy (bounds the logits held at once to chunk x vocab)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        kv = self.kv_heads
        if kv <= 0 or self.num_attention_heads % kv:
            raise ValueError(
                f"num_key_value_heads {kv} must divide num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    def num_parameters(self) -> int:
        d, f, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.kv_heads * self.head_dim
        block = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
        return 2 * v * d + L * block + d


@dataclass
class CausalLMOutput:
    """What the model returns: ``loss`` when labels were given (logits then stay None, never built)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq, 1, head_dim), HF's layout (the two halves repeat the same frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim))
    pos = torch.arange(seq_len, device=device, dtype=dtype)
    freqs = torch.outer(pos, inv_freq)  # (s, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (s, d)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on (b, h, s, hd) tensors. On the meta device (memory tracing) SDPA's dispatcher would
    pick the math kernel, which stores the attention probabilities; GPUs and CPUs run flash kernels, so
    trace the flash kernel's meta implementation instead: same saved tensors as a real run."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "meta":
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        # SDPA saves its output for backward, and that output is o_proj's input (see forward).
        self.o_proj.rso_input_is_saved = True  # type: ignore[assignment]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        cos, sin = rope  # (s, 1, hd)
        # RoPE in the (b, s, h, hd) layout, so that q/k/v and SDPA's output keep that memory layout.
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv, self.head_dim)
        q = q * cos.to(q.dtype) + _rotate_half(q) * sin.to(q.dtype)
        k = k * cos.to(k.dtype) + _rotate_half(k) * sin.to(k.dtype)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        # out: (b, h, s, hd), stored as (b, s, h, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))  # a view of SDPA's output


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cfg = cfg

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        rope = rotary_tables(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device, table_dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Causal LM: ``forward(input_ids, labels)`` returns the mean next-token loss (labels shifted inside,
    as in transformers; -100 marks positions to ignore); without labels it returns the logits."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.lm_head.weight.is_meta:  # shapes only (the driver's checks): drawing values there costs ~1 s
            return
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask with padding is not supported: rso_ray packs sequences, so every position is real"
            )
        hidden = self.model(input_ids)  # (b, s, d)
        if labels is None:
            logits = self.lm_head(hidden)
            return CausalLMOutput(logits=logits.float() if logits.dtype != torch.float64 else logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        # Token t predicts label t+1.
        loss = chunked_cross_entropy(
            hidden[:, :-1], self.lm_head.weight, labels[:, 1:], chunk_tokens=self.config.ce_chunk_tokens
        )
        return CausalLMOutput(loss=loss)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token of plain backprop (6N plus attention), the usual MFU convention."""
        cfg = self.config
        n_params = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size  # embedding lookup is free
        attn = 6 * cfg.num_hidden_layers * cfg.hidden_size * seq_len  # causal QK^T and AV, fwd+bwd
        return 6.0 * n_params + attn

