"""RSO's outer/inner loop, the baselines, and their state dicts, against independent computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rso_ray.core.galore import GaLoreAdamW
from rso_ray.core.methods import MethodConfig, RSOMethod, build_method, resolve_optimizer
from rso_ray.core.rso import RSOConfig, apply_rso, merge_and_unload
from rso_ray.models import build_model


class TwoLayer(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d, d, bias=False)
        self.fc2 = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def _micro_batch(seed: int = 0, b: int = 2, s: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 8192, (b, s), generator=g)


def _cfg(**kw) -> MethodConfig:
    base = dict(name="rso", rank=8, lr=1e-2, total_steps=20, warmup_steps=0, resample_every=3)
    base.update(kw)
    return MethodConfig(**base)


def test_full_rank_haar_sgd_step_equals_full_sgd_step() -> None:
    """r = m, Haar P (P P^T = I) and plain SGD: X + P(-lr P^T G) = X - lr G, exactly one SGD step."""
    torch.manual_seed(0)
    model = TwoLayer().double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    cfg = _cfg(
        rank=8, lr=0.1, total_steps=1, resample_every=1, inner_optimizer="sgd",
        inner_optimizer_kwargs={"momentum": 0.0}, target_modules=["fc1", "fc2"], shared_inputs=[],
    )
    method = build_method(model, cfg)
    for layer in method.handle.layers.values():
        layer.rso_B.data = layer.rso_B.data.double()
    _loss(model, x, y).backward()
    assert method.step() is True  # tau = 1: the step ends the subspace, merging B into W

    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _loss(ref, x, y).backward()
    opt.step()
    assert_close(model.fc1.base_layer.weight, ref.fc1.weight)
    assert_close(model.fc2.base_layer.weight, ref.fc2.weight)


def test_subspace_cycle_merge_reset_resample() -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(resample_every=3))
    assert isinstance(method, RSOMethod)
    ids = _micro_batch()
    first_p = {g.key: g.projection.dense().clone() for g in method.handle.groups}
    outer_state_sizes = []
    for step in range(3):
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        merged = method.step()
        assert merged == (step == 2)
        if step < 2:
            assert len(method.inner.state) == len(method.handle.b_parameters())
            assert method.at_boundary is False
        outer_state_sizes.append(len(method.outer.state))
    # After tau steps: B = 0, inner Adam state empty, a new P, outer AdamW state kept.
    assert all(torch.count_nonzero(b) == 0 for b in method.handle.b_parameters())
    assert len(method.inner.state) == 0
    assert method.at_boundary and method.outer_step == 1
    assert all(not torch.equal(first_p[g.key], g.projection.dense()) for g in method.handle.groups)
    assert method.outer is not None and len(method.outer.state) == outer_state_sizes[0] > 0


def test_model_output_unchanged_by_merge() -> None:
    model = build_model("llama-micro", seed=0).double()
    method = build_method(model, _cfg(resample_every=100))
    for b in method.handle.b_parameters():
        b.data = b.data.double()
    ids = _micro_batch()
    for _ in range(2):
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
    with torch.no_grad():
        before = model(ids).logits
        method.handle.merge()
        after = model(ids).logits
    assert_close(after, before, rtol=0, atol=1e-10)


def test_proximal_term_adds_b_over_eta() -> None:
    eta = 0.5
    model = build_model("llama-micro", seed=0)
    method = build_method(
        model, _cfg(eta=eta, lr=0.1, inner_optimizer="sgd", inner_optimizer_kwargs={"momentum": 0.0}, resample_every=50)
    )
    for b in method.handle.b_parameters():
        with torch.no_grad():
            b.normal_(std=0.01)
    ids = _micro_batch()
    method.zero_grad()
    model(ids, labels=ids).loss.backward()
    before = [(b.detach().clone(), b.grad.detach().clone()) for b in method.handle.b_parameters()]
    lr = method.current_lr()
    method.step()
    for (b0, g), b in zip(before, method.handle.b_parameters(), strict=True):
        assert_close(b.detach(), b0 - lr * (g + b0 / eta))


def test_schedule_drives_inner_and_outer_lr() -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(total_steps=10, warmup_steps=2, lr=0.02))
    ids = _micro_batch()
    for step in range(4):
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        expected = 0.02 * method.schedule(step)
        method.step()
        for opt in method.optimizers:
            for group in opt.param_groups:
                assert group["lr"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("adamw", {}, torch.optim.AdamW),
        ("sgd", {"momentum": 0.5}, torch.optim.SGD),
        ("RMSprop", {}, torch.optim.RMSprop),
        ("torch.optim.NAdam", {}, torch.optim.NAdam),
        ("rso_ray.core.galore.GaLoreAdamW", {}, GaLoreAdamW),
    ],
)
def test_inner_optimizer_choices(name: str, kwargs: dict, cls: type) -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(inner_optimizer=name, inner_optimizer_kwargs=kwargs))
    assert type(method.inner) is cls
    ids = _micro_batch()
    losses = []
    for _ in range(4):
        method.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        method.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    if name == "sgd":
        assert method.inner.param_groups[0]["momentum"] == 0.5
    assert resolve_optimizer("sgd")[1] == {"momentum": 0.9}


def _train(model: nn.Module, method, steps: int, start: int = 0) -> list[float]:
    out = []
    for i in range(start, start + steps):
        ids = _micro_batch(seed=i)
        method.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        method.step()
        out.append(loss.item())
    return out


LEVERS = {"rso-levers": dict(name="rso", inner_state="keep_second", inner_warmup=2, target_lr_scale=0.5),
          "rso-muon": dict(name="rso", inner_optimizer="muon"), "apollo-mini": dict(name="apollo-mini", rank=1)}


@pytest.mark.parametrize("name", ["rso", "adamw", "galore", "rso-levers", "apollo", "apollo-mini", "muon", "rso-muon"])
@pytest.mark.parametrize("stop_at", [3, 4])  # mid-subspace and right at a boundary (tau = 3)
def test_state_dict_round_trip_resumes_identically(name: str, stop_at: int) -> None:
    extra = LEVERS.get(name, {"name": name})
    cfg = _cfg(resample_every=3, galore_update_proj_gap=2, apollo_update_proj_gap=2, total_steps=12, warmup_steps=2,
               **extra)
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    _train(model, method, stop_at)
    saved_model = copy.deepcopy(model.state_dict())
    saved_method = copy.deepcopy(method.state_dict())
    tail = _train(model, method, 4, start=stop_at)

    model2 = build_model("llama-micro", seed=123)  # different init: everything must come from the state
    method2 = build_method(model2, cfg)
    model2.load_state_dict(saved_model)
    method2.load_state_dict(saved_method)
    tail2 = _train(model2, method2, 4, start=stop_at)
    assert tail2 == tail
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k


def test_state_dict_holds_tensors_and_numbers_only() -> None:
    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            assert isinstance(x, (torch.Tensor, int, float, bool, str, type(None))), type(x)

    for name in ("rso", "galore", "adamw", "apollo", "muon"):
        model = build_model("llama-micro", seed=0)
        method = build_method(model, _cfg(name=name, galore_update_proj_gap=2, apollo_update_proj_gap=2))
        _train(model, method, 2)
        walk(method.state_dict())


def test_training_is_deterministic() -> None:
    runs = []
    for _ in range(2):
        model = build_model("llama-micro", seed=0)
        runs.append(_train(model, build_method(model, _cfg(projection="coordinate")), 5))
    assert runs[0] == runs[1]


def test_galore_matches_independent_reference() -> None:
    """GaLore's update written out: SVD projector (refreshed every gap steps), Adam in the projected
    space, projected back and scaled; on a single (rows < cols) and a (rows >= cols) matrix."""
    torch.manual_seed(0)
    for shape in [(6, 10), (10, 6)]:
        w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2, "scale": 0.25}], lr=0.1, eps=1e-6)
        ref = w.detach().clone()
        m = v = None
        ortho = None
        b1, b2, eps = 0.9, 0.999, 1e-6
        for t in range(5):
            g = torch.randn(*shape, dtype=torch.float64)
            w.grad = g.clone()
            opt.step()
            if t % 2 == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                ortho = vh[:3] if shape[0] >= shape[1] else u[:, :3]
            low = g @ ortho.t() if shape[0] >= shape[1] else ortho.t() @ g
            m = (1 - b1) * low if m is None else b1 * m + (1 - b1) * low
            v = (1 - b2) * low**2 if v is None else b2 * v + (1 - b2) * low**2
            step = 0.1 * math.sqrt(1 - b2 ** (t + 1)) / (1 - b1 ** (t + 1))
            upd = m / (v.sqrt() + eps)
            full = upd @ ortho if shape[0] >= shape[1] else ortho @ upd
            ref = ref - step * 0.25 * full
            assert_close(w.detach(), ref)


def test_merge_and_unload_restores_plain_linears() -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(resample_every=100))
    _train(model, method, 2)
    ids = _micro_batch()
    with torch.no_grad():
        before = model(ids).logits
    merge_and_unload(model)
    assert not any(type(m).__name__ == "RSOLinear" for m in model.modules())
    with torch.no_grad():
        assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


# -- bad input: a clear error naming the value ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": -3}, "rank must be a positive integer, got -3"),
        ({"projection": "sparse"}, "projection must be one of haar, gaussian, coordinate; got 'sparse'"),
        ({"eta": 0.0}, r"eta must be > 0 \(or inf for no proximal term\), got 0.0"),
        ({"eta": -1.0}, "eta must be > 0"),
        ({"eta": float("nan")}, "eta must be > 0"),
        ({"inner_optimizer": "lion"}, "unknown inner optimizer 'lion'"),
        ({"resample_every": 0}, r"resample_every \(tau\) must be an integer >= 1, got 0"),
        ({"name": "sophia"}, "method must be one of rso, adamw, galore, apollo, apollo-mini, muon; got 'sophia'"),
        ({"lr": 0.0}, "lr must be a positive finite number, got 0.0"),
        ({"target_lr_scale": 0.0}, "target_lr_scale must be a positive finite number, got 0.0"),
        ({"target_lr_scale": float("inf")}, "target_lr_scale must be a positive finite number, got inf"),
        ({"warmup_steps": 50, "total_steps": 10}, "warmup_steps must be between 0 and total_steps=10, got 50"),
    ],
)
def test_bad_config_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)


def test_rank_larger_than_layer() -> None:
    model = build_model("llama-micro")
    with pytest.raises(ValueError, match=r"rank 65 is larger than the input dimension 64 of layer 'model.layers.0.self_attn.q_proj'"):
        apply_rso(model, RSOConfig(rank=65))
    # down_proj reads 176 features, but q_proj's 64 bound the rank first: nothing was wrapped.
    assert not any(type(m).__name__ == "RSOLinear" for m in model.modules())


def test_no_matching_targets() -> None:
    model = build_model("llama-micro")
    with pytest.raises(ValueError, match=r"no module matches target_modules=\['query'\]; the model's nn.Linear modules are: model.layers.0"):
        apply_rso(model, RSOConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match=r"no module matches target_modules='\.\*attention\.\*'"):
        apply_rso(model, RSOConfig(target_modules=r".*attention.*"))
    with pytest.raises(TypeError, match=r"target module 'model\.norm' is a RMSNorm, not an nn\.Linear"):
        apply_rso(model, RSOConfig(target_modules=["norm"]))


def test_wrapping_twice_is_an_error() -> None:
    model = build_model("llama-micro")
    apply_rso(model, RSOConfig(rank=4))
    with pytest.raises(ValueError, match="already an RSO layer"):
        apply_rso(model, RSOConfig(rank=4, target_modules=["q_proj"]))


@pytest.mark.parametrize("inner", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("decay", [0.0, 0.05])
def test_inner_optimizer_gets_the_configured_weight_decay(inner: str, decay: float) -> None:
    """torch's AdamW defaults to weight_decay=0.01: B must get --weight-decay, 0 included."""
    cfg = _cfg(rank=4, inner_optimizer=inner, weight_decay=decay, target_modules=["fc1", "fc2"], shared_inputs=[])
    method = build_method(TwoLayer(), cfg)
    assert [g["weight_decay"] for g in method.inner.param_groups] == [decay]


