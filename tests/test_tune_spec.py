"""Sweep files: the shipped ones validate; bad ones fail fast with the key and its line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rso_ray.tune import main as tune_main
from rso_ray.tuning.runner import check_cluster_fits
from rso_ray.tuning.spec import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
GOOD = """\
name: t
base:
  model: llama-micro
  steps: 24
  eval_every: 8
search_space:
  rank: {grid: [8, 16]}
  lr: {loguniform: [0.001, 0.01]}
num_samples: 2
resources: {workers: 1}
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "tune_spaces").glob("*.yaml")))
def test_shipped_sweeps_validate(name: str) -> None:
    spec = load_sweep(ROOT / "tune_spaces" / name)
    assert spec.space and spec.trial_count() >= 2  # a population of two at least


def test_good_sweep(tmp_path: Path) -> None:
    spec = load_sweep(_write(tmp_path, GOOD))
    assert spec.trial_count() == 4 and spec.metric == "eval_loss" and spec.scheduler["type"] == "asha"
    assert [d.kind for d in spec.space] == ["grid", "loguniform"]
    cfg = spec.base_config()
    assert cfg.model == "llama-micro" and cfg.steps == 24 and cfg.workers == (1, 1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("num_samples: 2", "num_samples: 2\nlearning_rate: 3"), r"sweep\.yaml, line 10: learning_rate: unknown key; allowed: name, base"),
        (("lr: {loguniform: [0.001, 0.01]}", "lr: {lognormal: [0.001, 0.01]}"), r"line 8: search_space\.lr: unknown distribution 'lognormal'; allowed: grid, choice, uniform, loguniform, randint"),
        (("lr: {loguniform: [0.001, 0.01]}", "lr: {loguniform: [0.0, 0.01]}"), r"line 8: search_space\.lr: loguniform needs low > 0"),
        (("lr: {loguniform: [0.001, 0.01]}", "lr: {uniform: [0.01, 0.001]}"), r"line 8: search_space\.lr: uniform needs low < high"),
        (("rank: {grid: [8, 16]}", "rank: {grid: []}"), r"line 7: search_space\.rank: grid takes a non-empty list"),
        (("rank: {grid: [8, 16]}", "rank: {randint: [8.5, 16]}"), r"search_space\.rank: randint takes integers"),
        (("rank: {grid: [8, 16]}", "rank: {grid: [8, 4096]}"), r"line 7: search_space\.rank: value 4096 is not valid: rank 4096 is larger than the input dimension 64"),
        (("rank: {grid: [8, 16]}", "rank: {grid: [8, -1]}"), r"search_space\.rank: value -1 is not valid: --rank must be a positive integer"),
        (("rank: {grid: [8, 16]}", "ranks: {grid: [8, 16]}"), r"line 7: search_space\.ranks: is not an option of python -m rso_ray\.train"),
        (("  steps: 24", "  steps: 24\n  workers: 2"), r"line 5: base\.workers: is not allowed in base \(set it under resources:\)"),
        (("  steps: 24", "  steps: 24\n  nan_loss_from_step: 3"), r"line 5: base\.nan_loss_from_step: is not allowed in base \(the sweep sets it for every trial\)"),
        (("  steps: 24", "  steps: 24\n  rank: 8"), r"search_space\.rank: is also in base"),
        (("  model: llama-micro", "  model: llama-2b"), r"base: --model: unknown model 'llama-2b'"),
        (("resources: {workers: 1}", "resources: {workers: 1, gpus: 2}"), r"line 10: resources\.gpus: unknown key"),
        (("resources: {workers: 1}", "resources: {workers: 1, max_concurrent_trials: 0}"), r"resources\.max_concurrent_trials: must be an integer >= 1"),
        (("num_samples: 2", "num_samples: 2\nscheduler: {type: hyperband}"), r"line 10: scheduler\.type: must be one of asha, fifo, hyperband_bohb, pbt, pb2; got 'hyperband'"),
        (("num_samples: 2", "num_samples: 2\nscheduler: {type: asha, max_t: 100}"), r"scheduler\.max_t: 100 is more than the trials' 24 steps"),
        (("num_samples: 2", "num_samples: 2\nmetric: accuracy"), r"line 10: metric: must be one of eval_loss, tokens, wall_time"),
        (("num_samples: 2", "num_samples: 2\nmetric: eval_loss\nmode: max"), r"line 11: mode: eval_loss is better when it is lower: mode must be min, got max"),
        (("num_samples: 2", "num_samples: 2\nscheduler: {type: asha, grace_period: 500}"), r"scheduler\.grace_period: 500 is more than the trials' 24 steps"),
        (("num_samples: 2", "num_samples: 0"), r"num_samples: must be an integer >= 1"),
    ],
)
def test_bad_sweeps_name_the_key_and_line(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in GOOD
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path, GOOD.replace(old, new)))


