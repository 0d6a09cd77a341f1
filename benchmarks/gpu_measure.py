"""What benchmarks/gpu_suite.py measures, one function per figure: the allocator's peak of a training step,
the largest micro-batch that fits, warm step times, the FLOPs a step executes, the cost of forming
W + P B, and the kernels a step spends its time in. Torch only, like the suite.

Every step is rso_ray.training.engine.train_step, the step of every training run. On the CPU (the suite's
--smoke) there is no allocator to ask and nothing runs out of memory: the bytes of a step come from the
meta-device trace of rso_ray.core.memory, and a micro-batch "fits" when they are within a pretend capacity.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from common import VARIANTS, sync  # benchmarks/common.py
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rso_ray.core.galore import galore_projector
from rso_ray.core.layer import SubspaceGroup, effective_weight
from rso_ray.core.memory import measure_step
from rso_ray.core.methods import MethodConfig, RSOMethod, TrainingMethod, build_method
from rso_ray.models import build_model, model_config
from rso_ray.training.engine import StepResult, train_step

NO_RESAMPLE = 10**9  # tau for timed runs: no merge inside the timed steps (its cost is timed on its own)


def build(model_name: str, variant: str, rank: int, device: torch.device | str) -> tuple[nn.Module, TrainingMethod]:
    """A freshly initialized model (seed 0) and one of benchmarks/common.py's VARIANTS on it."""
    model = build_model(model_name, seed=0, device=device)
    config = MethodConfig(rank=rank, total_steps=1000, resample_every=NO_RESAMPLE, **VARIANTS[variant])
    return model, build_method(model, config)


def token_batch(vocab: int, micro_batch: int, seq_len: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (micro_batch, seq_len), generator=gen).to(device)


def is_oom(err: BaseException) -> bool:
    """The CUDA allocator's OOM, or cuBLAS failing to get its workspace (the same thing, reported late)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "CUBLAS_STATUS_ALLOC_FAILED" in str(err)))


def release(device: torch.device) -> None:
    """Free what the last model left (cycles, the allocator's cached blocks) before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def step_with_peak(model: nn.Module, method: TrainingMethod, ids: torch.Tensor,
                   amp: torch.dtype | None) -> tuple[StepResult, int | None]:
    """One train_step and the allocator's peak bytes during it (None on the CPU)."""
    cuda = ids.device.type == "cuda"
    if cuda:
        sync(ids.device)
        torch.cuda.reset_peak_memory_stats(ids.device)
    result = train_step(model, method, [ids], autocast_dtype=amp)
    if not cuda:
        return result, None
    sync(ids.device)
    return result, int(torch.cuda.max_memory_allocated(ids.device))


def timed_steps(model: nn.Module, method: TrainingMethod, ids: torch.Tensor, amp: torch.dtype | None,
                steps: int) -> list[float]:
    """Wall seconds of ``steps`` train_steps, each between two device synchronisations."""
    times = []
    for _ in range(steps):
        sync(ids.device)
        t0 = time.perf_counter()
        train_step(model, method, [ids], autocast_dtype=amp)
        sync(ids.device)
        times.append(time.perf_counter() - t0)
    return times


def rso_refresh_seconds(method: RSOMethod, device: torch.device) -> float:
    """What RSO pays once per subspace (every tau steps), outside the timed steps: the merge W <- W + P B
    and the resample of P (a QR per group)."""
    sync(device)
    t0 = time.perf_counter()
    method.end_subspace(merge=True)
    sync(device)
    return time.perf_counter() - t0


def layer_shapes(name: str) -> list[tuple[str, int, int, int]]:
    """(layers, n, m, count per block) of a LLaMA block's linears in torch's (out, in) layout."""
    cfg = model_config(name)
    d, f = cfg.hidden_size, cfg.intermediate_size
    return [("q k v o", d, d, 4), ("gate up", f, d, 2), ("down", d, f, 1)]


def galore_refresh_seconds(name: str, rank: int, device: torch.device) -> float:
    """What GaLore pays every update_proj_gap steps (and in its first step): the SVD of every target
    gradient (core/galore.py galore_projector), timed once per distinct shape on a random gradient."""
    total = 0.0
    galore_projector(torch.randn(64, 64, device=device), 8)  # the solver's set-up, once
    for _, n, m, count in layer_shapes(name):
        grad = torch.randn(n, m, device=device)  # (out, in), as a weight's gradient
        sync(device)
        t0 = time.perf_counter()
        galore_projector(grad, rank)
        sync(device)
        total += count * model_config(name).num_hidden_layers * (time.perf_counter() - t0)
    return total


