"""FSDP2 (--parallelism fsdp) on CPU with gloo, in-process (torch.multiprocessing, no Ray): RSO merges on
sharded W, 2-rank training against 1-process training, and sharded checkpoints loaded on other world sizes.

    PYTHONPATH=. python -m pytest tests/test_sharding.py -q
"""

from __future__ import annotations

import io
import json
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from rso_ray.core.memory import unique_bytes
from rso_ray.core.methods import MethodConfig, build_method
from rso_ray.core.rso import apply_rso
from rso_ray.models import build_model
from rso_ray.training.checkpoint import (
    COMPLETE_FILE,
    MODEL_FILE,
    STATE_FILE,
    TRAIN_STATE_FILE,
    load_checkpoint,
    read_model_weights,
    read_state,
    write_checkpoint,
    write_sharded_checkpoint,
)
from rso_ray.training.engine import train_step
from rso_ray.training.sharding import CommCounter, apply_fsdp, build_sharded_method

GLOBAL_BATCH = 4
SEQ = 16
VOCAB = 8192


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()
        torch.save(fn(rank, world, *args), buf)  # bytes, not shared-memory tensors: this process exits next
        queue.put((rank, buf.getvalue(), None))
    except BaseException:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo processes; their return values, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    for _ in range(world):
        rank, value, error = queue.get(timeout=300)
        if error:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} failed:\n{error}")
        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    for p in procs:
        p.join(timeout=60)
    return [results[r] for r in range(world)]


def batches(steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    # Tokens from a 64-word corner of the vocabulary: a unigram the model learns in a few steps.
    return [torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(steps)]


# Variants beyond the three methods: the levers of issue 11 (a target lr scale, and RSO's inner state kept
# across a resample, whose row mean of a sharded second moment needs every rank's rows).
LEVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "rso-levers": ("rso", dict(inner_state="keep_second", inner_warmup=2, target_lr_scale=0.5)),
    "adamw-split": ("adamw", dict(target_lr_scale=0.25)),
    # Issue 20: APOLLO-Mini at its rank 1 (tensor-wise factors: an all-reduce of two sums of squares), and
    # Muon as RSO's inner solver (Newton-Schulz on the gathered B).
    "apollo-mini": ("apollo-mini", dict(rank=1)),
    "rso-muon": ("rso", dict(inner_optimizer="muon")),
}


def method_config(name: str, steps: int, projection: str = "haar") -> MethodConfig:
    # resample_every=3: steps 3 and 6 merge, so the run crosses two subspace boundaries (GaLore: refreshes
    # its projectors at steps 3 and 6).
    name, extra = LEVERS.get(name, (name, {}))
    base = dict(rank=8, resample_every=3, total_steps=steps, warmup_steps=1, lr=1e-2, projection=projection,
                galore_update_proj_gap=3, apollo_update_proj_gap=3)
    return MethodConfig(name=name, **(base | extra))


# -- merges on sharded W ------------------------------------------------------------------------------

def _random_b(handle: Any) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for b in handle.b_parameters():
            b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _merge_sharded(rank: int, world: int, projection: str) -> dict[str, torch.Tensor]:
    model = build_model("llama-micro", seed=0)
    handle = apply_rso(model, method_config("rso", 10, projection).rso_config(), outer_step=3)
    _random_b(handle)
    apply_fsdp(model, method="rso")
    handle.merge()
    out = {name: layer.base_layer.weight.full_tensor() for name, layer in handle.layers.items()}
    assert all(float(b.full_tensor().abs().max()) == 0.0 for b in handle.b_parameters())
    return out


@pytest.mark.parametrize("projection", ["haar", "coordinate"])
def test_merge_on_sharded_weights_equals_unsharded_merge_bit_for_bit(projection: str) -> None:
    model = build_model("llama-micro", seed=0)
    handle = apply_rso(model, method_config("rso", 10, projection).rso_config(), outer_step=3)
    _random_b(handle)
    before = {name: layer.base_layer.weight.clone() for name, layer in handle.layers.items()}
    handle.merge()
    for world in (2, 3):  # 3 does not divide llama-micro's 64 rows evenly: uneven shards
        sharded = run_ranks(world, _merge_sharded, projection)
        for name, layer in handle.layers.items():
            assert not torch.equal(layer.base_layer.weight, before[name])  # the merge did something
            for got in sharded:
                assert torch.equal(got[name], layer.base_layer.weight), (world, name)