def test_impossible_resources_fail_before_trials(tmp_path: Path) -> None:
    spec = load_sweep(_write(tmp_path, GOOD.replace("resources: {workers: 1}", "resources: {workers: 4, use_gpu: 'true'}")))
    with pytest.raises(SweepError, match=r"line 10: resources\.workers: a trial needs 4 GPU worker\(s\), the cluster has 1 GPU"):
        check_cluster_fits(spec, spec.base_config(), {"CPU": 16.0, "GPU": 1.0})
    spec = load_sweep(_write(tmp_path, GOOD.replace("resources: {workers: 1}", "resources: {workers: 3, cpus_per_worker: 2}")))
    with pytest.raises(SweepError, match=r"a trial needs 7 CPUs \(3 worker\(s\) x 2 \+ 1 for the tokenizer\), the cluster has 4"):
        check_cluster_fits(spec, spec.base_config(), {"CPU": 4.0})
    check_cluster_fits(spec, spec.base_config(), {"CPU": 8.0})  # fits: no error


def test_cli_reports_errors_in_one_line(tmp_path: Path, capsys) -> None:
    import ray

    path = _write(tmp_path, GOOD.replace("lr: {loguniform", "lr: {gaussian"))
    assert tune_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "search_space.lr: unknown distribution 'gaussian'" in err
    assert not ray.is_initialized()
    assert tune_main([str(ROOT / "tune_spaces" / "smoke.yaml"), "--check"]) == 0
    assert "valid; 4 trial(s) over rank, lr" in capsys.readouterr().out


def test_sweep_resources_min_max_workers_is_not_a_base60_number(tmp_path: Path) -> None:
    f = tmp_path / "sweep.yaml"
    f.write_text("name: s\nbase: {model: llama-micro}\nresources: {workers: 2:8}\n"
                 "search_space: {lr: {grid: [0.001, 0.002]}}\n")
    spec = load_sweep(f)
    assert spec.base_config().workers == (2, 8)


def test_relative_storage_path_is_resolved_where_the_sweep_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune runs each trial in its own working folder under Ray's session folder: a relative storage path
    must be fixed to the launch folder first, or the checkpoints vanish with /tmp/ray."""
    f = tmp_path / "sweep.yaml"
    f.write_text("name: s\nstorage_path: my_runs\nbase: {model: llama-micro}\nsearch_space: {lr: {grid: [0.001]}}\n")
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(f)
    assert spec.storage_path == str(tmp_path / "my_runs")
    monkeypatch.chdir("/")  # a trial's working folder
    assert spec.storage_path == str(tmp_path / "my_runs")


def test_check_runs_the_methods_own_checks(tmp_path: Path) -> None:
    """inner_state keep_second needs an Adam inner optimizer: a sweep pairing it with sgd fails at --check."""
    path = tmp_path / "ks.yaml"
    path.write_text(
        "name: ks\nbase: {model: llama-micro, optimizer: rso, inner_optimizer: sgd, steps: 4}\n"
        "search_space:\n  inner_state: {grid: [reset, keep_second]}\nmetric: eval_loss\nmode: min\n"
    )
    with pytest.raises(ValueError, match=r"inner_state.*value 'keep_second' is not valid: --inner-state 'keep_second' "
                                         r"needs an Adam inner optimizer, not 'sgd'"):
        load_sweep(path)


PBT = """\
name: p
base:
  model: llama-micro
  steps: 32
search_space:
  lr: {loguniform: [0.0001, 0.01]}
  rank: {choice: [8, 16]}