@dataclass
class FlopCount:
    """Matmul FLOPs per token of one training step as executed (forward, backward, optimizer step)."""

    executed: float
    """Everything the step's matmuls do, attention counted for the causal half it computes."""
    attention: float
    """Of which attention: torch's FlopCounterMode counts SDPA without its causal mask, halved here
    (flash kernels skip the masked blocks)."""


def count_flops(model_name: str, variant: str, rank: int, micro_batch: int, seq_len: int) -> FlopCount:
    """Counted by torch.utils.flop_counter on the meta device: exact shapes, nothing computed, so any model
    size is counted in a second. Only matmuls count (not norms, softmax or Adam's elementwise maths);
    RSO's forming of W + P B and GaLore's projections are matmuls and count; SVD and QR do not."""
    model, method = build(model_name, variant, rank, "meta")
    ids = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        measure_step(model, method, ids)  # the training step's forward, backward and optimizer step
    sdpa = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" in str(op))
    tokens = micro_batch * seq_len
    return FlopCount(executed=(counter.get_total_flops() - sdpa / 2) / tokens, attention=sdpa / 2 / tokens)


class MetaTracer:
    """Parameters + gradients + optimizer states + activations of a float32 step of one model and method,
    traced on the meta device at any micro-batch: the CPU's stand-in for the allocator's peak."""

    def __init__(self, model_name: str, variant: str, rank: int, seq_len: int):
        self.model, self.method = build(model_name, variant, rank, "meta")
        self.seq_len = seq_len
        self(1)  # the first step creates the optimizer states, which every later step holds

    def __call__(self, micro_batch: int) -> int:
        ids = torch.empty(micro_batch, self.seq_len, dtype=torch.long, device="meta")
        return measure_step(self.model, self.method, ids).total


@dataclass
class Probe:
    micro_batch: int
    fits: bool
    peak_bytes: int | None
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def fit_bounds(probes: list[Probe]) -> tuple[int | None, int | None]:
    """The largest micro-batch that fitted and the smallest that did not (None where there is none)."""
    fits = [p.micro_batch for p in probes if p.fits]
    fails = [p.micro_batch for p in probes if not p.fits]
    return (max(fits) if fits else None), (min(fails) if fails else None)


def peak_line(probes: list[Probe]) -> tuple[float, float] | None:
    """(static bytes, bytes per sequence) through the two largest fitting probes: activations grow with
    the micro-batch, everything else does not. None without two distinct fitting probes."""
    pts = sorted({p.micro_batch: p.peak_bytes for p in probes if p.fits and p.peak_bytes}.items())[-2:]
    if len(pts) < 2 or pts[1][1] <= pts[0][1]:
        return None
    (b0, m0), (b1, m1) = pts
    slope = (m1 - m0) / (b1 - b0)
    return m1 - slope * b1, slope


def largest_on_card(line: tuple[float, float] | None, card_bytes: float) -> int | None:
    """The largest micro-batch whose peak, on the line, stays within ``card_bytes`` (0: none fits)."""
    if line is None:
        return None
    static, per_seq = line
    return max(0, math.floor((card_bytes - static) / per_seq))


def search_done(probes: list[Probe], limit: int, resolution: float = 1 / 64) -> bool:
    """Whether the probes settle the largest micro-batch (to ``resolution``), rather than time running out."""
    lo, hi = fit_bounds(probes)
    if lo is None:
        return hi == 1
    top = limit if hi is None else hi - 1
    return lo >= top or (hi is not None and hi - lo <= max(1, int(lo * resolution)))


def _next_micro_batch(probes: list[Probe], limit: int, capacity: int | None, resolution: float) -> int | None:
    if search_done(probes, limit, resolution):
        return None
    lo, hi = fit_bounds(probes)
    if lo is None:  # even the first probe failed: halve down to 1
        return hi // 2 if hi and hi > 1 else None
    top = limit if hi is None else hi - 1
    if hi is not None:
        return (lo + hi) // 2
    line = peak_line(probes)
    guess = largest_on_card(line, capacity) if capacity else None
    if guess is not None and guess > lo:  # aim just under the line's limit, then just over it
        below = math.floor(0.98 * guess)
        return min(top, below if below > lo else math.ceil(1.02 * guess) + 1)
    return min(top, 2 * lo)