# -- training: 2 ranks vs 1 process -------------------------------------------------------------------

def _train(rank: int, world: int, name: str, steps: int, micro: int) -> dict[str, Any]:
    """Train llama-micro for ``steps`` on the same global batches; this rank takes its consecutive share
    (as WorkerLoop does), loss weights make the averaged gradient the global-batch mean."""
    model = build_model("llama-micro", seed=0)
    counter = CommCounter()
    cfg = method_config(name, steps)
    method = build_sharded_method(model, cfg, counter=counter) if world > 1 else build_method(model, cfg)
    share = GLOBAL_BATCH // world
    losses, traffic = [], []
    for ids in batches(steps):
        mine = ids[rank * share : (rank + 1) * share]
        chunks = list(torch.split(mine, micro))
        weights = [c.shape[0] * world / GLOBAL_BATCH for c in chunks]
        result = train_step(model, method, chunks, loss_weights=weights)
        loss = torch.tensor([result.loss * share])
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / GLOBAL_BATCH)
        traffic.append(counter.take())
    return {"losses": losses, "traffic": traffic}


# Muon orthogonalizes in bfloat16 (torch's Newton-Schulz), which turns a float32 gradient one ulp away into
# another bfloat16 now and then: measured in one process, moving every gradient by one ulp moves the losses
# of these 7 steps by up to 2.1e-5 (muon) and 9.6e-5 (rso-muon, whose B is small) relative; FSDP's other
# summation order moves them by 4.0e-5 and 8.8e-5. rtol 5e-4 is 5x that; a bug in the sharded step (rows
# applied to the wrong rank, a missing gather) moves the loss by > 1e-2, and test_sharded_muon_step_is_torch_muon
# checks the step itself bit for bit.
BF16_RTOL = {"muon": 5e-4, "rso-muon": 5e-4}


@pytest.mark.parametrize("name", ["rso", "adamw", "galore", "rso-levers", "adamw-split", "apollo", "apollo-mini", "muon",
                                  "rso-muon"])
def test_two_rank_fsdp_matches_one_process(name: str) -> None:
    steps = 7
    reference = _train(0, 1, name, steps, micro=GLOBAL_BATCH)["losses"]
    ranks = run_ranks(2, _train, name, steps, 1)  # 2 micro-batches per rank: gradient accumulation too
    got = ranks[0]["losses"]
    assert ranks[1]["losses"] == got
    # Both runs see the same sequences and the same initial weights; only the order of the float32 sums
    # differs (2 micro-batch gradients accumulated per rank, then averaged over 2 ranks, against one batch
    # of 4), a few ulps (~1e-7 relative) per gradient element. Measured: the losses of 7 steps over two
    # merges differ by at most 1.1e-7 (relative), about one float32 ulp. rtol 2e-6 leaves 20x for other
    # CPUs' summation orders and stays far below what a real bug does (a wrong gradient scale, a missed
    # reduction, a merge of the wrong rows all move the loss by > 1e-3 within a step).
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, reference, strict=True))
    print(f"\n{name}: largest relative loss difference over {steps} steps: {diff:.1e}")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=BF16_RTOL.get(name, 2e-6), atol=0.0)
    assert got[-1] < got[0] - 0.5  # it trained
    # Bytes per step: all-gathers of the (unsharded) parameters, reduce-scatters of the trainable ones.
    ag, rs = ranks[0]["traffic"][1]
    assert ag > 0 and rs > 0
    model = build_model("llama-micro", seed=0)
    build_method(model, method_config(name, steps))
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * 4 for p in model.parameters())
    # One reduce-scatter per step (the last micro-batch) of exactly the trainable gradients, padded to
    # a multiple of the world size per tensor.
    assert trainable <= rs <= trainable + 2 * 4 * len(list(model.parameters()))
    # Each micro-batch all-gathers every block twice (forward and backward) and the root once.
    assert 2 * total <= ag <= 2 * 2 * total + 4 * 2 * len(list(model.parameters()))
    print(f"\n{name}: fsdp x2 bytes per step: all-gather {ag:,}, reduce-scatter {rs:,}; ddp all-reduce {trainable:,}")