num_samples: 4
scheduler: {type: pbt, perturbation_interval: 8}
"""


@pytest.mark.parametrize(
    ("text", "edit", "message"),
    [
        (GOOD, ("num_samples: 2", "num_samples: 2\nsearch: {type: annealing}"),
         r"line 10: search\.type: must be one of grid, random, optuna, hyperopt, bohb; got 'annealing'"),
        (GOOD, ("num_samples: 2", "num_samples: 2\nsearch: {type: optuna, gamma: 0.5}"),
         r"line 10: search\.gamma: not a setting of search type optuna; its settings: seed, sampler, n_startup_trials"),
        (GOOD, ("num_samples: 2", "num_samples: 2\nsearch: {type: optuna}"),
         r"line 7: search_space\.rank: grid cannot go with search type optuna \(a model-based search picks every "
         r"value itself\): use choice"),
        (GOOD, ("num_samples: 2", "num_samples: 2\nsearch: {type: grid}"),
         r"line 8: search_space\.lr: search type grid takes grid values only, not loguniform: use search type random"),
        (GOOD.replace("{grid: [8, 16]}", "{choice: [8, 16]}"), ("num_samples: 2", "num_samples: 2\nsearch: {type: bohb}"),
         r"line 10: search\.type: search type bohb and scheduler hyperband_bohb go together .*got search bohb, "
         r"scheduler asha"),
        (GOOD, ("num_samples: 2", "num_samples: 2\nscheduler: {type: hyperband_bohb}"),
         r"scheduler\.type: search type bohb and scheduler hyperband_bohb go together .*got search random, scheduler "
         r"hyperband_bohb"),
        (GOOD, ("num_samples: 2", "num_samples: 2\nsearch: {type: hyperopt, seed: -1}"), r"line 10: search\.seed: must be an integer >= 0"),
        (PBT, ("  rank: {choice: [8, 16]}", "  seed: {choice: [0, 1]}"),
         r"line 7: search_space\.seed: pbt changes searched options inside a run, at a subspace boundary, and seed "
         r"cannot change there \(the data order and RSO's subspaces are drawn from it\): give it in base"),
        (PBT, ("  rank: {choice: [8, 16]}", "  weight_decay: {choice: [0.0, 0.1]}"),
         r"search_space\.weight_decay: .* weight_decay cannot change there \(it cannot change inside a run\).* pbt may "
         r"search lr, target_lr_scale, rank, resample_every, eta, inner_warmup"),
        (PBT, ("scheduler: {type: pbt, perturbation_interval: 8}", "scheduler: {type: pb2, perturbation_interval: 8}"),
         r"line 7: search_space\.rank: pb2 explores inside bounds: give rank as uniform, loguniform or randint, not choice"),
        (PBT, ("  steps: 32", "  steps: 32\n  eval_every: 4"),
         r"line 5: base\.eval_every: is set by scheduler\.perturbation_interval under pbt"),
        (PBT, ("  steps: 32", "  steps: 32\n  optimizer: adamw"),
         r"base\.optimizer: pbt perturbs at RSO's subspace boundaries: the optimizer must be rso"),
        (PBT, ("num_samples: 4", "num_samples: 4\nsearch: {type: optuna}"),
         r"scheduler\.type: pbt takes its first population from search type random or grid, not optuna"),
        (PBT, ("perturbation_interval: 8", "perturbation_interval: 64"),
         r"scheduler\.perturbation_interval: 64 is more than the trials' 32 steps"),
        (PBT, ("perturbation_interval: 8", "perturbation_interval: 8, quantile_fraction: 0.7"),
         r"line 9: scheduler\.quantile_fraction: must be in \(0, 0\.5\]; got 0\.7"),
        (PBT, ("perturbation_interval: 8", "perturbation_interval: 8, grace_period: 8"),
         r"scheduler\.grace_period: not a setting of scheduler type pbt; its settings: perturbation_interval"),
    ],
)
def test_bad_search_and_scheduler_sections_name_the_key_and_line(tmp_path: Path, text: str, edit: tuple[str, str],
                                                                 message: str) -> None:
    old, new = edit
    assert old in text
    with pytest.raises(SweepError, match=message):
        load_sweep(_write(tmp_path, text.replace(old, new)))


def test_a_missing_search_library_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    # Both of bohb's libraries hidden, whatever this environment has installed.
    hidden = {"hpbandster", "ConfigSpace"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    text = GOOD.replace("{grid: [8, 16]}", "{choice: [8, 16]}").replace(
        "num_samples: 2", "num_samples: 2\nsearch: {type: bohb}\nscheduler: {type: hyperband_bohb, max_t: 24}")
    with pytest.raises(SweepError, match=r"line 10: search\.type: bohb needs hpbandster, ConfigSpace, which are not installed: "
                                         r"pip install 'rso-ray\[bohb\]'"):
        load_sweep(_write(tmp_path, text))


def test_pbt_trials_evaluate_and_checkpoint_at_each_perturbation(tmp_path: Path) -> None:
    spec = load_sweep(_write(tmp_path, PBT))
    cfg = spec.trial_config({"lr": 0.001, "rank": 8}, "t1", "sqlite:///x.db", "e")
    assert (cfg.eval_every, cfg.checkpoint_every, cfg.run_name) == (8, 8, "p-t1")
    default = load_sweep(_write(tmp_path, PBT.replace("{type: pbt, perturbation_interval: 8}", "{type: pbt}")))
    assert default.base_config().checkpoint_every == default.base_config().eval_every == 20  # llama-micro's recipe


CHOICE = GOOD.replace("{grid: [8, 16]}", "{choice: [8, 16]}")


@pytest.mark.parametrize(("text", "needs", "search_name", "scheduler_name"), [
    (GOOD, None, "BasicVariantGenerator", "AsyncHyperBandScheduler"),
    (CHOICE + "search: {type: optuna, seed: 3, n_startup_trials: 4}\n", "optuna", "OptunaSearch", "AsyncHyperBandScheduler"),
    (CHOICE + "search: {type: hyperopt, n_initial_points: 5}\n", "hyperopt", "HyperOptSearch", "AsyncHyperBandScheduler"),
    (CHOICE + "search: {type: bohb}\nscheduler: {type: hyperband_bohb}\n", "hpbandster", "TuneBOHB", "HyperBandForBOHB"),
    (PBT, None, "BasicVariantGenerator", "PopulationBasedTraining"),
    (PBT.replace("{choice: [8, 16]}", "{randint: [8, 17]}").replace("type: pbt", "type: pb2"), "sklearn",
     "BasicVariantGenerator", "PB2"),
])
def test_tune_objects_of_each_search_and_scheduler(tmp_path: Path, text: str, needs: str | None, search_name: str,
                                                   scheduler_name: str) -> None:
    """Every search and scheduler the schema allows is built (no Ray instance needed), with its settings."""
    from rso_ray.tuning.algorithms import build_scheduler, build_search

    if needs:
        pytest.importorskip(needs)  # an optional extra of rso-ray
    spec = load_sweep(_write(tmp_path, text))
    base = spec.base_config()
    assert type(build_search(spec.search, spec.metric, spec.mode, 2)).__name__ == search_name
    scheduler = build_scheduler(spec.scheduler, spec.space, steps=base.steps, eval_every=base.eval_every)
    assert type(scheduler).__name__ == scheduler_name
    if scheduler_name in ("PopulationBasedTraining", "PB2"):
        assert scheduler._perturbation_interval == 8 and scheduler._time_attr == "step"


def test_pbt_explore_stays_inside_the_space_and_keeps_integers(tmp_path: Path) -> None:
    from rso_ray.tuning.algorithms import Clamp

    spec = load_sweep(_write(tmp_path, PBT.replace("{choice: [8, 16]}", "{randint: [8, 33]}")))
    clamp = Clamp(spec.space)
    assert clamp({"lr": 0.012, "rank": 38.4}) == {"lr": 0.01, "rank": 32}  # x 1.2 past the top: the top
    assert clamp({"lr": 0.00008, "rank": 6.4}) == {"lr": 0.0001, "rank": 8}
    assert clamp({"lr": 0.003, "rank": 19.2}) == {"lr": 0.003, "rank": 19}