def _is_target(name: str) -> bool:
    return any(t in name for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def test_adamw_target_lr_scale_equals_two_independent_adamws() -> None:
    """The block linears step at lr x scale, the rest at lr: the same as two torch AdamWs."""
    cfg = _cfg(name="adamw", lr=1e-2, target_lr_scale=0.25, total_steps=3, warmup_steps=0, min_lr_ratio=1.0)
    model = build_model("llama-micro", seed=0)
    ref = copy.deepcopy(model)
    method = build_method(model, cfg)
    named = dict(ref.named_parameters())
    ref_opts = [torch.optim.AdamW([p for n, p in named.items() if _is_target(n) == target], lr=lr, weight_decay=0.0)
                for target, lr in ((False, 1e-2), (True, 2.5e-3))]
    assert sum(_is_target(n) for n in named) == 7 * 2  # llama-micro: 2 blocks of 7 linears
    for i in range(3):
        ids = _micro_batch(seed=i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
        for opt in ref_opts:
            opt.zero_grad()
        ref(ids, labels=ids).loss.backward()
        for opt in ref_opts:
            opt.step()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        assert_close(v, v2, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize(("scale", "expected"), [(None, 1e-2), (0.3, 3e-3)])
def test_rso_b_steps_at_lr_times_target_lr_scale(scale: float | None, expected: float) -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(lr=1e-2, target_lr_scale=scale, eps=1e-20))
    assert method.inner.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-15)
    assert method.outer is not None and method.outer.param_groups[0]["lr"] == 1e-2
    # After a step of a warmed-up schedule, Adam's first step moves each entry of B by lr (|m / sqrt(v)| = 1).
    ids = _micro_batch()
    model(ids, labels=ids).loss.backward()
    layer = next(iter(method.handle.layers.values()))
    grad = layer.rso_B.grad.clone()
    method.step()
    big = grad.abs() > 1e-12
    assert big.sum() > 400
    moved = layer.rso_B.detach()[big].abs()
    # Adam's first step is lr g / (|g| + eps), lr up to eps / |g| < 1e-8 and float32 rounding.
    assert_close(moved, torch.full_like(moved, expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("scale", "expected"), [(None, 0.25), (1.0, 1.0)])
def test_galore_scale_is_the_target_lr_scale(scale: float | None, expected: float) -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(name="galore", target_lr_scale=scale))
    assert method.optimizers[0].param_groups[1]["scale"] == expected


def test_one_group_adamw_checkpoint_of_earlier_versions_loads() -> None:
    """Before target_lr_scale AdamW held every parameter in one group (model.parameters() order)."""
    cfg = _cfg(name="adamw", total_steps=8, warmup_steps=2)
    model = build_model("llama-micro", seed=0)
    old = torch.optim.AdamW(model.parameters(), lr=cfg.lr, eps=1e-8, weight_decay=0.0)
    for group in old.param_groups:
        group["initial_lr"] = group["lr"]
    method = build_method(model, cfg)
    reference = copy.deepcopy(model)
    ref_method = build_method(reference, cfg)
    _train(reference, ref_method, 3)
    for i in range(3):  # the old layout, driven by hand at the same schedule
        ids = _micro_batch(seed=i)
        old.zero_grad()
        model(ids, labels=ids).loss.backward()
        for group in old.param_groups:
            group["lr"] = group["initial_lr"] * ref_method.schedule(i)
        old.step()
    method.load_state_dict({"step": 3, "optimizers": [old.state_dict()]})
    assert _train(model, method, 3, start=3) == _train(reference, ref_method, 3, start=3)
    for (k, v), v2 in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k


def test_inner_warmup_ramps_b_lr_in_each_subspace() -> None:
    """With inner_warmup k, inner step i of a subspace runs at lr (i + 1) / (k + 1) for i < k, then lr."""
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(lr=1e-2, inner_warmup=2, resample_every=4, total_steps=20, warmup_steps=0,
                                      min_lr_ratio=1.0))
    seen = []
    for i in range(8):
        ids = _micro_batch(seed=i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
        seen.append(method.inner.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2] * 2, rel=1e-12)
    assert method.outer is not None and method.outer.param_groups[0]["lr"] == 1e-2  # the rest: no ramp


