"""Hugging Face interop: rso_ray's LLaMA config <-> transformers' ``LlamaConfig``, transformers model folders
written from a plain (merged) model -- config.json, safetensors weights sharded above a size limit with
transformers' index file, generation_config.json, the tokenizer -- and transformers weights loaded into a
model before training (``--init-from``).

Parameter names already match transformers' ``LlamaForCausalLM`` (rso_ray.models.llama), and so do the
maths: RMSNorm, SwiGLU, rotary embedding with the rotate-half convention, untied lm_head. So a state dict
moves as is; only the config needs translating, and the features our model does not have (biases, rope
scaling, tied embeddings, another activation) are refused by name rather than silently dropped.

    python -c "from rso_ray.models import model_config; from rso_ray.models.hf_io import hf_config; print(hf_config(model_config('llama-micro')))"
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.rso import rso_layer_keys
from .llama import LlamaConfig, LlamaForCausalLM

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD = "5GB"  # transformers' save_pretrained default
# Buffers some older transformers checkpoints hold; recomputed by both models, never a weight.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]


# -- configs -----------------------------------------------------------------------------------------

def hf_config(
    cfg: LlamaConfig,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """transformers' ``LlamaConfig`` of the same architecture (an untied lm_head, no biases, default rope)."""
    from transformers import LlamaConfig as HFLlamaConfig

    # rope_theta is an argument of transformers 4 and folded into rope_parameters by transformers 5.
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        architectures=["LlamaForCausalLM"],
        dtype=str(dtype).removeprefix("torch."),
    )
    return HFLlamaConfig(**kwargs)


def _rope(hf: Any) -> tuple[float, str]:
    """(theta, rope type) of a transformers config: ``rope_parameters`` in transformers 5, ``rope_theta``
    and ``rope_scaling`` before."""
    params = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), str(kind)


def llama_config_from_hf(hf: Any) -> LlamaConfig:
    """rso_ray's LlamaConfig for a transformers config; ValueError naming each feature our LLaMA lacks."""
    model_type = getattr(hf, "model_type", None)
    if model_type != "llama":
        raise ValueError(f"it is a {model_type!r} model, and rso_ray's llama-* models are LLaMA only")
    theta, rope_type = _rope(hf)
    unsupported = []
    if getattr(hf, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf.hidden_act!r} (ours: silu)")
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if getattr(hf, flag, False):
            unsupported.append(f"{flag}=True")
    if rope_type != "default":
        unsupported.append(f"rope type {rope_type!r} (ours: default)")
    head_dim = getattr(hf, "head_dim", None)
    if head_dim is not None and head_dim * hf.num_attention_heads != hf.hidden_size:
        unsupported.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    if unsupported:
        raise ValueError("rso_ray's llama-* models do not have " + ", ".join(unsupported))
    return LlamaConfig(
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_hidden_layers=hf.num_hidden_layers,
        vocab_size=hf.vocab_size,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None),
        rms_norm_eps=hf.rms_norm_eps,
        max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta,
        initializer_range=getattr(hf, "initializer_range", 0.02),
    )


# Fields that change what the model computes (initializer_range, ce_chunk_tokens and the length the
# rotary table is validated for do not).
_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "kv_heads", "num_hidden_layers",
                "vocab_size", "rms_norm_eps", "rope_theta")


def architecture_differences(ours: LlamaConfig, theirs: LlamaConfig) -> list[str]:
    """'name ours vs theirs' for every architecture field that differs."""
    return [f"{k} {getattr(ours, k)} vs {getattr(theirs, k)}" for k in _ARCH_FIELDS if getattr(ours, k) != getattr(theirs, k)]


# -- reading a transformers folder -----------------------------------------------------------------

def resolve_pretrained(spec: str) -> Path:
    """The local folder of ``spec``: the folder itself, or the hub snapshot of a hub id (config, safetensors
    and tokenizer files only; from the local cache when HF_HUB_OFFLINE is set)."""
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ValueError(f"{spec!r} is not a folder")
        return local
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
    except Exception as err:  # the hub client raises many types (offline, gated, not found, network)
        hint = "not in the local cache and HF_HUB_OFFLINE is set" if offline else "not a folder, and not reachable on the hub"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot find {spec!r}: {hint} ({type(err).__name__}: {first})") from None


def pretrained_config(folder: str | os.PathLike[str]) -> Any:
    """transformers config of a folder (ValueError when it has no usable config.json)."""
    from transformers import AutoConfig

    path = Path(folder)
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"{path} has no {CONFIG_FILE}")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}/{CONFIG_FILE} is not a transformers config: {err}") from None


def weight_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    path = Path(folder)
    if (path / SAFE_INDEX).is_file():
        weight_map = json.loads((path / SAFE_INDEX).read_text()).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{path} lacks the shards {', '.join(missing[:3])} that {SAFE_INDEX} names")
        return files
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    found = f" (found {', '.join(others[:3])}: re-save it with transformers' save_pretrained, which writes safetensors)" if others else ""
    raise ValueError(f"{path} has no weights: no {SAFE_WEIGHTS} or {SAFE_INDEX}{found}")


def weight_shapes(folder: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a folder, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 -- a safetensors handle, not a dict
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _ties_embeddings(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False)) and not isinstance(
        model, LlamaForCausalLM
    )


