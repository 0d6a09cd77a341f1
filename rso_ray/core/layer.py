"""RSO linear layer: forward Z = Y (X + P B), backward that keeps only Y P and computes no weight gradient.

In torch's layout a linear layer stores W = X^T (out x in = n x m), so the layer computes
``Z = Y W_eff^T`` with ``W_eff = W + B^T P^T`` (n x m). The autograd path, per layer with s tokens (Adam's
linear does 2smn forward and 4smn backward):

- forward forms W_eff once (2mnr FLOPs, or a scaled column update for a coordinate P) and runs one
  GEMM ``Y W_eff^T``; computing ``Y W^T + (Y P) B`` instead would cost more than Adam from r = d/5;
- it saves for backward only ``Y P`` (s x r) -- never Y -- shared by all layers of a
  :class:`SubspaceGroup` (q/k/v; gate/up), which share P and so compute and store ``Y P`` once;
- backward computes ``dB = (Y P)^T dZ`` and ``dY = dZ W_eff`` (W_eff formed again rather than kept,
  which would cost an n x m activation per layer); there is no ``dW``.

A layer whose input is already kept alive by the op that produced it (the attention output, which SDPA
saves for its own backward) can save that tensor by reference and project it in backward instead:
no extra bytes, and the same FLOPs, moved from forward to backward. Models declare this by setting
``rso_input_is_saved = True`` on the nn.Linear.

A layer whose input is a cheap function of tensors the producing op saves anyway (down_proj reads
SiLU(gate) * up, and the SwiGLU keeps gate and up) can do better still: with ``recompute_input`` it keeps
references to those tensors and, in backward, recomputes Y and then Y P. That saves Y P (r values per
token) for one elementwise op; Y P itself is computed once either way (in backward instead of forward).
Ops declare such outputs with :func:`mark_recomputable`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from .projection import Projection, sample_projection


def sharded_rows(w: DTensor) -> tuple[torch.Tensor, range]:
    """The local shard of a DTensor sharded on dim 0 (FSDP2's layout) and the global rows it holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Shard) or p.dim != 0 for p in w.placements):
        raise ValueError(f"expected a weight sharded on dim 0 (FSDP), got placements {w.placements}")
    local = w.to_local()
    shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"local shard of shape {tuple(local.shape)} does not match the expected {tuple(shape)}")
    return local, range(offset[0], offset[0] + shape[0])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype inside autocast, else x's dtype."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Disable autocast inside a custom op that casts explicitly (a no-op on devices without autocast)."""
    if device_type in ("cuda", "cpu", "xpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class SubspaceGroup:
    """Layers that read the same input and share one P (m x r); holds P and the shared Y P.

    P is never stored in a checkpoint: it is a pure function of (seed, outer step, key).
    """

    def __init__(self, key: int, names: list[str], in_features: int, rank: int, kind: str, seed: int):
        self.key = key
        self.names = names
        self.in_features = in_features
        self.rank = rank
        self.kind = kind
        self.seed = seed
        self.outer_step = -1
        self.projection: Projection | None = None
        self._casts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        # (weakref to Y, Y._version, dtype, weakref to YP): reuse Y P for the next member fed the same Y.
        self._yp_cache: tuple[Any, int, torch.dtype, Any] | None = None

    def resample(self, outer_step: int, device: torch.device | str) -> None:
        self.projection = sample_projection(
            self.kind,
            self.in_features,
            self.rank,
            seed=self.seed,
            outer_step=outer_step,
            key=self.key,
            device=device,
        )
        self.outer_step = outer_step
        self._casts.clear()
        self._yp_cache = None

    def on_device(self, device: torch.device) -> Projection:
        """The current projection, moved to ``device`` the first time it is needed there."""
        proj = self.projection
        if proj is None:
            raise RuntimeError(f"RSO group {self.names} has no projection yet: call resample() first")
        ref = proj.matrix if proj.matrix is not None else proj.index
        assert ref is not None
        if ref.device != device:
            proj = proj.to(device)
            self.projection = proj
            self._casts.clear()
        return proj

    def matrix_as(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Dense P in ``dtype`` (cached: under bf16 autocast P is cast once per subspace, not per call)."""
        proj = self.on_device(device)
        assert proj.matrix is not None
        key = (device, dtype)
        cast = self._casts.get(key)
        if cast is None:
            cast = proj.matrix.to(dtype)
            self._casts[key] = cast
        return cast

    def project(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Y P (..., r) in ``dtype``; for coordinate P the *unscaled* gather Y[..., idx] (scale goes on dB)."""
        cache = self._yp_cache
        if cache is not None and cache[0]() is y and cache[1] == y._version and cache[2] == dtype:
            yp = cache[3]()
            if yp is not None:
                return yp
        yp = project_input(self, y.to(dtype))
        # Weak references only: Y P lives exactly as long as the autograd graph that saved it.
        self._yp_cache = (weakref.ref(y), y._version, dtype, weakref.ref(yp))
        return yp

    def tensors(self) -> list[torch.Tensor]:
        """Tensors owned by the group (not activations); memory accounting excludes them."""
        proj = self.projection
        out = [t for t in (proj.matrix, proj.index) if t is not None] if proj else []
        return out + list(self._casts.values())


_RECIPE_ATTR = "_rso_recompute"


def mark_recomputable(out: torch.Tensor, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """Declare ``out == fn(*inputs)`` bit for bit, where the op that made ``out`` keeps ``inputs`` for its own
    backward: an RSO layer reading ``out`` may then keep (detached) references to ``inputs`` instead of
    Y P. Returns ``out``. Only marks while gradients are recorded."""
    if torch.is_grad_enabled():
        setattr(out, _RECIPE_ATTR, (fn, tuple(t.detach() for t in inputs)))
    return out


def recompute_recipe(y: torch.Tensor) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]] | None:
    recipe = getattr(y, _RECIPE_ATTR, None)
    return recipe if isinstance(recipe, tuple) else None


def project_input(group: SubspaceGroup, y: torch.Tensor) -> torch.Tensor:
    proj = group.on_device(y.device)
    if proj.kind == "coordinate":
        assert proj.index is not None
        return y.index_select(-1, proj.index)  # (..., r): a gather, no FLOPs
    return y @ group.matrix_as(y.device, y.dtype)  # (..., m) @ (m, r) -> (..., r)


def effective_weight(
    weight: torch.Tensor, b: torch.Tensor, group: SubspaceGroup, dtype: torch.dtype
) -> torch.Tensor:
    """W_eff = W + B^T P^T (n x m) in ``dtype``; a fresh tensor (W is never modified here).

    The sum is formed in float32 (or W's dtype, if wider) and rounded to ``dtype`` once. Under bf16
    autocast, rounding W first and adding P B in bf16 would drop every update under half a bf16 ulp of
    W: a young subspace (|P B| ~ 5e-6 against |W| ~ 0.02, ulp ~ 1.2e-4) was ~5% visible to the forward.
    Rounded once, each element is the nearest bf16 of W + (P B), which carries P B in expectation."""
    proj = group.on_device(weight.device)
    acc = torch.promote_types(weight.dtype, torch.float32)
    w = weight.to(acc)
    bt = b.to(acc).t()  # (n, r)
    if proj.kind == "coordinate":
        assert proj.index is not None
        w = w.clone() if w is weight else w  # clone keeps W's (column-major) strides
        w_eff = w.index_add_(1, proj.index, bt, alpha=proj.scale)  # r scaled column updates
    else:
        w_eff = torch.addmm(w, bt, group.matrix_as(weight.device, acc).t())  # (n,r)@(r,m) + W
    return w_eff.to(dtype)


class _RSOLinearFn(torch.autograd.Function):
    """``saved`` and ``mode`` say what backward gets to form Y P: ``"yp"``: (Y P,); ``"input"``: (Y,), kept
    alive by another op; ``"recompute"``: the inputs of ``recompute`` (Y = recompute(*saved)); ``"none"``:
    nothing (B is frozen, only dY is needed)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        b: torch.Tensor,
        group: SubspaceGroup,
        dtype: torch.dtype,
        mode: str,
        recompute: Callable[..., torch.Tensor] | None,
        *saved: torch.Tensor,
    ) -> torch.Tensor:
        with autocast_off(y.device.type):
            w_eff = effective_weight(weight, b, group, dtype)
            z = F.linear(y.to(dtype), w_eff, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(weight, b, *saved)
        ctx.group = group
        ctx.mode = mode
        ctx.recompute = recompute
        ctx.dtype = dtype
        ctx.y_dtype = y.dtype
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return z

    @staticmethod
    def _yp(ctx: Any, saved: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
        if ctx.mode == "yp":
            return saved[0]
        if ctx.mode == "input":
            return project_input(ctx.group, saved[0].to(dtype))
        with torch.no_grad():
            y = ctx.recompute(*saved)  # the same op as in forward, on the same tensors: the same Y
        return project_input(ctx.group, y.to(dtype))

    @staticmethod
    def backward(ctx: Any, dz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, b, *saved = ctx.saved_tensors
        group: SubspaceGroup = ctx.group
        dtype: torch.dtype = ctx.dtype
        need_dy, _, need_dbias, need_db = ctx.needs_input_grad[:4]
        dy = dbias = db = None
        with autocast_off(dz.device.type):
            dz = dz.to(dtype)
            dz2 = dz.reshape(-1, dz.shape[-1])  # (S, n)
            if need_db:
                yp = _RSOLinearFn._yp(ctx, tuple(saved), dtype)
                db = yp.reshape(-1, yp.shape[-1]).t() @ dz2  # (r, S) @ (S, n) -> (r, n)
                proj = group.on_device(dz.device)
                if proj.kind == "coordinate":
                    db = db * proj.scale
                db = db.to(b.dtype)
            if need_dy:
                w_eff = effective_weight(weight, b, group, dtype)
                dy = (dz @ w_eff).to(ctx.y_dtype)  # (..., n) @ (n, m) -> (..., m)
            if need_dbias and ctx.has_bias:
                dbias = dz2.sum(0).to(ctx.bias_dtype)
        return (dy, None, dbias, db, None, None, None, None) + (None,) * len(saved)


class RSOLinear(nn.Module):
    """An nn.Linear trained inside a random subspace: frozen ``base_layer.weight`` (W), trainable
    ``rso_B`` (r x out_features, starts at zero), and P from the shared :class:`SubspaceGroup`.

    Like PEFT's LoRA layers it keeps the original layer as ``base_layer``; :meth:`merge` folds P B into
    W exactly (in W's dtype: keep W in float32 under bf16 autocast so repeated merges lose nothing).
    """

    def __init__(self, base_layer: nn.Linear, group: SubspaceGroup, *, recompute_input: bool = True):
        super().__init__()
        if group.in_features != base_layer.in_features:
            raise ValueError(
                f"group input dimension {group.in_features} does not match layer input {base_layer.in_features}"
            )
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.group = group
        w = base_layer.weight
        if group.kind == "coordinate" and w.is_contiguous() and w.device.type != "meta":
            # A coordinate P updates r *columns* of W (n x m). Stored column-major (same shape, strides
            # (1, n)), those columns are contiguous: the update is 4x faster on a CPU, and GEMMs with a
            # transposed operand run as fast.
            w.data = w.data.t().contiguous().t()
        # B in the weight's dtype: float32 under mixed precision (weights are the master copy), bf16 in pure bf16.
        self.rso_B = nn.Parameter(torch.zeros(group.rank, base_layer.out_features, device=w.device, dtype=w.dtype))
        # The producing op keeps the input alive anyway (e.g. SDPA's output): keep a reference, not Y P.
        self.input_is_saved = bool(getattr(base_layer, "rso_input_is_saved", False))
        # Inputs marked with mark_recomputable (SwiGLU's output) are rebuilt in backward instead of keeping Y P.
        self.recompute_input = recompute_input

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def rank(self) -> int:
        return self.group.rank

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        bias = self.base_layer.bias
        dtype = compute_dtype(y)
        if not (torch.is_grad_enabled() and (self.rso_B.requires_grad or y.requires_grad)):
            # Evaluation: no Y P is needed at all.
            with autocast_off(y.device.type):
                w_eff = effective_weight(w, self.rso_B, self.group, dtype)
                return F.linear(y.to(dtype), w_eff, None if bias is None else bias.to(dtype))
        recipe = recompute_recipe(y) if self.recompute_input else None
        recompute = None
        saved: tuple[torch.Tensor, ...]
        if not self.rso_B.requires_grad:
            mode, saved = "none", ()  # frozen B: only dY is needed, keep nothing
        elif self.input_is_saved:
            mode, saved = "input", (y,)
        elif recipe is not None:
            mode, (recompute, saved) = "recompute", recipe
        else:
            with torch.no_grad():
                mode, saved = "yp", (self.group.project(y, dtype),)
        return _RSOLinearFn.apply(y, w, bias, self.rso_B, self.group, dtype, mode, recompute, *saved)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + P B (i.e. X <- X + P B in the paper's layout), then B <- 0. Exact in W's dtype.

        Under FSDP (W and B sharded DTensors, outside forward) each rank updates its own rows of W with the
        matching columns of B: no communication for W, one all-gather of the small B (r x n); the rows get
        the same float32 result as an unsharded merge (tests/test_sharding.py checks it bit for bit)."""
        w = self.base_layer.weight
        b = self.rso_B
        if isinstance(w, DTensor):
            w, rows = sharded_rows(w)  # this rank's rows [start, stop) of W, as a plain tensor
            b_full = b.full_tensor() if isinstance(b, DTensor) else b  # (r, n): small, gathered whole
            bt = b_full.to(w.dtype)[:, rows.start : rows.stop].t()  # (n_local, r)
        else:
            bt = b.to(w.dtype).t()  # (n, r)
        proj = self.group.on_device(w.device)
        if proj.kind == "coordinate":
            assert proj.index is not None
            w.index_add_(1, proj.index, bt, alpha=proj.scale)
        else:
            assert proj.matrix is not None
            w.addmm_(bt, proj.matrix.to(w.dtype).t())
        b.zero_()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"projection={self.group.kind}, group={self.group.key}"
        )