def test_keep_second_keeps_the_row_mean_of_the_second_moment() -> None:
    """At a merge with inner_state keep_second: first moment 0, second moment replaced by its mean over
    B's rows (column by column), step count kept. Checked against the state Adam had just before."""
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(inner_state="keep_second", resample_every=3))
    b = next(iter(method.handle.layers.values())).rso_B
    for i in range(2):
        ids = _micro_batch(seed=i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
    v_before = method.inner.state[b]["exp_avg_sq"].clone()
    ids = _micro_batch(seed=2)
    method.zero_grad()
    model(ids, labels=ids).loss.backward()
    g = b.grad.clone()
    assert method.step() is True  # the third step merges and resamples
    state = method.inner.state[b]
    v_adam = 0.999 * v_before + 0.001 * g * g  # Adam's own update of the last step (betas 0.9, 0.999)
    # rtol 1e-6: the reference forms beta2 v + (1 - beta2) g^2 in another order than torch's in-place
    # mul_/addcmul_ (a few float32 ulps, ~1e-7); a wrong mean axis or a kept row would differ by far more.
    assert_close(state["exp_avg_sq"], v_adam.mean(0, keepdim=True).expand_as(v_adam), rtol=1e-6, atol=0)
    assert torch.equal(state["exp_avg"], torch.zeros_like(g))
    assert float(state["step"]) == 3
    assert torch.count_nonzero(b) == 0  # B restarts at zero in the new subspace


def test_a_dropped_subspace_keeps_no_inner_state() -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(inner_state="keep_second", resample_every=3))
    _train(model, method, 1)
    method.skip_step()  # a non-finite loss: B dropped, nothing of its Adam kept
    assert not method.inner.state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_state": "project"}, "inner_state must be one of reset, keep_second; got 'project'"),
        ({"inner_warmup": -1}, "inner_warmup must be an integer >= 0, got -1"),
        ({"inner_state": "keep_second", "inner_optimizer": "sgd"}, "inner_state 'keep_second' needs an Adam inner optimizer, not 'sgd'"),
    ],
)
def test_bad_lever_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)
