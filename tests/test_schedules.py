"""Step schedules of RSO's rank and subspace length (``--rank 32,64@600``): each value applies at the first
subspace boundary at or after its step, a run interrupted and resumed through the checkpoint functions equals
the uninterrupted one bit for bit, the options and the memory CLI take schedules, and a short run's default
subspace length follows the recipe rule. No Ray: the torch-only engine and the checkpoint functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rso_ray.config import RunConfig, parse_config
from rso_ray.config.recipes import MIN_SUBSPACES, recipe_for
from rso_ray.core.methods import MethodConfig, RSOMethod, build_method
from rso_ray.core.schedule import StepSchedule
from rso_ray.models import build_model
from rso_ray.training.checkpoint import checkpoint_name, load_checkpoint, write_checkpoint
from rso_ray.training.engine import train_step
from rso_ray.training.progress import Progress


def test_a_schedule_gives_the_value_of_its_last_entry_at_or_before_a_step() -> None:
    s = StepSchedule.parse("32,64@600,128@900")
    assert [s.at(k) for k in (0, 599, 600, 899, 900, 10_000)] == [32, 32, 64, 64, 128, 128]
    assert (s.first, s.later, s.largest, str(s)) == (32, ((600, 64), (900, 128)), 128, "32,64@600,128@900")
    assert StepSchedule.parse(16) == StepSchedule(16) and StepSchedule(16).constant
    assert StepSchedule.parse(" 64 , 32@10 ").largest == 64  # a rank may also shrink


@pytest.mark.parametrize(("text", "message"), [
    ("32,64", r"'32,64' is not a value or a step schedule such as 32,64@600"),
    ("32,64@x", r"is not a value or a step schedule"),
    ("32,64@600,128@300", r"the steps of a schedule must be increasing integers > 0, got \[600, 300\]"),
    ("32,64@0", r"must be increasing integers > 0, got \[0\]"),
    ("32,0@600", r"every value of a step schedule must be a positive integer, got \[32, 0\]"),
])
def test_bad_schedules_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StepSchedule.parse(text)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 8192, (4, 16), generator=g) for _ in range(n)]


def _config(**over: object) -> MethodConfig:
    values: dict = dict(name="rso", rank=8, rank_schedule=((5, 16),), resample_every=3, resample_schedule=((7, 2),),
                        total_steps=16, lr=3e-3, target_lr_scale=0.5, inner_warmup=1)
    return MethodConfig(**(values | over))


def test_values_apply_at_the_first_boundary_at_or_after_their_step() -> None:
    """tau 3 until a boundary at or after step 7, then 2; rank 8 until a boundary at or after step 5, then 16:
    the boundaries are 3, 6, 9 (tau 3) and then 11, 13, 15; rank 16 from the boundary at step 6."""
    model = build_model("llama-micro", seed=0)
    method = build_method(model, _config())
    assert isinstance(method, RSOMethod)
    seen = []
    for ids in _batches(15):
        merged = train_step(model, method, [ids]).merged
        seen.append((method.step_count, merged, method.rank, method.tau))
    boundaries = [s for s, merged, _, _ in seen if merged]
    assert boundaries == [3, 6, 9, 11, 13, 15]
    assert [r for s, _, r, _ in seen if s in (5, 6)] == [8, 16]  # B (and P) get 16 rows at the boundary at step 6
    assert [t for s, _, _, t in seen if s in (8, 9)] == [3, 2]
    assert all(b.shape[0] == 16 for b in method.handle.b_parameters())
    assert method.parameter_set == 1  # one replacement of the trainable parameters (a DDP wrapper is rebuilt)


def _train(model: torch.nn.Module, method: object, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        assert train_step(model, method, [ids], max_grad_norm=1.0).finite  # type: ignore[arg-type]


def _snapshot(model: torch.nn.Module, method: object) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, opt in enumerate(method.optimizers):  # type: ignore[attr-defined]
        for j, state in opt.state_dict()["state"].items():
            out |= {f"opt{i}.{j}.{k}": v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return out


@pytest.mark.parametrize("inner_state", ["reset", "keep_second"])
@pytest.mark.parametrize("stop", [3, 6, 11])  # before the rank change, at it, after both changes
def test_an_interrupted_run_resumes_bit_for_bit(tmp_path: Path, inner_state: str, stop: int) -> None:
    """Train 16 steps straight; train to the boundary at ``stop``, checkpoint, build a fresh model and method
    (at the schedules' first rank), load, train the rest: every weight and optimizer state is bitwise equal."""
    cfg = _config(inner_state=inner_state)
    batches = _batches(16)
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    _train(model, method, batches)
    method.finish()
    straight = _snapshot(model, method)

    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    _train(model, method, batches[:stop])
    assert method.at_boundary
    folder = tmp_path / checkpoint_name(stop)
    write_checkpoint(folder, model=model, method=method, state={"step": stop, "progress": {}, "data": {}})
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    load_checkpoint(folder, model=model, method=method)
    assert isinstance(method, RSOMethod) and method.rank == cfg.ranks().at(stop)
    _train(model, method, batches[stop:])
    method.finish()
    resumed = _snapshot(model, method)

    assert straight.keys() == resumed.keys()
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_a_boundary_checkpoint_resumes_at_another_rank_keeping_the_second_moment(tmp_path: Path) -> None:
    """A relaunch (or a PBT clone) that changes the rank at a boundary checkpoint: B starts at zero with the
    new rank; keep_second's kept second moment (one row per layer) fills every new row; Adam's step goes on."""
    cfg = MethodConfig(name="rso", rank=8, resample_every=4, total_steps=20, inner_state="keep_second")
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    _train(model, method, _batches(8))
    kept = {n: dict(method.inner.state[layer.rso_B]) for n, layer in method.handle.layers.items()}  # type: ignore[attr-defined]
    write_checkpoint(tmp_path / "c", model=model, method=method, state={"step": 8})
    wider = MethodConfig(name="rso", rank=16, resample_every=4, total_steps=20, inner_state="keep_second")
    model = build_model("llama-micro", seed=0)
    method = build_method(model, wider)
    load_checkpoint(tmp_path / "c", model=model, method=method)
    assert isinstance(method, RSOMethod) and method.outer_step == 2
    for name, layer in method.handle.layers.items():
        state = method.inner.state[layer.rso_B]
        assert layer.rso_B.shape[0] == 16 and not layer.rso_B.any()
        assert torch.equal(state["exp_avg_sq"], kept[name]["exp_avg_sq"][:1].expand(16, -1))
        assert not state["exp_avg"].any() and torch.equal(state["step"], kept[name]["step"])
    _train(model, method, _batches(2, seed=1))  # and it trains


def test_a_checkpoint_inside_a_subspace_cannot_change_rank(tmp_path: Path) -> None:
    cfg = MethodConfig(name="rso", rank=8, resample_every=4, total_steps=20)
    model = build_model("llama-micro", seed=0)
    method = build_method(model, cfg)
    _train(model, method, _batches(6))
    write_checkpoint(tmp_path / "c", model=model, method=method, state={"step": 6})
    model = build_model("llama-micro", seed=0)
    method = build_method(model, MethodConfig(name="rso", rank=16, resample_every=4, total_steps=20))
    with pytest.raises(ValueError, match=r"the subspace that started at step 4 has rank 8 in the checkpoint but 16 "
                                         r"in this run's rank schedule 16: a rank changes only at a subspace boundary"):
        load_checkpoint(tmp_path / "c", model=model, method=method)


def test_options_take_schedules_and_resolve_them_into_the_method(tmp_path: Path) -> None:
    cfg, _ = parse_config(["--model", "llama-micro", "--rank", "8,16@20", "--resample-every", "6,4@12"])
    m = cfg.method
    assert (m.rank, m.rank_schedule, m.resample_every, m.resample_schedule) == (8, ((20, 16),), 6, ((12, 4),))
    assert cfg.as_options()["rank"] == "8,16@20" and cfg.as_options()["resample_every"] == "6,4@12"
    assert cfg.checkpoint_every == 4  # every subspace: the shortest
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # state.json's round trip
    assert again.method == m
    (tmp_path / "c.yaml").write_text("model: llama-micro\nrank: 8,16@20\n")
    assert parse_config(["--config", str(tmp_path / "c.yaml")])[0].method.rank_schedule == ((20, 16),)


@pytest.mark.parametrize(("argv", "message"), [
    (["--optimizer", "galore", "--rank", "8,16@20"], r"--rank 8,16@20: a step schedule is RSO's \(it changes at a "
                                                     r"subspace boundary\); --optimizer galore takes one value"),
    (["--rank", "8,16@20", "--parallelism", "fsdp"], r"--rank 8,16@20: a rank schedule needs --parallelism ddp"),
    (["--resample-every", "6,4@3@4"], r"--resample-every: '6,4@3@4' is not a value or a step schedule"),
])
def test_bad_schedule_options_are_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(["--model", "llama-micro", *argv])


def test_a_rank_schedule_too_large_for_a_layer_is_refused() -> None:
    with pytest.raises(ValueError, match=r"rank 128 \(of the schedule 8,128@20\) is larger than the input dimension 64"):
        build_method(build_model("llama-micro"), MethodConfig(name="rso", rank=8, rank_schedule=((20, 128),)))


def test_the_memory_cli_measures_a_schedule_at_its_largest_rank(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rso_ray.memory import main

    figures = {}
    for rank in ("8,32@600", "32", "8"):
        out = tmp_path / f"{rank}.json"
        assert main(["--model", "llama-micro", "--rank", rank, "--batch-size", "2", "--seq-len", "32",
                     "--methods", "rso", "--json", str(out)]) == 0
        figures[rank] = json.loads(out.read_text())["results"]["rso"]
    assert "rank 8,32@600 (measured at its largest, 32)" in capsys.readouterr().out
    assert figures["8,32@600"] == figures["32"] != figures["8"]


def test_a_short_run_gets_enough_subspaces() -> None:
    """The recipe's resample interval, capped at a MIN_SUBSPACES-th of the run; given values are kept."""
    tiny = recipe_for("llama-tiny")["resample_every"]
    for steps in (100, 300, 1000, 10_000):
        cfg, _ = parse_config(["--model", "llama-tiny", "--steps", str(steps)])
        assert cfg.method.resample_every == max(1, min(tiny, steps // MIN_SUBSPACES))
        assert steps // cfg.method.resample_every >= MIN_SUBSPACES or cfg.method.resample_every == tiny
    assert parse_config(["--model", "llama-tiny", "--steps", "100", "--resample-every", "50"])[0].method.resample_every == 50
    galore, _ = parse_config(["--model", "llama-tiny", "--steps", "100", "--optimizer", "galore"])
    assert galore.method.galore_update_proj_gap == tiny  # GaLore's projector gap keeps the recipe's


def test_checkpoints_follow_the_first_boundary_at_or_after_each_multiple() -> None:
    p = Progress()
    due = []
    for step in range(1, 26):  # boundaries every 3 steps; checkpoint_every 5
        p.step = step
        if step % 3 == 0 and p.checkpoint_due(5):
            due.append(step)
            p.last_checkpoint = step
    assert due == [6, 12, 15, 21]  # the first boundaries at or after 5, 10, 15, 20
    assert Progress.restored({"step": 7, "tokens": 0, "wall_time": 0.0}).last_checkpoint == 7  # older state.json


def test_a_sharded_boundary_checkpoint_loads_at_another_rank(tmp_path: Path) -> None:
    """The DCP format (--parallelism fsdp) keeps B in its shards; at a boundary B is zero and is not read, so a
    relaunch at another rank loads it (before, DCP refused B's other shape)."""
    from rso_ray.training.checkpoint import write_sharded_checkpoint

    model = build_model("llama-micro", seed=0)
    method = build_method(model, MethodConfig(name="rso", rank=8, resample_every=4, total_steps=20))
    _train(model, method, _batches(4))
    write_sharded_checkpoint(tmp_path / "c", model=model, method=method, state={"step": 4})
    weights = {k: v.clone() for k, v in model.state_dict().items() if "rso_B" not in k}
    model = build_model("llama-micro", seed=0)
    method = build_method(model, MethodConfig(name="rso", rank=16, resample_every=4, total_steps=20))
    load_checkpoint(tmp_path / "c", model=model, method=method)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert all(b.shape[0] == 16 and not b.any() for b in method.handle.b_parameters())  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_rank_schedule_on_two_ray_workers_recovers_bit_for_bit(micro_config, train_run, ray_local, metric_history,
                                                                   final_checkpoint, tmp_path: Path) -> None:
    """Two DDP workers, rank 8 then 16 from the boundary at step 8 (DDP rebuilt over the new B), resample
    interval 4 then 2 from step 12: a worker killed at step 10 (after the change; the restart builds rank 8
    and loads rank 16 from the checkpoint at step 8) ends bitwise equal to the uninterrupted run; MLflow logs
    the rank and length in force."""
    run = dict(workers="2", rank="8,16@8", resample_every="4,2@12", steps=16, log_every=2, eval_every=16,
               eval_tokens=4096, max_failures=2, keep_checkpoints=2)
    ref = micro_config(tmp_path / "ref", run)
    summary = train_run(ref)
    cfg = micro_config(tmp_path / "kill", run, fault_plan="10:1:step")
    train_run(cfg)
    weights, state = final_checkpoint(cfg)
    ref_weights, ref_state = final_checkpoint(ref)
    assert state["step"] == ref_state["step"] == 16 and state["data"] == ref_state["data"]
    assert [k for k in weights if not torch.equal(weights[k], ref_weights[k])] == []
    ranks = dict(metric_history(ref, summary["mlflow_run_id"], "rso/rank"))
    taus = dict(metric_history(ref, summary["mlflow_run_id"], "rso/resample_every"))
    assert [ranks[s] for s in (2, 6, 8, 10, 16)] == [8, 8, 16, 16, 16]
    assert [taus[s] for s in (10, 12, 14)] == [4, 2, 2]