def largest_fit(probe: Callable[[int], Probe], start: int, *, limit: int, deadline: float,
                capacity: int | None, known: list[Probe] | None = None, resolution: float = 1 / 64) -> list[Probe]:
    """Probe micro-batches from ``start`` (or from where ``known`` probes leave off): up by doubling (or to
    where the line through the peaks meets ``capacity``), then bisecting between the largest fit and the
    smallest failure until they are within ``resolution`` of each other, or ``limit`` fits, or
    ``deadline`` (time.perf_counter()) is near: a probe is not started if a step of its size, scaled from
    the last that fitted, would end past it."""
    probes: list[Probe] = list(known or [])
    mb = _next_micro_batch(probes, limit, capacity, resolution) if probes else start
    while mb is not None:
        fitted = [p for p in probes if p.fits]
        if fitted:
            last = fitted[-1]
            if time.perf_counter() + last.seconds * mb / last.micro_batch > deadline:
                break
        elif time.perf_counter() > deadline:
            break
        probes.append(probe(mb))
        mb = _next_micro_batch(probes, limit, capacity, resolution)
    return probes


def time_call(fn: Callable[[], object], device: torch.device, *, reps: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean seconds of ``reps`` back-to-back calls (one sync per batch)."""
    fn()
    means = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        means.append((time.perf_counter() - t0) / reps)
    return statistics.median(means)


def weight_forming_seconds(n: int, m: int, r: int, tokens: int, device: torch.device, reps: int) -> dict[str, float]:
    """Seconds to form one layer's bf16 W_eff = W + B^T P^T (W: n x m float32, Haar P: m x r) the way
    rso_ray does, in float32 rounded once (core/layer.py effective_weight), against the bf16 sum (W and
    P B rounded to bf16 first, then added in bf16), and the bf16 GEMM that uses it on ``tokens`` tokens."""
    gen = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(n, m, device=device, generator=gen) * 0.02  # (n, m) float32 master weight
    b = torch.randn(r, n, device=device, generator=gen) * 1e-3  # (r, n)
    group = SubspaceGroup(key=0, names=["w"], in_features=m, rank=r, kind="haar", seed=0)
    group.resample(0, device)
    p16 = group.matrix_as(device, torch.bfloat16)  # (m, r), cast once per subspace as in the layer
    y = torch.randn(tokens, m, device=device, generator=gen).bfloat16()  # (tokens, m)
    w_eff = effective_weight(w, b, group, torch.bfloat16)
    return {
        "fp32_round_once_s": time_call(lambda: effective_weight(w, b, group, torch.bfloat16), device, reps=reps),
        "bf16_sum_s": time_call(lambda: torch.addmm(w.bfloat16(), b.t().bfloat16(), p16.t()), device, reps=reps),
        "layer_gemm_s": time_call(lambda: y @ w_eff.t(), device, reps=reps),  # (tokens, m) @ (m, n)
    }


# Substrings of kernel names, by what the kernel does (cuBLAS/CUTLASS GEMMs, flash attention, the
# optimizers' fused loops); the rest is elementwise work, copies and reductions.
KERNEL_KINDS = {
    "gemm": ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "addmm", "aten::mm", "aten::bmm"),
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "optimizer": ("foreach", "multi_tensor", "adam"),
}


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS.items() if any(k in low for k in keys)), "other")


def profile_steps(model: nn.Module, method: TrainingMethod, ids: torch.Tensor, amp: torch.dtype | None,
                  steps: int) -> list[dict]:
    """Per kernel (CUDA) or per op (CPU), the self time over ``steps`` warm train_steps, largest first,
    with its share of the total: where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    cuda = ids.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, method, [ids], autocast_dtype=amp)
        sync(ids.device)
    events = prof.key_averages()
    if cuda:  # the kernels themselves, as CUPTI timed them on the device
        timed = [(e.key, e.count, e.self_device_time_total) for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        timed = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    total = sum(t for _, _, t in timed)
    timed.sort(key=lambda x: -x[2])
    return [{"kernel": key, "kind": kernel_kind(key), "calls": count // steps, "self_s": t / 1e6 / steps,
             "share": t / total} for key, count, t in timed]
