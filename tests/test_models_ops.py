"""The memory-aware ops and the LLaMA model against independent references (torch and transformers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rso_ray.core.memory import SavedTensorCounter
from rso_ray.core.ops import chunked_cross_entropy, rms_norm, swiglu
from rso_ray.models import MODEL_CONFIGS, build_model, model_config


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def test_rms_norm_matches_reference_and_saves_input_and_rstd_only() -> None:
    x, w = _leaf(3, 5, 16), _leaf(16, seed=1)
    counter = SavedTensorCounter(torch.nn.Module(), blocks=[])
    with counter.track():
        y = rms_norm(x, w, 1e-6)
    # x and 1/rms (3*5 values), float64; w is a leaf of the caller here (not a module parameter), counted too.
    assert counter.total_bytes == x.numel() * 8 + 15 * 8 + w.numel() * 8
    gy = torch.randn_like(y)
    dx, dw = torch.autograd.grad((y * gy).sum(), (x, w))
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6) * wr
    assert_close(y, ref)
    rdx, rdw = torch.autograd.grad((ref * gy).sum(), (xr, wr))
    assert_close(dx, rdx)
    assert_close(dw, rdw)


def test_swiglu_matches_reference() -> None:
    g, u = _leaf(4, 7, 10), _leaf(4, 7, 10, seed=2)
    out = swiglu(g, u)
    go = torch.randn_like(out)
    dg, du = torch.autograd.grad((out * go).sum(), (g, u))
    gr, ur = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    ref = F.silu(gr) * ur
    assert_close(out, ref)
    rdg, rdu = torch.autograd.grad((ref * go).sum(), (gr, ur))
    assert_close(dg, rdg)
    assert_close(du, rdu)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_cross_entropy_matches_reference(chunk: int) -> None:
    h, w = _leaf(2, 9, 6), _leaf(11, 6, seed=3)
    labels = torch.randint(0, 11, (2, 9))
    labels[0, :3] = -100  # ignored positions
    loss = chunked_cross_entropy(h, w, labels, chunk_tokens=chunk)
    dh, dw = torch.autograd.grad(loss * 3.0, (h, w))
    hr, wr = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.cross_entropy((hr @ wr.t()).reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert_close(loss, ref)
    rdh, rdw = torch.autograd.grad(ref * 3.0, (hr, wr))
    assert_close(dh, rdh)
    assert_close(dw, rdw)


def test_chunked_cross_entropy_never_stores_logits() -> None:
    t, n, vocab = 512, 16, 4096
    h, w = torch.randn(t, n, requires_grad=True), torch.randn(vocab, n, requires_grad=True)
    counter = SavedTensorCounter(torch.nn.Module(), blocks=[])
    with counter.track():
        chunked_cross_entropy(h, w, torch.randint(0, vocab, (t,)), chunk_tokens=64)
    # grad of hidden (t x n) and of the weight (vocab x n), float32: far below t x vocab logits.
    assert counter.total_bytes == (t * n + vocab * n) * 4
    assert counter.total_bytes < t * vocab * 4 / 10


def test_no_grad_loss_keeps_nothing() -> None:
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    labels = torch.randint(0, 10, (8,))
    with torch.no_grad():
        loss = chunked_cross_entropy(h, w, labels, chunk_tokens=3)
    assert loss.grad_fn is None
    assert_close(loss, F.cross_entropy(h.detach() @ w.detach().t(), labels))


@pytest.mark.parametrize("grad", [False, True])
def test_an_evaluation_loss_computes_no_gradient(grad: bool) -> None:
    """Under no_grad (evaluation) the fused loss does the logits' matmul alone: autograd still reports a
    parameter as needing its gradient there, and the weight's gradient (one more matmul of the same size)
    was computed and dropped in every evaluation. With grad on, the two gradients' matmuls come too."""
    from torch.utils.flop_counter import FlopCounterMode

    t, n, vocab = 64, 8, 32
    h, w = torch.randn(t, n, requires_grad=True), torch.nn.Parameter(torch.randn(vocab, n))
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        chunked_cross_entropy(h if grad else h.detach(), w, torch.randint(0, vocab, (t,)), chunk_tokens=16)
    logits = 2 * t * vocab * n
    assert counter.get_total_flops() == (3 * logits if grad else logits)


def test_llama_matches_transformers() -> None:
    """Same weights in transformers' LlamaForCausalLM: same logits and loss (float64)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM as HFLlama

    cfg = model_config("llama-micro", vocab_size=96)
    ours = build_model("llama-micro", vocab_size=96, seed=0, dtype=torch.float64)
    hf_cfg = HFConfig(
        vocab_size=96,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    hf = HFLlama(hf_cfg).double()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        hf_out = hf(input_ids=ids, labels=ids)
        assert_close(ours(ids).logits, hf_out.logits)
        assert_close(ours(ids, labels=ids).loss.float(), hf_out.loss)  # HF computes the loss in float32


def test_named_configs_match_the_papers() -> None:
    expect = {
        "llama-60m": (512, 1376, 8, 8),
        "llama-130m": (768, 2048, 12, 12),
        "llama-350m": (1024, 2736, 16, 24),
        "llama-1b": (2048, 5461, 32, 24),
        "llama-7b": (4096, 11008, 32, 32),
    }
    for name, (d, f, h, layers) in expect.items():
        c = MODEL_CONFIGS[name]
        assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (d, f, h, layers)
        assert c.vocab_size == 32000 and c.rms_norm_eps == 1e-6 and c.initializer_range == 0.02
    # Parameter count of llama-1b built on the meta device equals the config's closed form.
    model = build_model("llama-1b", device="meta")
    assert sum(p.numel() for p in model.parameters()) == MODEL_CONFIGS["llama-1b"].num_parameters()


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="unknown model 'llama-3b'; choose one of llama-micro, llama-tiny"):
        build_model("llama-3b")


def test_any_hugging_face_causal_lm_can_be_wrapped(tmp_path) -> None:
    """hf:<local folder> builds transformers' model from its config (no download) and RSO trains it."""
    from transformers import LlamaConfig as HFConfig

    from rso_ray.core.methods import MethodConfig, build_method

    HFConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
             tie_word_embeddings=False).save_pretrained(tmp_path)
    model = build_model(f"hf:{tmp_path}", seed=0)
    assert type(model).__name__ == "LlamaForCausalLM" and type(model).__module__.startswith("transformers")
    method = build_method(model, MethodConfig(name="rso", rank=8, lr=1e-2, resample_every=3, total_steps=12))
    assert len(method.handle.layers) == 14  # q k v o gate up down in 2 blocks, matched by name
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        method.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        method.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert method.outer_step == 4


def test_hf_model_that_cannot_be_found(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"cannot load the Hugging Face config '.*nowhere'"):
        build_model(f"hf:{tmp_path / 'nowhere'}")
