"""The recipe of each model: the defaults that an option left unset (None) takes when a run's options are
resolved (rso_ray.config.resolved).

The paper's models follow GaLore's pre-training recipe, which the RSO paper uses: 256-token sequences, a
global batch of 512, warmup over 10% of the steps then cosine to 10%, 10K steps for 60M ... 150K for 7B,
ranks 128/256/256/512, the papers' single lr (Algorithm 1 as published, not re-tuned here). The small models'
recipes are tuned on the embedded text, as the comment below says.

    python -c "from rso_ray.config.recipes import recipe_for; print(recipe_for('llama-1b'))"
"""

from __future__ import annotations

from typing import Any

# Recipes: GaLore's pre-training recipe (Zhao et al. 2024), which the RSO paper follows, for the paper's models (the papers' single lr: Algorithm 1 as published, not
# re-tuned here); small models tuned to finish quickly on a CPU. llama-tiny's lr and target_lr_scale are the
# best of the real-text convergence benchmark (benchmarks/results/convergence_llama-tiny_r32.md, 1000 steps,
# r/d = 1/4): every method at lr 1e-2 for embeddings, norms and lm_head, and a smaller step for the block
# linears (AdamW 1/8, RSO's B 1/4, GaLore's scale 1/4), and RSO's B warmed up over the first 10 steps of each
# subspace. Coordinate P: level with Haar on llama-tiny at r/d = 1/4 (4.2518 vs 4.2488, inside one seed's
# noise), ahead at r/d = 1/2 (4.2000 vs 4.2167) and on llama-mini (4.2481 vs 4.3126 at lr 6e-3,
# benchmarks/results/convergence_llama-mini.md), and cheaper. llama-mini takes llama-tiny's step-size split and
# levers with lr 6e-3, the best of a 3e-3 / 6e-3 / 1e-2 grid for each of AdamW, GaLore r48 and RSO r48 (inside
# the grid for all three: RSO 1.015 of AdamW, 1.019 on a second seed; 1.004 of GaLore r48). --algorithm-1 is the
# paper's Algorithm 1 (rso_ray.config.resolved).
# APOLLO, APOLLO-Mini and Muon: the APOLLO scripts' lr 1e-2 and ranks (128 for 60m, 256 for the larger models, 1 for
# APOLLO-Mini; r/d = 1/4 for the small models, as at 60m and 350m), scale 1 (APOLLO) / 128 (APOLLO-Mini) and
# projection refresh every 200 steps; Muon at AdamW's lr (with the match_rms_adamw adjustment AdamW's lr carries
# over, Moonshot). On llama-tiny and llama-micro these lrs are not tuned.
_NEW_LR = {"apollo": 1e-2, "apollo-mini": 1e-2}
_TINY_LR: dict[str, Any] = dict(lr={"rso": 1e-2, "adamw": 1e-2, "galore": 1e-2, **_NEW_LR, "muon": 1e-2},
                                target_lr_scale={"rso": 0.25, "adamw": 0.125, "galore": 0.25}, inner_warmup=10,
                                projection="coordinate")
_PAPER = dict(global_batch_size=512, resample_every=200, eval_every=1000, eval_tokens=10_000_000)
RECIPES: dict[str, dict[str, Any]] = {
    "llama-micro": dict(steps=40, rank=16, global_batch_size=8, micro_batch_size=8, resample_every=10,
                        eval_every=20, eval_tokens=8192, apollo_rank=16,
                        lr={"rso": 3e-3, "adamw": 3e-3, "galore": 1e-2, **_NEW_LR, "muon": 3e-3}),
    # eval_every = steps: the default job evaluates once, at its end (a mid-run evaluation of its 65k tokens
    # took 6 s of a 90 s job, benchmarks/results/job_timeline_cpu.md; the progress lines show the train loss).
    "llama-tiny": dict(steps=100, rank=64, global_batch_size=16, micro_batch_size=16, resample_every=50,
                       eval_every=100, eval_tokens=65536, apollo_rank=32, **_TINY_LR),
    "llama-mini": dict(steps=1000, rank=48, global_batch_size=16, micro_batch_size=16, resample_every=100,
                       eval_every=100, eval_tokens=65536, apollo_rank=48,
                       **(_TINY_LR | dict(lr={"rso": 6e-3, "adamw": 6e-3, "galore": 6e-3, "apollo": 6e-3,
                                              "apollo-mini": 6e-3, "muon": 6e-3}))),
    "llama-60m": dict(_PAPER, steps=10_000, rank=128, micro_batch_size=128, apollo_rank=128,
                      lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-130m": dict(_PAPER, steps=20_000, rank=256, micro_batch_size=64, apollo_rank=256,
                       lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-350m": dict(_PAPER, steps=60_000, rank=256, micro_batch_size=32, apollo_rank=256,
                       lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-1b": dict(_PAPER, steps=100_000, rank=512, micro_batch_size=16, apollo_rank=256,
                     lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3}),
    "llama-7b": dict(_PAPER, steps=150_000, rank=1024, micro_batch_size=4, resample_every=500, max_grad_norm=1.0,
                     apollo_rank=256, lr={"rso": 5e-3, "adamw": 1e-3, "galore": 5e-3, **_NEW_LR, "muon": 1e-3}),
}
_HF_RECIPE = dict(_PAPER, steps=10_000, rank=128, micro_batch_size=16, apollo_rank=128,
                  lr={"rso": 1e-2, "adamw": 1e-3, "galore": 1e-2, **_NEW_LR, "muon": 1e-3})


def recipe_for(model: str) -> dict[str, Any]:
    return dict(RECIPES.get(model, _HF_RECIPE))


# RSO's subspaces per run at least (short runs): see short_run_interval.
MIN_SUBSPACES = 3


def short_run_interval(interval: int | str, steps: int) -> int | str:
    """RSO's resample interval when the user gives none: the recipe's, capped at a third of the run's steps so
    that even a short run trains three subspaces (llama-tiny's default 100 steps: 33 instead of 50). Measured on
    the embedded text (benchmarks/results/resample_llama-tiny_r32_*.md, two seeds): more subspaces did not
    help a short run. At 300 steps the recipe's 50 and 100 (three subspaces) ended level and ahead
    of 30 (ten subspaces, 0.5% and 0.7% worse on the two seeds) and of 10; at 100 steps 10, 20, 33 and 50 were
    within the two seeds' spread (2%); at 1000 steps 50 lost 0.4% to 100 (Haar P, keep_second:
    benchmarks/results/convergence_llama-tiny_r32.md). So the cap is low and long runs keep the recipe's."""
    if isinstance(interval, str):
        return interval
    return max(1, min(interval, steps // MIN_SUBSPACES))