def _muon_steps(rank: int, world: int, name: str) -> dict[str, torch.Tensor]:
    """Three steps on given gradients (the same whole gradients on every run, sharded like the parameters
    under FSDP): the weights afterwards, whole."""
    from torch.distributed.tensor import distribute_tensor

    model = build_model("llama-micro", seed=0)
    cfg = method_config(name, 3)
    method = build_sharded_method(model, cfg) if world > 1 else build_method(model, cfg)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p in method.trainable_parameters():
            whole = torch.randn(p.shape, generator=g) * 0.01
            p.grad = distribute_tensor(whole, p.device_mesh, p.placements) if isinstance(p, DTensor) else whole
        method.step()
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["muon", "rso-muon"])
def test_sharded_muon_step_is_torch_muon(name: str) -> None:
    """Given the same gradients, Muon's sharded step (momentum on each rank's rows, Newton-Schulz on the
    gathered direction, own rows applied) leaves every weight bit for bit where torch.optim.Muon does."""
    reference = _muon_steps(0, 1, name)
    for world in (2, 3):  # 3: uneven shards
        got = run_ranks(world, _muon_steps, name)[0]
        assert sorted(got) == sorted(reference)
        for key, value in reference.items():
            assert torch.equal(got[key], value), (world, key)


# -- sharded checkpoints: written at one world size, loaded at another --------------------------------

def _setup(world: int, name: str, steps: int) -> tuple[Any, Any]:
    model = build_model("llama-micro", seed=0)
    cfg = method_config(name, steps)
    return model, (build_sharded_method(model, cfg) if world > 1 else build_method(model, cfg))


