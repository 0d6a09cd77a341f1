"""A short RSO run on the embedded corpus learns far more than unigram statistics (about 20 s on a CPU)."""

from __future__ import annotations

import torch

from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.data.corpus import unigram_entropy_nats
from rso_ray.data.embedded_assets import embedded_shards
from rso_ray.data.packing import BlockStream
from rso_ray.data.tokenizer import load_tokenizer
from rso_ray.models import build_model
from rso_ray.training.engine import evaluate, train_step


def test_rso_beats_the_unigram_entropy_by_far() -> None:
    tok = load_tokenizer("embedded")
    val = torch.from_numpy(BlockStream(embedded_shards("validation"), tok, 128).take(128 * 128)).long()
    # The best a model of token frequencies alone can do on these tokens (nats per token).
    unigram = unigram_entropy_nats(val.flatten().numpy())
    model = build_model("llama-micro", seed=0)
    method = build_method(model, MethodConfig(name="rso", lr=1e-2, rank=32, resample_every=25, total_steps=150))
    batches = BlockStream(embedded_shards("train"), tok, 128, repeat=True).batches(16)
    before = evaluate(model, val, batch_size=32).loss
    for _ in range(150):
        train_step(model, method, [torch.from_numpy(next(batches)).long()], max_grad_norm=1.0)
    after = evaluate(model, val, batch_size=32).loss
    assert before > unigram  # an untrained model is worse than unigram statistics
    assert after < 0.7 * unigram, (after, unigram)  # measured: 3.75 vs 6.15 nats
    assert method.outer_step == 6  # 150 steps / tau 25: six subspaces merged
