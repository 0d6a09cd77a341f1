"""Memory of one training step, RSO vs GaLore vs AdamW: a real CPU step of llama-60m and meta-device traces
of the paper's models, with the ratios the RSO engine is judged by.

    python benchmarks/memory_breakdown.py --out benchmarks/results/memory

- Activations inside the transformer blocks (saved for backward, deduplicated by storage), llama-60m,
  r = 128, 8 x 256 tokens, float32 on the CPU: the same memory-aware norm, SwiGLU, attention and chunked
  loss for every method; only the target linears differ (nn.Linear for AdamW/GaLore, the RSO layer).
- Optimizer-state bytes of the target layers, RSO/AdamW, per layer: exactly r/m (m = the layer's inputs).
- The same breakdown for llama-350m / 1b / 7b traced on the meta device in bf16 (the paper's dtype).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from common import PAPER_RANKS  # benchmarks/common.py

from rso_ray.console import format_table, human_bytes
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.memory import measure_methods, report
from rso_ray.models import build_model

CASES = [
    # (model, rank, batch, seq, device, dtype)
    ("llama-60m", PAPER_RANKS["llama-60m"], 8, 256, "cpu", torch.float32),
    ("llama-350m", PAPER_RANKS["llama-350m"], 16, 256, "meta", torch.bfloat16),
    ("llama-1b", PAPER_RANKS["llama-1b"], 16, 256, "meta", torch.bfloat16),
    ("llama-7b", PAPER_RANKS["llama-7b"], 4, 256, "meta", torch.bfloat16),
]


def per_layer_state_ratio(model_name: str, rank: int) -> list[list[str]]:
    """Measured Adam moments of each target layer of block 0 after one step (meta device, float32):
    RSO's are those of B (r x out), AdamW's those of W (out x in)."""
    from rso_ray.core.memory import measure_step, unique_bytes

    states: dict[str, dict[str, int]] = {}
    for name in ("adamw", "rso"):
        model = build_model(model_name, device="meta", num_layers=1)
        method = build_method(model, MethodConfig(name=name, rank=rank, total_steps=1))
        measure_step(model, method, torch.empty(1, 8, dtype=torch.long, device="meta"))
        for layer, module in model.model.layers[0].named_modules():
            if layer.endswith("_proj"):
                param = module.rso_B if name == "rso" else module.weight
                moments = [t for t in method.optimizer_state_tensors([param]) if t.dim() > 0]
                states.setdefault(layer, {})[name] = unique_bytes(moments)
    rows = []
    for layer, s in states.items():
        m = build_model(model_name, device="meta", num_layers=1).model.layers[0].get_submodule(layer).in_features
        rows.append([layer, str(m), human_bytes(s["adamw"]), human_bytes(s["rso"]), f"{s['rso'] / s['adamw']:.4f}", f"{rank / m:.4f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    sections, payload = [], {"command": "python " + " ".join(sys.argv), "cases": []}
    for model, rank, batch, seq, device, dtype in CASES:
        res = measure_methods(model, methods=["adamw", "galore", "rso"], rank=rank, batch_size=batch, seq_len=seq,
                              device=device, dtype=dtype)
        a, r = res["adamw"], res["rso"]
        head = (f"{model}, rank {rank}, {batch} x {seq} tokens, {str(dtype).split('.')[-1]}, "
                f"{'one real step on the CPU' if device == 'cpu' else 'traced on the meta device'}")
        ratios = (f"activations in blocks RSO/AdamW = {r.activations_in_blocks / a.activations_in_blocks:.4f}; "
                  f"optimizer states of target layers RSO/AdamW = {r.target_optimizer_states / a.target_optimizer_states:.4f}; "
                  f"gradients RSO/AdamW = {r.gradients / a.gradients:.4f}; total RSO/AdamW = {r.total / a.total:.4f}")
        print(f"\n{head}\n{report(res)}\n{ratios}", flush=True)
        sections.append(f"### {head}\n\n```\n{report(res)}\n```\n\n{ratios}\n")
        payload["cases"].append({"model": model, "rank": rank, "batch": batch, "seq_len": seq, "device": device,
                                 "dtype": str(dtype), "results": {k: v.as_dict() for k, v in res.items()}})
    layer_rows = per_layer_state_ratio("llama-60m", 128)
    headers = ["target layer", "m (inputs)", "AdamW states", "RSO states", "RSO/AdamW", "r/m"]
    print("\nllama-60m, r = 128: Adam moments per target layer (float32)\n" + format_table(headers, layer_rows))
    machine = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        args.out.with_suffix(".md").write_text(
            f"Command: `python {' '.join(sys.argv)}` ({machine})\n\n" + "\n".join(sections)
            + "\n### Optimizer-state bytes per target layer, llama-60m, r = 128\n\n"
            + format_table(headers, layer_rows, markdown=True) + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
