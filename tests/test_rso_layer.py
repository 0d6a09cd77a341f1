"""The RSO layer against an independent reference: autograd of the explicit f(X + P B) in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rso_ray.core.layer import RSOLinear, SubspaceGroup
from rso_ray.core.memory import SavedTensorCounter
from rso_ray.core.projection import PROJECTIONS


def _layer(m: int, n: int, r: int, kind: str, *, seed: int = 0, input_is_saved: bool = False) -> RSOLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(m, n, bias=True).double()
    if input_is_saved:
        lin.rso_input_is_saved = True  # type: ignore[assignment]
    group = SubspaceGroup(key=3, names=["x"], in_features=m, rank=r, kind=kind, seed=seed)
    group.resample(outer_step=2, device="cpu")
    layer = RSOLinear(lin, group).double()
    with torch.no_grad():
        layer.rso_B.copy_(torch.randn(r, n, dtype=torch.float64))  # a non-zero B exercises every term
    return layer


def _reference(layer: RSOLinear, y: torch.Tensor, gz: torch.Tensor):
    """Explicit Z = Y (X + P B) with X = W^T, differentiated by autograd."""
    p = layer.group.projection.dense().double()  # (m, r)
    x = layer.base_layer.weight.detach().t()  # (m, n)
    b = layer.rso_B.detach().clone().requires_grad_(True)
    yr = y.detach().clone().requires_grad_(True)
    z = yr @ (x + p @ b) + layer.base_layer.bias.detach()
    (z * gz).sum().backward()
    return z, yr.grad, b.grad


@pytest.mark.parametrize("kind", PROJECTIONS)
@pytest.mark.parametrize("input_is_saved", [False, True])
def test_gradients_match_explicit_autograd(kind: str, input_is_saved: bool) -> None:
    m, n, r = 24, 10, 6
    layer = _layer(m, n, r, kind, input_is_saved=input_is_saved)
    y = torch.randn(3, 5, m, dtype=torch.float64, requires_grad=True)
    gz = torch.randn(3, 5, n, dtype=torch.float64)
    z = layer(y)
    (z * gz).sum().backward()
    z_ref, dy_ref, db_ref = _reference(layer, y, gz)
    assert_close(z, z_ref)
    assert_close(y.grad, dy_ref)
    assert_close(layer.rso_B.grad, db_ref)
    assert layer.base_layer.weight.grad is None  # no weight gradient is ever computed


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_group_shares_yp_and_stays_exact(kind: str) -> None:
    """q/k/v-style siblings: one Y P for the group, gradients still equal to the explicit reference."""
    m, r = 16, 4
    group = SubspaceGroup(key=0, names=["q", "k", "v"], in_features=m, rank=r, kind=kind, seed=1)
    group.resample(0, "cpu")
    torch.manual_seed(0)
    layers = [RSOLinear(nn.Linear(m, n, bias=False).double(), group).double() for n in (16, 8, 8)]
    for layer in layers:
        with torch.no_grad():
            layer.rso_B.normal_()
    y = torch.randn(2, 7, m, dtype=torch.float64, requires_grad=True)
    counter = SavedTensorCounter(nn.ModuleList(layers), blocks=[])
    with counter.track():
        outs = [layer(y) for layer in layers]
    # Saved: one (2, 7, r) float64 Y P for the three layers (weights and B are parameters, not counted).
    assert counter.total_bytes == 2 * 7 * r * 8
    gzs = [torch.randn_like(o) for o in outs]
    sum((o * g).sum() for o, g in zip(outs, gzs, strict=True)).backward()

    p = group.projection.dense().double()
    yr = y.detach().clone().requires_grad_(True)
    bs = [layer.rso_B.detach().clone().requires_grad_(True) for layer in layers]
    ref = sum(
        ((yr @ (layer.base_layer.weight.t() + p @ b)) * g).sum() for layer, b, g in zip(layers, bs, gzs, strict=True)
    )
    ref.backward()
    assert_close(y.grad, yr.grad)
    for layer, b in zip(layers, bs, strict=True):
        assert_close(layer.rso_B.grad, b.grad)


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_merge_is_exact_and_keeps_output(kind: str) -> None:
    layer = _layer(20, 12, 5, kind)
    y = torch.randn(4, 20, dtype=torch.float64)
    before = layer(y).detach()
    expected_w = layer.base_layer.weight.detach() + (layer.group.projection.dense().double() @ layer.rso_B.detach()).t()
    layer.merge()
    assert torch.count_nonzero(layer.rso_B) == 0
    assert_close(layer.base_layer.weight, expected_w, rtol=0, atol=1e-12)
    assert_close(layer(y), before, rtol=0, atol=1e-12)


def test_eval_mode_saves_nothing_and_matches() -> None:
    layer = _layer(12, 6, 3, "haar")
    y = torch.randn(5, 12, dtype=torch.float64)
    with torch.no_grad():
        z = layer(y)
    p = layer.group.projection.dense().double()
    assert_close(z, y @ (layer.base_layer.weight.t() + p @ layer.rso_B) + layer.base_layer.bias)


def test_bf16_autocast_grads_are_fp32_and_merges_accumulate_exactly() -> None:
    """Under bf16 autocast, W stays float32 (the master copy), dB comes back in float32, and 200 small
    merges add up to what float64 arithmetic gives, where a bf16 weight would lose them."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16, bias=False)
    group = SubspaceGroup(key=0, names=["l"], in_features=32, rank=8, kind="haar", seed=0)
    group.resample(0, "cpu")
    layer = RSOLinear(lin, group)
    y = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(y)
    assert z.dtype == torch.bfloat16
    z.float().sum().backward()
    assert layer.rso_B.grad is not None and layer.rso_B.grad.dtype == torch.float32

    w64 = lin.weight.detach().double().clone()
    w_bf16 = lin.weight.detach().to(torch.bfloat16).clone()
    for k in range(200):
        group.resample(k, "cpu")
        with torch.no_grad():
            layer.rso_B.copy_(1e-4 * torch.randn(8, 16))
        delta = (group.projection.dense().double() @ layer.rso_B.detach().double()).t()
        w64 += delta
        w_bf16 += delta.to(torch.bfloat16)
        layer.merge()
    err_master = (lin.weight.double() - w64).abs().max().item()
    err_bf16 = (w_bf16.double() - w64).abs().max().item()
    assert err_master < 1e-6
    assert err_bf16 > 100 * err_master  # what keeping W in bf16 would have cost