def _steps(rank: int, world: int, model: Any, method: Any, data: list[torch.Tensor]) -> list[float]:
    # Worker i takes G // W rows (+1 for the first G % W workers), consecutive, as WorkerLoop does.
    shares = [GLOBAL_BATCH // world + (1 if r < GLOBAL_BATCH % world else 0) for r in range(world)]
    share, offset = shares[rank], sum(shares[:rank])
    out = []
    for ids in data:
        mine = ids[offset : offset + share]
        weights = [share * world / GLOBAL_BATCH]
        loss = torch.tensor([train_step(model, method, [mine], loss_weights=weights).loss * share])
        if world > 1:
            dist.all_reduce(loss)
        out.append(float(loss) / GLOBAL_BATCH)
    return out


def _full_state(model: Any, method: Any) -> dict[str, torch.Tensor]:
    """Every weight and optimizer state as a whole tensor, keyed by parameter name."""
    def whole(t: torch.Tensor) -> torch.Tensor:
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    names = {id(p): n for n, p in model.named_parameters()}
    out = {n: whole(p) for n, p in model.named_parameters()}
    for i, opt in enumerate(method.optimizers):
        for p, st in opt.state.items():
            for k, v in st.items():
                out[f"opt{i}/{names[id(p)]}/{k}"] = whole(v) if isinstance(v, torch.Tensor) else torch.tensor(v)
    out["step"] = torch.tensor([method.step_count, getattr(method, "outer_step", 0), getattr(method, "inner_steps", 0)])
    return out


TOTAL, SAVE_AT = 7, 4  # RSO (tau = 3) saves inside its second subspace: B and the inner Adam state are live


def _train_and_save(rank: int, world: int, name: str, folder: str) -> dict[str, Any]:
    model, method = _setup(world, name, TOTAL)
    data = batches(TOTAL)
    _steps(rank, world, model, method, data[:SAVE_AT])
    writer = write_sharded_checkpoint if world > 1 else write_checkpoint
    writer(folder, model=model, method=method, state={"step": SAVE_AT})
    saved = _full_state(model, method)
    return {"state": saved, "losses": _steps(rank, world, model, method, data[SAVE_AT:])}


def _load_and_continue(rank: int, world: int, name: str, folder: str) -> dict[str, Any]:
    model, method = _setup(world, name, TOTAL)
    load_checkpoint(folder, model=model, method=method)
    loaded = _full_state(model, method)
    return {"state": loaded, "losses": _steps(rank, world, model, method, batches(TOTAL)[SAVE_AT:])}


def _assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("name", ["rso", "adamw", "galore", "apollo", "muon"])
def test_sharded_checkpoint_reloads_on_other_world_sizes(name: str, tmp_path: Any) -> None:
    folder = str(tmp_path / "checkpoint_00000004")
    written = run_ranks(2, _train_and_save, name, folder)[0]
    state = read_state(folder)
    assert state["format"] == "dcp" and state["step"] == SAVE_AT
    files = set(json.loads((tmp_path / "checkpoint_00000004" / COMPLETE_FILE).read_text())["files"])
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", TRAIN_STATE_FILE, STATE_FILE} <= files
    assert MODEL_FILE not in files  # nothing gathered on one rank
    # Export reads the shards in one process (no process group) into whole tensors.
    whole = read_model_weights(folder, state)
    assert sorted(whole) == sorted(n for n in written["state"] if "/" not in n and n != "step")
    assert all(torch.equal(v, written["state"][k]) for k, v in whole.items())
    # Same world size: the continuation repeats the uninterrupted run bit for bit.
    again = run_ranks(2, _load_and_continue, name, folder)[0]
    _assert_same_state(again["state"], written["state"])
    assert again["losses"] == written["losses"]
    # One process (no FSDP) and three ranks (uneven shards): the same weights, states and counters
    # bit for bit; the losses then differ only by the order of float32 sums (see the tolerance above).
    for resumed in (_load_and_continue(0, 1, name, folder), run_ranks(3, _load_and_continue, name, folder)[0]):
        _assert_same_state(resumed["state"], written["state"])
        torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(written["losses"]),
                                   rtol=BF16_RTOL.get(name, 2e-6), atol=0.0)


