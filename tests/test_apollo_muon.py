"""APOLLO, APOLLO-Mini and Muon, and Muon as RSO's inner solver, against independent computations: the APOLLO
authors' package (apollo-torch), torch.optim.Muon, and steps written out by hand."""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from rso_ray.core.apollo import ApolloAdamW, apollo_projection
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.core.projection import derive_seed
from rso_ray.models import build_model

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, torch.optim.Muon's default


def _batch(i: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(i))


def _is_block_linear(name: str) -> bool:
    return any(f"{t}.weight" in name for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


def _cfg(name: str, **kw: Any) -> MethodConfig:
    base: dict[str, Any] = dict(name=name, lr=1e-2, rank=8, total_steps=10, warmup_steps=2, apollo_update_proj_gap=3,
                                resample_every=3)
    return MethodConfig(**(base | kw))


# -- APOLLO against apollo-torch ----------------------------------------------------------------------------


@pytest.fixture
def apollo_torch(monkeypatch):
    """apollo-torch with its projector drawing our P: the package numbers its parameters from 1 over every
    group (its ``state["seed"]``) and draws each P from a seed chain on the gradient's device; here the k-th
    draw of the j-th projected parameter is ``apollo_projection(..., refresh=k, key=j)``. Everything else is
    the package's own code."""
    package = pytest.importorskip("apollo_torch")
    from apollo_torch.random_projector import GradientProjector

    def draw(self, full_rank_grad, proj_type):
        if not hasattr(self, "key"):
            self.key, self.draws = self.seed - self.first_seed, 0
        self.ortho_matrix = apollo_projection(tuple(full_rank_grad.shape), self.rank, seed=0, refresh=self.draws,
                                              key=self.key)
        self.draws += 1

    monkeypatch.setattr(GradientProjector, "update_ortho_matrix", draw)
    return package


def _package_optimizer(apollo_torch, model: nn.Module, cfg: MethodConfig):
    acfg = cfg.apollo_config()
    targets = [p for n, p in model.named_parameters() if _is_block_linear(n)]
    others = [p for n, p in model.named_parameters() if not _is_block_linear(n)]
    from apollo_torch.random_projector import GradientProjector

    GradientProjector.first_seed = len(others) + 1  # the package's seed of the first projected parameter
    groups = [{"params": others}, {"params": targets, "proj": "random", "proj_type": "std", **acfg.group()}]
    opt = apollo_torch.APOLLOAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


@pytest.mark.parametrize(("name", "rank"), [("apollo", 8), ("apollo-mini", 1)])
def test_apollo_matches_the_authors_package_bit_for_bit(apollo_torch, name: str, rank: int) -> None:
    """llama-micro for 7 steps (two refreshes of P at gap 3, warmup and cosine, weight decay) under our
    method and under apollo-torch's APOLLOAdamW on the same parameter groups: every weight equal bit for bit.
    Its down_proj (64 x 176) projects on the left, the other linears (rows >= cols) on the right."""
    cfg = _cfg(name, rank=rank, weight_decay=0.05)
    model = build_model("llama-micro", seed=0)
    reference = copy.deepcopy(model)
    method = build_method(model, cfg)
    theirs = _package_optimizer(apollo_torch, reference, cfg)
    for i in range(7):
        ids = _batch(i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
        theirs.zero_grad()
        reference(ids, labels=ids).loss.backward()
        for g in theirs.param_groups:
            g["lr"] = g["initial_lr"] * method.schedule(i)
        theirs.step()
    for (k, v), v2 in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    # SGD-sized states: r columns (rows >= cols) or r rows of Adam moments per projected weight.
    opt = method.optimizers[0]
    q, down = model.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].mlp.down_proj.weight
    assert opt.state[q]["exp_avg"].shape == (64, rank) and opt.state[down]["exp_avg"].shape == (rank, 176)


def test_the_packages_state_does_not_load_with_weights_only(apollo_torch) -> None:
    """Why rso_ray has its own APOLLO: apollo-torch keeps a projector object in its state, which a
    ``weights_only`` load (torch's default since 2.6) refuses; ours holds tensors and numbers."""
    cfg = _cfg("apollo")
    model = build_model("llama-micro", seed=0)
    theirs = _package_optimizer(apollo_torch, copy.deepcopy(model), cfg)
    method = build_method(model, cfg)
    for opt, net in ((theirs, None), (method, model)):
        params = [p for g in opt.param_groups for p in g["params"]] if net is None else list(net.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    with pytest.raises(pickle.UnpicklingError, match="GradientProjector"):
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert loaded["step"] == 1


def test_apollo_projection_is_a_pure_function_of_seed_refresh_and_parameter() -> None:
    p = apollo_projection((10, 6), 3, seed=4, refresh=2, key=5)
    expected = torch.randn((3, 6), generator=torch.Generator().manual_seed(derive_seed(4, 2, 5))) / math.sqrt(3)
    assert torch.equal(p, expected)  # N(0, 1/r): apollo-torch's stable_randn(...) / sqrt(rank)
    assert apollo_projection((6, 10), 3, seed=4, refresh=2, key=5).shape == (6, 3)  # rows < cols: left
    assert not torch.equal(p, apollo_projection((10, 6), 3, seed=4, refresh=3, key=5))
    assert not torch.equal(p, apollo_projection((10, 6), 3, seed=4, refresh=2, key=6))
    assert apollo_projection((10, 6), 3, seed=4, refresh=2, key=5, device="meta").is_meta


def test_apollo_tensor_scaling_by_hand() -> None:
    """One APOLLO-Mini step written out: Adam on the rank-1 projection R = G P^T, one factor
    ||m / (sqrt v + eps)|| / (||R|| + 1e-8) for the whole matrix, update sqrt(128) times the scaled gradient."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 5, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = ApolloAdamW([{"params": [w], "rank": 1, "update_proj_gap": 10, "scale": 128.0, "scale_type": "tensor"}],
                      lr=0.1, eps=1e-6, seed=3)
    g = torch.randn(12, 5, dtype=torch.float64)
    w.grad = g.clone()
    opt.step()
    p = apollo_projection((12, 5), 1, seed=3, refresh=0, key=0, dtype=torch.float64)  # (1, 5)
    r = g @ p.t()  # (12, 1)
    m, v = 0.1 * r, 0.001 * r * r
    step = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    direction = m / (v.sqrt() + 1e-6)
    factor = direction.norm() / (r.norm() + 1e-8)
    assert_close(w.detach(), w0 - step * math.sqrt(128.0) * factor * g)


# -- Muon ----------------------------------------------------------------------------------------------


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration in float64, written out: X <- a X + (b A + c A^2) X, A = X X^T."""
    a, b, c = NS_COEFFICIENTS
    x = g.double().t() if g.shape[0] > g.shape[1] else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.t()
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.t() if g.shape[0] > g.shape[1] else x


def test_muon_splits_like_the_public_recipes_and_is_torch_muon() -> None:
    """The 14 block linears of llama-micro under torch.optim.Muon (match_rms_adamw), the embeddings, norms and
    lm_head under AdamW: the same weights, bit for bit, as the two torch optimizers driven by hand."""
    cfg = _cfg("muon")
    model = build_model("llama-micro", seed=0)
    reference = copy.deepcopy(model)
    method = build_method(model, cfg)
    named = dict(reference.named_parameters())
    blocks = [p for n, p in named.items() if _is_block_linear(n)]
    rest = [p for n, p in named.items() if not _is_block_linear(n)]
    assert len(blocks) == 14 and {tuple(p.shape) for p in rest} >= {(8192, 64), (64,)}
    opts = [torch.optim.Muon(blocks, lr=1e-2, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(rest, lr=1e-2, weight_decay=0.0)]
    for i in range(5):
        ids = _batch(i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
        for opt in opts:
            opt.zero_grad()
        reference(ids, labels=ids).loss.backward()
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = 1e-2 * method.schedule(i)
            opt.step()
    for (k, v), v2 in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(v, v2), k
    assert [len(o.state) for o in method.optimizers] == [14, len(rest)]  # one buffer per block weight


def test_muon_step_by_hand() -> None:
    """Two Muon steps of one (176 x 64) weight, written out in float64: momentum buf = mu buf + (1 - mu) g,
    Nesterov direction g + mu (buf - g), Newton-Schulz, update 0.2 sqrt(176) lr O. torch iterates in bfloat16
    (about 3 significant digits): measured 0.3-1.7% relative difference of O on such matrices; 3% allows
    for other matrices and still fails a missing momentum, transpose or step (4 steps instead of 5 differ
    by 30-45%) or a wrong lr adjustment (x sqrt(176 / 64) for 'original')."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(176, 64))
    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.up_proj = nn.Linear(64, 176, bias=False)
    model.mlp.up_proj.weight = w
    method = build_method(model, _cfg("muon", lr=0.05, warmup_steps=0, min_lr_ratio=1.0, target_modules=["up_proj"]))
    assert len(method.optimizers) == 1  # nothing else to train: no AdamW
    buf = torch.zeros(176, 64, dtype=torch.float64)
    for _ in range(2):
        g = torch.randn(176, 64)
        w.grad = g.clone()
        before = w.detach().double().clone()
        method.step()
        buf = 0.95 * buf + 0.05 * g.double()
        o = _newton_schulz(g.double() + 0.95 * (buf - g.double()))
        moved = w.detach().double() - before
        expected = -0.05 * 0.2 * math.sqrt(176) * o
        assert ((moved - expected).norm() / expected.norm()).item() < 0.03
        # The update's RMS is about 0.2 lr, AdamW's (singular values of O lie in about [0.7, 1.2]).
        assert 0.6 * 0.2 * 0.05 < moved.pow(2).mean().sqrt().item() < 1.25 * 0.2 * 0.05


def test_rso_with_a_muon_inner_solver_orthogonalizes_b() -> None:
    """--inner-optimizer muon: B's first step from B = 0 is -lr' NS(g + mu ((1 - mu) g - g)), with
    lr' = lr x target_lr_scale x 0.2 sqrt(max(r, n)) (torch's routine on the hand-formed direction, bit for
    bit); its singular values are Newton-Schulz's (about 1, not the gradient's); the merge adds P B to W."""
    cfg = _cfg("rso", rank=8, inner_optimizer="muon", target_lr_scale=0.5, warmup_steps=0, min_lr_ratio=1.0,
               projection="coordinate", resample_every=2)
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    assert type(method.inner).__name__ == "Muon" and method.inner.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    ids = _batch(0)
    model(ids, labels=ids).loss.backward()
    layer = model.model.layers[0].mlp.up_proj
    g = layer.rso_B.grad.clone()  # (r, n) = (8, 176)
    method.step()
    from torch.optim._muon import _zeropower_via_newtonschulz

    direction = g.lerp(0.05 * g, 0.95)  # torch's lerp forms, from a zero buffer
    lr = 1e-2 * 0.5 * 0.2 * math.sqrt(176)
    expected = -lr * _zeropower_via_newtonschulz(direction, NS_COEFFICIENTS, 5, 1e-7).float()
    assert torch.equal(layer.rso_B.detach(), expected)
    s = torch.linalg.svdvals(layer.rso_B.detach().double() / lr)
    assert s.min() > 0.6 and s.max() < 1.25  # orthogonalized inside the subspace
    sg = torch.linalg.svdvals(g.double())
    assert sg.max() / sg.min() > 2  # the raw gradient was not
    model(ids, labels=ids).loss.backward()
    assert method.step() is True  # tau = 2: merge and resample
    assert not method.inner.state  # a fresh Muon buffer for the next subspace
    assert torch.count_nonzero(layer.rso_B) == 0


def test_keep_second_needs_adam_not_muon() -> None:
    with pytest.raises(ValueError, match="inner_state 'keep_second' needs an Adam inner optimizer, not 'muon'"):
        MethodConfig(inner_optimizer="muon", inner_state="keep_second")


# -- what every method promises --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "muon"])
def test_state_dict_loads_with_weights_only(name: str) -> None:
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _cfg(name, rank=1 if name == "apollo-mini" else 8))
    for i in range(4):  # crosses a refresh of P (gap 3)
        ids = _batch(i)
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["step"] == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "apollo", "apollo_scale": 0.0}, "apollo_scale must be a positive finite number, got 0.0"),
        ({"name": "apollo", "apollo_scale_type": "row"}, "apollo scale_type must be one of channel, tensor; got 'row'"),
        ({"name": "apollo-mini", "apollo_update_proj_gap": 0}, "apollo update_proj_gap must be an integer >= 1, got 0"),
        ({"name": "apollo", "rank": 0}, "rank must be a positive integer, got 0"),
        ({"name": "muon", "muon_adjust_lr": "moonshot"},
         "muon_adjust_lr must be one of match_rms_adamw, original; got 'moonshot'"),
        ({"name": "muon", "muon_momentum": 1.0}, r"muon_momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)


def test_apollo_rank_larger_than_a_layer() -> None:
    with pytest.raises(ValueError, match=r"rank 65 is larger than the smaller dimension 64 of layer 'model\.layers\.0\.self_attn\.q_proj'"):
        build_method(build_model("llama-micro"), _cfg("apollo", rank=65))


def test_muon_without_block_weights_names_the_option() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"muon orthogonalizes the 2-D weights of the decoder blocks \(target_modules\), "
                                         r"and this model has none to give it: no module matches target_modules=\['q_proj'"):
        build_method(model, _cfg("muon"))


def test_train_options() -> None:
    from rso_ray.config import parse_config

    for argv, message in [
        (["--muon-adjust-lr", "x"], "--muon-adjust-lr must be one of match_rms_adamw, original; got 'x'"),
        (["--apollo-scale", "-1"], "--apollo-scale must be a finite number > 0, got -1.0"),
        (["--apollo-scale-type", "row"], "--apollo-scale-type must be one of channel, tensor; got 'row'"),
        (["--optimizer", "lion"], "--optimizer must be one of rso, adamw, galore, apollo, apollo-mini, muon; got 'lion'"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_config(argv)
    # The published settings fill in: APOLLO's ranks are its scripts', APOLLO-Mini's is 1, and the command
    # line's options reach the method.
    for optimizer, rank, lr in (("apollo", 256, 1e-2), ("apollo-mini", 1, 1e-2), ("muon", 512, 1e-3)):
        method = parse_config(["--model", "llama-1b", "--optimizer", optimizer])[0].method
        assert (method.rank, method.lr) == (rank, lr), optimizer
    method = parse_config(["--model", "llama-mini", "--optimizer", "apollo-mini", "--apollo-scale", "64"])[0].method
    assert method.apollo_config().group() == {"rank": 1, "update_proj_gap": 100, "scale": 64.0, "scale_type": "tensor"}
    muon = parse_config(["--model", "llama-mini", "--optimizer", "muon", "--muon-adjust-lr", "original"])[0].method
    assert muon.muon_adjust_lr == "original"
    # The options MLflow records and a sweep writes resolve to the same method again.
    from rso_ray.config import resolve
    from rso_ray.config.options import TrainOptions

    cfg = parse_config(["--model", "llama-mini", "--optimizer", "apollo", "--apollo-scale-type", "tensor"])[0]
    assert resolve(TrainOptions(**cfg.as_options())).method == cfg.method


def test_memory_tool_counts_their_states(capsys) -> None:
    """Traced on meta, the target layers' optimizer states are what each method keeps: Muon one buffer per
    block weight; APOLLO two rank-r moments and P per weight (rows >= cols: rows x r moments and an r x cols
    P; else r x cols moments and a rows x r P); APOLLO-Mini the same at rank 1."""
    from rso_ray.memory import main, measure_methods

    results = measure_methods("llama-micro", methods=["muon", "apollo", "apollo-mini"], rank=8, batch_size=2,
                              seq_len=16, dtype=torch.float32)
    model = build_model("llama-micro", device="meta")
    blocks = [p for n, p in model.named_parameters() if _is_block_linear(n)]

    def apollo_floats(r: int) -> int:
        return sum(2 * rows * r + r * cols if rows >= cols else 2 * r * cols + rows * r for rows, cols in
                   (tuple(p.shape) for p in blocks))

    assert results["muon"].target_optimizer_states == 4 * sum(p.numel() for p in blocks)
    assert results["apollo"].target_optimizer_states == 4 * apollo_floats(8)
    assert results["apollo-mini"].target_optimizer_states == 4 * apollo_floats(1)
    assert main(["--model", "llama-micro", "--rank", "8", "--batch-size", "2", "--seq-len", "16",
                 "--methods", "adamw", "apollo", "apollo-mini", "muon"]) == 0
    header = capsys.readouterr().out.splitlines()[2]
    assert header.split()[:4] == ["adamw", "apollo", "apollo-mini", "muon"]