def test_group_rejects_mismatched_layer() -> None:
    group = SubspaceGroup(key=0, names=["a"], in_features=8, rank=2, kind="haar", seed=0)
    with pytest.raises(ValueError, match="group input dimension 8 does not match layer input 9"):
        RSOLinear(nn.Linear(9, 4), group)


@pytest.mark.parametrize("kind", PROJECTIONS)
@pytest.mark.parametrize("recompute", [True, False])
def test_down_proj_recomputes_its_input_from_the_swiglu(kind: str, recompute: bool) -> None:
    """down_proj after a SwiGLU rebuilds SiLU(gate) * up in backward: same gradients as the explicit
    f(X + P B), and no Y P among the saved tensors (with recompute_input=False, exactly one)."""
    from rso_ray.core.ops import swiglu

    m, n, r = 24, 10, 6
    layer = _layer(m, n, r, kind)
    layer.recompute_input = recompute
    gate = torch.randn(3, 5, m, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, m, dtype=torch.float64, requires_grad=True)
    gz = torch.randn(3, 5, n, dtype=torch.float64)
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = layer(swiglu(gate, up))
    (z * gz).sum().backward()

    g_ref = gate.detach().clone().requires_grad_(True)
    u_ref = up.detach().clone().requires_grad_(True)
    h = torch.nn.functional.silu(g_ref) * u_ref
    z_ref, dh_ref, db_ref = _reference(layer, h, gz)
    h.backward(dh_ref)
    assert_close(z, z_ref)
    assert_close(layer.rso_B.grad, db_ref)
    assert_close(gate.grad, g_ref.grad)
    assert_close(up.grad, u_ref.grad)
    assert shapes.count((3, 5, r)) == (0 if recompute else 1)


@pytest.mark.parametrize("kind", ["haar", "coordinate"])
def test_bf16_forward_sees_small_subspace_updates(kind: str) -> None:
    """Under bf16 autocast W_eff = W + B^T P^T must be summed in float32 and rounded once: rounding W to
    bf16 first and adding P B in bf16 loses any update under half a bf16 ulp of W (|W| ~ 0.02 has ulp
    ~1.2e-4), so a young subspace (|P B| ~ 5e-6) would be invisible to the forward pass."""
    from rso_ray.core.layer import effective_weight

    torch.manual_seed(0)
    m = n = 512
    lin = nn.Linear(m, n, bias=False)
    nn.init.normal_(lin.weight, std=0.02)
    group = SubspaceGroup(key=1, names=["x"], in_features=m, rank=64, kind=kind, seed=0)
    group.resample(outer_step=0, device="cpu")
    layer = RSOLinear(lin, group)
    with torch.no_grad():
        layer.rso_B.normal_()
        layer.rso_B.mul_(5e-6 / (group.projection.dense() @ layer.rso_B).std())  # entries of P B: rms 5e-6
    w = layer.base_layer.weight.detach()
    delta = (group.projection.dense() @ layer.rso_B.detach()).t()  # (n, m): B^T P^T in float32
    w_eff = effective_weight(w, layer.rso_B.detach(), group, torch.bfloat16)
    # Bitwise: the correctly rounded bf16 of the float32 sum.
    assert torch.equal(w_eff, (w + delta).to(torch.bfloat16))
    # The fraction of P B the forward sees, projected on P B: close to 1 in expectation (each element is
    # rounded to nearest from a uniformly placed W); today's double rounding saw about 4%.
    seen = (w_eff.double() - w.to(torch.bfloat16).double()).flatten()
    frac = (seen @ delta.double().flatten()) / (delta.double().flatten() @ delta.double().flatten())
    assert 0.9 < frac.item() < 1.1
    # And the layer's forward under autocast uses that weight.
    y = torch.randn(4, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(y)
    assert torch.equal(z, torch.nn.functional.linear(y.to(torch.bfloat16), w_eff))