def check_weights_fit(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    """ValueError listing the names and shapes of ``shapes`` that ``model`` (any device, meta too) lacks,
    does not have, or has in another shape. A model that ties lm_head to the embedding needs no lm_head."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in shapes.items() if not _IGNORED_KEYS.fullmatch(k)}
    allowed_missing = {"lm_head.weight"} if _ties_embeddings(model) else set()
    missing = sorted(set(expected) - set(given) - allowed_missing)
    unexpected = sorted(set(given) - set(expected))
    wrong = [f"{k} {given[k]} vs {expected[k]}" for k in sorted(set(given) & set(expected)) if given[k] != expected[k]]
    problems = []
    if wrong:
        problems.append(f"shapes differ (weights vs model): {'; '.join(wrong[:4])}" + (" ..." if len(wrong) > 4 else ""))
    if missing:
        problems.append(f"no weights for {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        problems.append(f"weights the model does not have: {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
    if problems:
        raise ValueError("the weights do not fit the model: " + "; ".join(problems))


def check_pretrained(model: nn.Module, folder: str | os.PathLike[str]) -> None:
    """Everything about ``folder`` that can go wrong before training, without reading a tensor: a config,
    weights, and (for rso_ray's own LLaMA) the same architecture down to eps and rope theta."""
    hf = pretrained_config(folder)
    shapes = weight_shapes(folder)
    if isinstance(model, LlamaForCausalLM):
        theirs = llama_config_from_hf(hf)
        diffs = architecture_differences(model.config, theirs)
        if diffs:
            raise ValueError("its architecture differs from the model's (model vs folder): " + ", ".join(diffs))
    check_weights_fit(model, shapes)


def load_pretrained(model: nn.Module, spec: str) -> nn.Module:
    """Load the transformers weights of ``spec`` (a folder or a hub id) into ``model`` in place, before any
    training method wraps its layers (names are those of the plain model); casts to the model's dtype."""
    from safetensors.torch import load_file

    folder = resolve_pretrained(spec)
    files = weight_files(folder)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({k: v for k, v in load_file(str(file)).items() if not _IGNORED_KEYS.fullmatch(k)})
    check_weights_fit(model, {k: tuple(v.shape) for k, v in state.items()})
    model.load_state_dict(state, strict=False)  # strictness was checked above, a tied lm_head aside
    return model


# -- writing a transformers folder -----------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes of '5GB' (10^9, as transformers counts), '500MiB' (2^20), '1000' or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if match is None:
            raise ValueError(f"size {size!r} is not a number of bytes or a size like 5GB, 500MB, 2GiB")
        unit = (match.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = "BKMGT".index(unit[0])
        value = int(float(match.group(1)) * base**power)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(sizes: Iterable[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Names grouped in order into shards of at most ``max_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def export_state_dict(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors in ``dtype``; a tied lm_head is left out (as
    transformers does: it re-ties on load). Refuses RSO layers that were not merged and unloaded."""
    state = model.state_dict()
    wrapped = rso_layer_keys(state)
    if wrapped:
        raise ValueError(f"the model still has RSO layers ({wrapped[0]}, ...): call merge_and_unload first")
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            if not _ties_embeddings(model):
                raise ValueError(f"{name} shares its memory with {seen[ptr]} but the config declares no tying")
            continue
        seen[ptr] = name
        out[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    return out


def write_safetensors(state: dict[str, torch.Tensor], folder: str | os.PathLike[str], *, max_shard_size: str | int) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus model.safetensors.index.json when the
    weights exceed ``max_shard_size`` (the layout transformers writes and reads)."""
    from safetensors.torch import save_file

    path = Path(folder)
    sizes = [(k, v.numel() * v.element_size()) for k, v in state.items()]
    shards = plan_shards(sizes, parse_size(max_shard_size))
    meta = {"format": "pt"}  # transformers reads only files that say they hold torch tensors
    if len(shards) == 1:
        save_file(state, str(path / SAFE_WEIGHTS), metadata=meta)
        return [path / SAFE_WEIGHTS]
    files, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        file = path / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in names}, str(file), metadata=meta)
        files.append(file)
        weight_map.update(dict.fromkeys(names, file.name))
    index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": weight_map}
    (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def model_hf_config(model: nn.Module, tokenizer: Any, dtype: torch.dtype) -> Any:
    """The transformers config to write for ``model``: translated for rso_ray's LLaMA, a copy of its own for
    a transformers model (``hf:`` runs), with the tokenizer's special ids."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if isinstance(model, LlamaForCausalLM):
        return hf_config(model.config, dtype=dtype, **ids)
    import copy

    config = copy.deepcopy(model.config)
    for key, value in ids.items():
        setattr(config, key, value)
    config.dtype = dtype
    return config


def save_hf_folder(
    model: nn.Module,
    folder: str | os.PathLike[str],
    *,
    tokenizer: Any,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` (plain: RSO merged and unloaded) and ``tokenizer`` as a folder that
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load as is."""
    from transformers import GenerationConfig

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    config = model_hf_config(model, tokenizer, dtype)
    write_safetensors(export_state_dict(model, dtype), path, max_shard_size=max_shard_size)
    config.save_pretrained(str(path))
    GenerationConfig.from_model_config(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path

