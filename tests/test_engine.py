"""The training step: gradient accumulation with weights, and what a non-finite step does."""

from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

from rso_ray.core.methods import MethodConfig, RSOMethod, build_method
from rso_ray.models import build_model
from rso_ray.training.engine import evaluate, train_step


def _ids(b: int = 8, s: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 8192, (b, s), generator=torch.Generator().manual_seed(seed))


def test_weighted_micro_batches_equal_one_big_batch() -> None:
    """Unequal micro-batches (3 + 5 sequences) with weights 3/8 and 5/8: the same step as 8 at once."""
    cfg = MethodConfig(name="adamw", lr=1e-2, total_steps=4, warmup_steps=0)
    a = build_model("llama-micro", seed=0).double()
    b = copy.deepcopy(a)
    ma, mb = build_method(a, cfg), build_method(b, cfg)
    ids = _ids()
    ra = train_step(a, ma, [ids])
    rb = train_step(b, mb, [ids[:3], ids[3:]], loss_weights=[3 / 8, 5 / 8])
    assert abs(ra.loss - rb.loss) < 1e-9 and abs(ra.grad_norm - rb.grad_norm) < 1e-9
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert_close(pa, pb)


def test_nonfinite_step_drops_the_subspace_and_keeps_w() -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, MethodConfig(name="rso", rank=8, resample_every=10, total_steps=20))
    assert isinstance(method, RSOMethod)
    for i in range(2):
        assert train_step(model, method, [_ids(seed=i)]).finite
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in method.handle.layers.items()}
    p_before = method.handle.groups[0].projection.dense().clone()
    assert any(torch.count_nonzero(b) for b in method.handle.b_parameters())
    with torch.no_grad():
        model.model.embed_tokens.weight[:] = float("inf")  # every loss from now on is non-finite
    result = train_step(model, method, [_ids(seed=5)])
    assert not result.finite and not result.merged
    for n, layer in method.handle.layers.items():
        assert torch.equal(layer.base_layer.weight, weights[n])  # W untouched (no merge of a bad B)
    assert all(torch.count_nonzero(b) == 0 for b in method.handle.b_parameters())  # B dropped
    assert len(method.inner.state) == 0 and method.inner_steps == 0
    assert method.outer_step == 1 and method.step_count == 2  # a new subspace; the step did not count
    assert not torch.equal(method.handle.groups[0].projection.dense(), p_before)


def test_evaluate_is_the_mean_token_loss() -> None:
    model = build_model("llama-micro", seed=0)
    blocks = _ids(b=6, s=16)
    got = evaluate(model, blocks, batch_size=4)  # batches of 4 and 2 blocks
    with torch.no_grad():
        full = model(input_ids=blocks, labels=blocks).loss.item()
    assert abs(got.loss - full) < 1e-5 and got.tokens == 6 * 15
    assert model.training  # evaluation leaves the mode as it found it
