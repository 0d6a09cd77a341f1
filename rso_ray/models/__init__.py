"""Model registry: the LLaMA sizes of the GaLore/RSO papers (GaLore's configs/llama_*.json, which RSO uses), three small ones for
laptops, tests and CPU benchmarks, and any Hugging Face causal LM by config (``hf:<hub id or local path>``).

    python -c "from rso_ray.models import build_model; m = build_model('llama-tiny', vocab_size=8192); print(m)"
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .llama import CausalLMOutput, LlamaConfig, LlamaForCausalLM

__all__ = ["DEMO_MODELS", "MODEL_CONFIGS", "CausalLMOutput", "LlamaConfig", "LlamaForCausalLM", "build_model", "model_config"]

# vocab 32000 as in the papers (T5 tokenizer, extra ids unused); rms_norm_eps 1e-6, init std 0.02.
MODEL_CONFIGS: dict[str, LlamaConfig] = {
    # For unit tests: a few seconds per training run on a laptop CPU.
    "llama-micro": LlamaConfig(
        hidden_size=64, intermediate_size=176, num_attention_heads=4, num_hidden_layers=2, vocab_size=8192
    ),
    # The default of the offline run: learns the embedded corpus in minutes on a CPU.
    "llama-tiny": LlamaConfig(
        hidden_size=128, intermediate_size=352, num_attention_heads=4, num_hidden_layers=4, vocab_size=8192
    ),
    # A CPU-sized model shaped like the paper's (block linears 58% of the parameters, against 28% in
    # llama-tiny, whose 8192-row embeddings dominate): for convergence benchmarks of the subspace methods.
    "llama-mini": LlamaConfig(
        hidden_size=192, intermediate_size=512, num_attention_heads=4, num_hidden_layers=10, vocab_size=8192
    ),
    "llama-60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_hidden_layers=8),
    "llama-130m": LlamaConfig(
        hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_hidden_layers=12
    ),
    "llama-350m": LlamaConfig(
        hidden_size=1024, intermediate_size=2736, num_attention_heads=16, num_hidden_layers=24
    ),
    "llama-1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_attention_heads=32, num_hidden_layers=24),
    "llama-7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32
    ),
}

HF_PREFIX = "hf:"
# The small models take their vocabulary from the tokenizer (8192 ids for the embedded one); the paper's
# keep 32000 rows.
DEMO_MODELS = ("llama-micro", "llama-tiny", "llama-mini")


def model_config(name: str, *, vocab_size: int | None = None, num_layers: int | None = None) -> LlamaConfig:
    """The registered config ``name``, optionally with another vocabulary size or depth (benchmarks use
    a few blocks of a large model's shapes)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)} or 'hf:<hub id or local path>'"
        )
    cfg = MODEL_CONFIGS[name]
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)
    if num_layers is not None:
        cfg = replace(cfg, num_hidden_layers=num_layers)
    return cfg


def check_model_name(name: str) -> None:
    """Raise the user-facing error for an unknown model name, without building anything."""
    if not name.startswith(HF_PREFIX):
        model_config(name)
    elif not name[len(HF_PREFIX) :]:
        raise ValueError("model 'hf:' needs a hub id or a local path after the colon, e.g. hf:meta-llama/Llama-3.2-1B")


def build_model(
    name: str,
    *,
    vocab_size: int | None = None,
    num_layers: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> nn.Module:
    """Build a randomly initialized model for pre-training (nothing is downloaded for ``llama-*``).

    ``hf:<id or path>`` builds ``AutoModelForCausalLM.from_config`` from a config that must be available
    locally or from the hub; weights are not loaded (pre-training starts from scratch).
    """
    if seed is not None:
        torch.manual_seed(seed)
    if name.startswith(HF_PREFIX):
        return _build_hf(name[len(HF_PREFIX) :], vocab_size=vocab_size, device=device, dtype=dtype)
    cfg = model_config(name, vocab_size=vocab_size, num_layers=num_layers)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def _build_hf(path: str, *, vocab_size: int | None, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ValueError(
            f"cannot load the Hugging Face config {path!r}: {err}. Give a local folder with config.json, "
            "or a hub id on a machine that can reach the hub (HF_HUB_OFFLINE unset)."
        ) from err
    if vocab_size is not None and cfg.vocab_size < vocab_size:
        cfg.vocab_size = vocab_size
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model