def _save_with_short_upload(rank: int, world: int, root: str, fail: str) -> str:
    """Rank 1's upload of its shard goes wrong: ``truncate`` lands half the bytes and says nothing (what a
    storage layer that drops the end of a stream does), ``raise`` lands half and fails."""
    from rso_ray.training import storage

    model, method = _setup(world, "adamw", TOTAL)
    _steps(rank, world, model, method, batches(1))
    if rank == 1:
        real = storage.upload_file

        def short(local: Any, uri: str) -> None:
            if not uri.endswith(".distcp"):
                return real(local, uri)
            data = Path(local).read_bytes()
            storage.write_bytes(uri, data[: len(data) // 2])
            if fail == "raise":
                raise OSError("connection reset while uploading")
            return None

        storage.upload_file = short  # this process only (spawned): no monkeypatch to undo
    try:
        write_sharded_checkpoint(f"{root}/checkpoint_00000001", model=model, method=method, state={"step": 1})
    except OSError as err:
        return str(err)
    return "written"


@pytest.mark.parametrize("fail", ["truncate", "raise"])
def test_a_partly_uploaded_sharded_checkpoint_is_not_complete(fail: str, tmp_path: Any) -> None:
    """On object storage every rank uploads its own shards; rank 0 writes the marker only when every file
    of every rank is there with the size its writer had, and every rank hears of a failed upload."""
    from rso_ray.training.checkpoint import is_complete, latest_checkpoint

    root = f"file://{tmp_path}/bucket/run"
    said = run_ranks(2, _save_with_short_upload, root, fail)
    assert all("checkpoint_00000001" in s and "incomplete" in s for s in said), said
    assert "__1_0.distcp" in said[0]  # rank 0's error names the short file
    assert not is_complete(f"{root}/checkpoint_00000001") and latest_checkpoint(root) is None


@pytest.mark.parametrize("name", ["rso", "galore", "apollo"])
def test_whole_checkpoint_loads_into_sharded_model(name: str, tmp_path: Any) -> None:
    """A DDP (model.pt) checkpoint (RSO inside a subspace; GaLore with its whole low-rank states) continues
    under 2-rank FSDP."""
    folder = str(tmp_path / "checkpoint_00000004")
    written = _train_and_save(0, 1, name, folder)
    assert read_state(folder)["format"] == "torch"
    resumed = run_ranks(2, _load_and_continue, name, folder)[0]
    _assert_same_state(resumed["state"], written["state"])
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(written["losses"]),
                                   rtol=BF16_RTOL.get(name, 2e-6), atol=0.0)


def _state_bytes_after(rank: int, world: int, name: str, folder: str) -> int:
    """Bytes of this rank's optimizer states (storages counted once): after loading ``folder``, or after two
    steps of a fresh run when ``folder`` is empty."""
    model, method = _setup(world, name, TOTAL)
    if folder:
        load_checkpoint(folder, model=model, method=method)
    else:
        _steps(rank, world, model, method, batches(SAVE_AT))
    return unique_bytes(t.to_local() if isinstance(t, DTensor) else t for t in method.optimizer_state_tensors())


@pytest.mark.parametrize("name", ["adamw", "rso-levers"])
def test_a_whole_checkpoint_loaded_sharded_keeps_only_each_ranks_rows(name: str, tmp_path: Any) -> None:
    """A ddp -> fsdp relaunch: every rank holds the optimizer state bytes a fresh 2-worker fsdp run holds,
    not the whole checkpoint's (rows sliced as views kept the whole storages alive)."""
    folder = str(tmp_path / "checkpoint_00000004")
    _train_and_save(0, 1, name, folder)
    loaded = run_ranks(2, _state_bytes_after, name, folder)
    fresh = run_ranks(2, _state_bytes_after, name, "")
    assert loaded == fresh, (loaded, fresh)


# -- memory: the sharded part shrinks as 1/N, measured and on paper -------------------------------------

def _local_bytes(rank: int, world: int, name: str) -> dict[str, int]:
    """Bytes this rank's tensors hold after one step: its shards of weights, gradients, optimizer states."""
    from rso_ray.core.memory import unique_bytes

    model, method = _setup(world, name, 4)
    ids = batches(1)[0]
    share = GLOBAL_BATCH // world
    mine = ids[rank * share : (rank + 1) * share]
    method.zero_grad()
    (model(mine, labels=mine).loss * share * world / GLOBAL_BATCH).backward()
    grads = unique_bytes(_local(p.grad) for p in model.parameters() if p.grad is not None)
    method.step()
    return {"parameters": unique_bytes(_local(p) for p in model.parameters()), "gradients": grads,
            "optimizer_states": unique_bytes(_local(t) for t in method.optimizer_state_tensors())}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@pytest.mark.parametrize("name", ["rso", "adamw"])
def test_sharded_memory_shrinks_as_one_over_n(name: str) -> None:
    from rso_ray.memory import fsdp_per_worker

    paper = fsdp_per_worker("llama-micro", name, rank=8, batch_size=2, seq_len=SEQ, workers=[1, 2, 4])
    one = _local_bytes(0, 1, name)
    for world in (2, 4):
        for got in run_ranks(world, _local_bytes, name):
            for key, full in one.items():
                # Each tensor is split into world row chunks; padding adds at most one row per tensor
                # (llama-micro's rows are 64 wide: under 1 KiB a tensor), so within 2% of full / world.
                assert abs(got[key] - full / world) <= 0.02 * full / world, (world, key, got[key], full)
                assert abs(getattr(paper[world], key) - got[key]) <= 0.02 * got[key], (world, key)
    print(f"\n{name}: one worker {one}; the tool's prediction for 4: {paper[4].as_dict()}")


@pytest.mark.parametrize("name", ["adamw", "rso", "galore", "apollo", "apollo-mini", "muon"])
def test_optimizer_states_per_worker_as_the_memory_tool_predicts(name: str) -> None:
    """What rank 0 of 2 holds after a step, byte for byte, against fsdp_per_worker's prediction from a
    one-process trace on meta: states laid out like their parameter in row chunks; GaLore's low-rank states
    and projectors, APOLLO's (r x cols) projections and its column-side moments whole on every worker;
    APOLLO's row-side moments and (rows x r) projections in row chunks."""
    from rso_ray.memory import fsdp_per_worker

    predicted = fsdp_per_worker("llama-micro", name, rank=8, batch_size=2, seq_len=SEQ, workers=[2],
                                ranks={"apollo-mini": 1})[2].optimizer_states
    got = run_ranks(2, _local_bytes, name)
    assert got[0]["optimizer_states"] == predicted
    if name in ("adamw", "rso", "muon"):  # every state sharded: the two halves of 64 rows are equal
        assert got[1]["optimizer_states"] == predicted


def test_memory_cli_fsdp(capsys: Any) -> None:
    from rso_ray.memory import main

    assert main(["--model", "llama-micro", "--rank", "8", "--batch-size", "2", "--seq-len", "16",
                 "--methods", "rso", "adamw", "--parallelism", "fsdp", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "total per worker" in out and "fewest 21.5 GiB workers" in out


# -- activation checkpointing ---------------------------------------------------------------------------

def _train_ac(rank: int, world: int, name: str, steps: int, ac: bool) -> dict[str, Any]:
    """Like _train, with or without per-block activation checkpointing; also the bytes saved for backward
    inside the decoder blocks by the first micro-batch (SavedTensorCounter, as the workers log them)."""
    from rso_ray.core.memory import SavedTensorCounter
    from rso_ray.training.sharding import apply_activation_checkpointing

    model = build_model("llama-micro", seed=0)
    cfg = method_config(name, steps)
    if world > 1:
        method = build_sharded_method(model, cfg, activation_checkpointing=ac)
    else:
        method = build_method(model, cfg)
        if ac:
            apply_activation_checkpointing(model)
    losses, saved = [], 0
    share = GLOBAL_BATCH // world
    for i, ids in enumerate(batches(steps)):
        mine = ids[rank * share : (rank + 1) * share]
        counter = SavedTensorCounter(model)
        result = train_step(model, method, [mine], loss_weights=[share * world / GLOBAL_BATCH],
                            first_forward=counter.track() if i == 0 else None)
        saved = saved or counter.block_bytes
        loss = torch.tensor([result.loss * share])
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / GLOBAL_BATCH)
    return {"losses": losses, "saved": saved}


@pytest.mark.parametrize("name", ["rso", "adamw"])
def test_activation_checkpointing_same_losses_fewer_saved_bytes(name: str) -> None:
    plain = _train_ac(0, 1, name, 4, False)
    ac = _train_ac(0, 1, name, 4, True)
    # The recomputed forward runs the same kernels on the same inputs: the same gradients, bit for bit.
    assert ac["losses"] == plain["losses"]
    assert ac["saved"] < 0.5 * plain["saved"]  # the blocks keep only their inputs
    print(f"\n{name}: bytes saved for backward inside the blocks, one micro-batch of {GLOBAL_BATCH} x {SEQ}: "
          f"{plain['saved']:,} without, {ac['saved']:,} with activation checkpointing")


def test_activation_checkpointing_under_fsdp_matches_one_process() -> None:
    reference = _train_ac(0, 1, "rso", 4, False)["losses"]
    got = run_ranks(2, _train_ac, "rso", 4, True)[0]["losses"]
    # The tolerance of test_two_rank_fsdp_matches_one_process: only the order of float32 sums differs.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=2e-6, atol=0.0)


# -- bf16-mixed: FSDP's mixed-precision policy ------------------------------------------------------------

def _train_bf16(rank: int, world: int, name: str, steps: int) -> list[float]:
    """bf16 autocast over float32 masters; micro-batches of 2 on every run, so the bf16 GEMMs have the same
    shapes in the 1-process reference and on the 2 ranks (bf16 results depend on the blocking)."""
    model = build_model("llama-micro", seed=0)
    cfg = method_config(name, steps)
    bf16 = torch.bfloat16
    method = build_sharded_method(model, cfg, autocast_dtype=bf16) if world > 1 else build_method(model, cfg)
    share = GLOBAL_BATCH // world
    out = []
    for ids in batches(steps):
        chunks = list(torch.split(ids[rank * share : (rank + 1) * share], 2))
        weights = [c.shape[0] * world / GLOBAL_BATCH for c in chunks]
        loss = torch.tensor([train_step(model, method, chunks, loss_weights=weights, autocast_dtype=bf16).loss * share])
        if world > 1:
            dist.all_reduce(loss)
        out.append(float(loss) / GLOBAL_BATCH)
    return out


def test_bf16_mixed_under_fsdp() -> None:
    for name in ("rso", "adamw"):
        reference = _train_bf16(0, 1, name, 7)
        got = run_ranks(2, _train_bf16, name, 7)[0]
        if name == "rso":
            # RSO all-gathers W in float32 (sharding.mp_policy) and autocast casts as in one process: the
            # same bf16 kernels on the same values; only the float32 gradient sums differ in order.
            torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=2e-6, atol=0.0)
        else:
            # AdamW all-gathers every parameter in bf16 (torchtitan's policy), norms and embeddings included,
            # which autocast keeps in float32 in one process: each is rounded by up to 2^-9 relative, a
            # ~2e-3 relative loss difference after 7 steps (measured 2.1e-3). 1e-2 bounds it, still far below
            # the 20% the loss falls over these steps.
            torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=1e-2, atol=0.0)
        assert got[-1] < 0.85 * got[0]


def _load_whole_model(rank: int, world: int, name: str, folder: str) -> dict[str, torch.Tensor]:
    """A DDP worker's load: whole model and optimizer on every rank, process group up, no FSDP."""
    model, method = _setup(1, name, TOTAL)
    load_checkpoint(folder, model=model, method=method)
    return _full_state(model, method)


def test_sharded_checkpoint_loads_into_ddp_workers(tmp_path: Any) -> None:
    """An FSDP checkpoint resumed by a --parallelism ddp run of 2 workers: each holds everything."""
    folder = str(tmp_path / "checkpoint_00000004")
    written = run_ranks(2, _train_and_save, "rso", folder)[0]
    for loaded in run_ranks(2, _load_whole_model, "rso", folder):
        _assert_same_state(loaded, written["state"])


def test_sweep_files_take_the_sharding_options(tmp_path: Any) -> None:
    from rso_ray.tuning.spec import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("name: t\nbase:\n  model: llama-micro\n  parallelism: fsdp\n  activation_checkpointing: true\n"
                    "  steps: 8\nsearch_space:\n  optimizer: {grid: [rso, adamw, galore]}\nnum_samples: 1\n"
                    "resources: {workers: 2}\n")
    spec = load_sweep(path)
    cfg = spec.base_config()
    assert cfg.parallelism == "fsdp" and cfg.activation_checkpointing is True
    path.write_text(path.read_text().replace("parallelism: fsdp", "parallelism: zero3"))
    with pytest.raises(Exception, match="parallelism"):
        load_sweep(path)


@pytest.mark.parametrize("name", ["rso", "adamw"])
def test_saved_bytes_under_fsdp_count_activations_not_gathered_weights(name: str) -> None:
    """The activation figure the workers log: under FSDP the all-gathered weights autograd keeps a
    reference to are weights, not activations; each rank's half batch saves half the activations."""
    plain = _train_ac(0, 1, name, 1, False)["saved"]
    sharded = run_ranks(2, _train_ac, name, 1, False)[0]["saved"]
    # Only the rotary tables (cos and sin, 16 x 16 float32 each) do not scale with the batch.
    assert abs(sharded - plain / 2) <= 2 * 16 * 16 * 4, (sharded, plain)
