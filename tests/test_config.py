"""Options and the resolved RunConfig: precedence (command line over file over defaults), recipes, errors
naming the option, and the round trips through a dict and back to options."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rso_ray.config import (
    RECIPES,
    RunConfig,
    TrainOptions,
    build_parser,
    config_from_dict,
    load_config_file,
    parse_config,
    resolve,
)
from rso_ray.training.distributed import split_share


def test_defaults_are_the_offline_demo() -> None:
    cfg, _ = parse_config([])
    assert (cfg.model, cfg.optimizer, cfg.data, cfg.tokenizer) == ("llama-tiny", "rso", "embedded", "embedded")
    assert cfg.steps == RECIPES["llama-tiny"]["steps"] and cfg.method.rank == 64 and cfg.seq_len == 256
    assert cfg.method.eta == math.inf and cfg.method.projection == "coordinate"  # the small models' recipe
    assert cfg.mlflow_tracking_uri.startswith("sqlite:///") and cfg.mlflow_tracking_uri.endswith("mlflow.db")
    assert Path(cfg.storage_path).is_absolute()


def test_paper_recipe_for_llama_1b() -> None:
    cfg, _ = parse_config(["--model", "llama-1b", "--optimizer", "galore"])
    assert (cfg.steps, cfg.method.rank, cfg.global_batch_size, cfg.method.resample_every) == (100_000, 512, 512, 200)
    assert cfg.method.lr == 1e-2 and cfg.eval_tokens == 10_000_000
    m = cfg.method
    assert m.warmup_steps == 10_000 and m.min_lr_ratio == 0.1 and m.galore_update_proj_gap == 200


def test_tokens_budget_sets_steps() -> None:
    cfg, _ = parse_config(["--model", "llama-60m", "--tokens", "1.3e9"])
    assert cfg.steps == math.ceil(1.3e9 / (512 * 256)) and cfg.as_options()["tokens"] is None


def test_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("rank: 32\nlr: 0.002\nresample-every: 40\nworkers: 2\n")
    cfg, _ = parse_config(["--config", str(f), "--lr", "0.005"])
    assert cfg.method.rank == 32  # file over defaults
    assert cfg.method.lr == 0.005  # command line over file
    assert cfg.method.resample_every == 40 and cfg.workers == (2, 2)
    assert cfg.global_batch_size == RECIPES["llama-tiny"]["global_batch_size"]  # defaults where neither says


def test_unknown_key_in_file_names_key_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("rank: 32\n\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml, line 3: unknown key 'learning_rate'"):
        load_config_file(f)
    g = tmp_path / "bad2.yaml"
    g.write_text("rank: many\n")
    with pytest.raises(ValueError, match=r"bad2\.yaml, line 1: rank: expected an integer, got 'many'"):
        load_config_file(g)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "llama-3b"], r"--model: unknown model 'llama-3b'; choose one of llama-micro"),
        (["--optimizer", "lion"], "--optimizer must be one of rso, adamw, galore, apollo, apollo-mini, muon; got 'lion'"),
        (["--rank", "0"], "--rank must be a positive integer, got 0"),
        (["--rank", "-4"], "--rank must be a positive integer, got -4"),
        (["--eta", "0"], r"--eta must be > 0 \(or inf for no proximal term\), got 0.0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--elastic-check-s", "nan"], "--elastic-check-s must be a finite number > 0, got nan"),
        (["--inner-optimizer", "lion"], "--inner-optimizer: unknown inner optimizer 'lion'"),
        (["--min-lr-ratio", "2"], r"--min-lr-ratio must be in \[0, 1\], got 2.0"),
        (["--workers", "4:2"], "--workers needs 1 <= min <= max, got '4:2'"),
        (["--workers", "two"], "--workers must be a number or min:max"),
        (["--data-actors", "0"], "--data-actors needs 1 <= min <= max, got '0'"),
        (["--data-actors", "2:many"], "--data-actors must be a number or min:max"),
        (["--steps", "10", "--tokens", "100"], "give either --steps or --tokens, not both"),
        (["--projection", "sparse"], "--projection must be one of haar, gaussian, coordinate; got 'sparse'"),
        (["--precision", "fp8"], "--precision must be one of auto, fp32, bf16-mixed; got 'fp8'"),
        (["--lr", "fast"], "--lr: expected a number, got 'fast'"),
        (["--target-lr-scale", "-0.5"], "--target-lr-scale must be a positive finite number, got -0.5"),
        (["--global-batch-size", "2", "--workers", "4"], "--global-batch-size 2 is smaller than the largest number of workers 4"),
        (["--run-name", "a/b"], "--run-name must be a plain name"),
    ],
)
def test_bad_values_name_the_option(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config(argv)


def test_help_lists_every_option() -> None:
    text = build_parser().format_help()
    for name in ("--model", "--optimizer", "--rank", "--eta", "--resample-every", "--projection", "--inner-optimizer",
                 "--lr", "--steps", "--tokens", "--global-batch-size", "--micro-batch-size", "--seq-len", "--precision",
                 "--workers", "--use-gpu", "--data", "--tokenizer", "--eval-every", "--eval-tokens",
                 "--mlflow-tracking-uri", "--mlflow-experiment", "--storage-path", "--run-name", "--seed", "--max-failures"):
        assert name in text, name
    assert "--fail-at-step" not in text  # test-only options stay out of --help


@pytest.mark.parametrize(("g", "w"), [(512, 1), (512, 3), (16, 2), (7, 3), (100, 8)])
def test_split_share_keeps_the_global_batch(g: int, w: int) -> None:
    micro = 8
    shares = [split_share(g, w, r, micro) for r in range(w)]
    assert sum(sum(s) for s in shares) == g
    assert all(max(s) <= micro for s in shares)
    assert max(sum(s) for s in shares) - min(sum(s) for s in shares) <= 1
    # DDP averages W worker gradients; weights size * W / G make it the mean over the G sequences.
    assert sum(m * w / g for s in shares for m in s) == pytest.approx(w)


@pytest.mark.parametrize("argv", [[], ["--model", "llama-micro", "--rank", "8"], ["--algorithm-1"],
                                  ["--model", "llama-1b", "--optimizer", "galore", "--tokens", "1e9"],
                                  ["--workers", "2:4", "--worker-resources", '{"a": 1}', "--fault-plan", "3:1:step"]])
def test_config_round_trips_through_a_dict_and_back_to_options(argv: list[str]) -> None:
    """to_dict/from_dict (state.json, through JSON as it is stored) and as_options (MLflow's parameters, a
    sweep's best config) give the same RunConfig back."""
    cfg, _ = parse_config(argv)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert resolve(TrainOptions(**cfg.as_options())) == cfg


def test_a_checkpoint_of_flat_options_reads_as_it_was_resolved() -> None:
    """state.json of rso_ray before the RunConfig held the flat options with the recipe applied."""
    old = {"model": "llama-micro", "optimizer": "rso", "rank": 8, "resample_every": 10, "steps": 40, "lr": 3e-3,
           "global_batch_size": 8, "micro_batch_size": 8, "eval_every": 20, "eval_tokens": 8192, "checkpoint_every": 10,
           "projection": "haar", "inner_warmup": 0, "target_lr_scale": None, "run_name": "old", "storage_path": "/tmp/x",
           "mlflow_tracking_uri": "sqlite:///m.db", "workers": "1", "retired_option": 1}
    cfg = RunConfig.from_dict(old)
    assert (cfg.method.rank, cfg.method.resample_every, cfg.steps, cfg.method.lr, cfg.run_name) == (8, 10, 40, 3e-3, "old")


def test_yaml_min_max_workers_is_not_a_base60_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 2:8 as 128; a config file must mean 2 to 8 workers."""
    f = tmp_path / "run.yaml"
    f.write_text("workers: 2:8\nlr: 1e-3\nsteps: 1e3\n")
    values = load_config_file(f)
    assert values["workers"] == "2:8" and values["lr"] == 1e-3 and values["steps"] == 1000
    assert resolve(TrainOptions(**values)).workers == (2, 8)


def test_target_lr_scale_reaches_the_method() -> None:
    cfg, _ = parse_config(["--optimizer", "adamw", "--lr", "0.01", "--target-lr-scale", "0.25"])
    method = cfg.method
    assert (method.lr, method.target_scale) == (0.01, 0.25)
    galore, _ = parse_config(["--optimizer", "galore"])
    assert galore.method.target_scale == 0.25  # GaLore's scale, as in its scripts


@pytest.mark.parametrize(("optimizer", "scale"), [("rso", 0.25), ("adamw", 0.125), ("galore", 0.25)])
def test_small_model_recipes_take_the_tuned_target_lr_scale(optimizer: str, scale: float) -> None:
    cfg, _ = parse_config(["--optimizer", optimizer])
    assert (cfg.method.lr, cfg.method.target_lr_scale) == (1e-2, scale)
    paper, _ = parse_config(["--optimizer", optimizer, "--model", "llama-60m"])
    # The paper's models keep the published recipes: one lr for RSO (Algorithm 1) and AdamW, GaLore's 0.25.
    assert paper.method.target_lr_scale is None
    assert paper.method.target_scale == (0.25 if optimizer == "galore" else 1.0)
    explicit, _ = parse_config(["--optimizer", optimizer, "--target-lr-scale", "1"])
    assert explicit.method.target_scale == 1.0  # the command line wins over the recipe


def test_inner_warmup_comes_from_the_recipe_else_algorithm_1() -> None:
    tiny, _ = parse_config([])
    assert tiny.method.inner_warmup == 10
    paper, _ = parse_config(["--model", "llama-60m"])
    assert paper.method.inner_warmup == 0
    algorithm_1, _ = parse_config(["--target-lr-scale", "1", "--inner-warmup", "0"])
    method = algorithm_1.method
    assert (method.target_scale, method.inner_warmup, method.inner_state) == (1.0, 0, "reset")


def test_algorithm_1_is_one_option_away() -> None:
    tiny, _ = parse_config([])
    assert (tiny.method.target_lr_scale, tiny.method.inner_warmup, tiny.method.projection) == (0.25, 10, "coordinate")  # the recipe
    exact, _ = parse_config(["--algorithm-1"])
    method = exact.method
    assert (method.target_scale, method.inner_warmup, method.inner_state, method.projection) == (1.0, 0, "reset", "haar")
    assert method.lr == tiny.method.lr  # the recipe's lr stays: one lr for every parameter
    coordinate, _ = parse_config(["--algorithm-1", "--projection", "coordinate", "--inner-warmup", "0"])
    assert (coordinate.method.projection, coordinate.method.inner_warmup) == ("coordinate", 0)  # P stays the user's choice
    paper, _ = parse_config(["--model", "llama-60m"])
    assert (paper.method.projection, paper.method.target_scale, paper.method.inner_warmup) == ("haar", 1.0, 0)


@pytest.mark.parametrize(("argv", "message"), [
    (["--algorithm-1", "--target-lr-scale", "0.25"], "it contradicts --target-lr-scale 0.25"),
    (["--algorithm-1", "--inner-warmup", "10", "--inner-state", "keep_second"],
     "it contradicts --inner-warmup 10, --inner-state keep_second"),
    (["--algorithm-1", "--optimizer", "adamw"], "it does not apply to --optimizer adamw"),
    (["--algorithm-1", "maybe"], "--algorithm-1: expected true or false, got 'maybe'"),
])
def test_algorithm_1_rejects_what_contradicts_it(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(argv)


@pytest.mark.parametrize(("text", "message"), [
    ("rank: 32\nlr: 0.01\nrank: 64\n", r"run\.yaml, line 3: key 'rank' is given twice \(first on line 1\)"),
    ("resample-every: 10\nresample_every: 20\n", r"run\.yaml, line 2: 'resample_every' gives option resample_every a second time"),
    ("fault_plan: '3:0:step'\n", r"run\.yaml, line 1: unknown key 'fault_plan'"),
    ("nan-loss-from-step: 3\n", r"run\.yaml, line 1: unknown key 'nan-loss-from-step'"),
])
def test_config_files_refuse_repeated_keys_and_the_test_options(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config_file(f)
    assert "fault_plan" not in str(err.value).split("known keys:")[-1]  # hidden options are not offered


def test_a_json_config_file_refuses_a_repeated_key(tmp_path: Path) -> None:
    f = tmp_path / "run.json"
    f.write_text('{"rank": 32, "rank": 64}')
    with pytest.raises(ValueError, match=r"run\.json: key 'rank' is given twice"):
        load_config_file(f)


def test_a_config_file_takes_yaml_booleans_for_word_options(tmp_path: Path) -> None:
    """use_gpu: true in YAML is the boolean True; it means what --use-gpu true means."""
    f = tmp_path / "run.yaml"
    f.write_text("use_gpu: true\nactivation_checkpointing: yes\n")
    cfg, _ = parse_config(["--config", str(f)])
    assert (cfg.use_gpu, cfg.activation_checkpointing) == ("true", True)
    f.write_text("use_gpu: false\n")
    assert parse_config(["--config", str(f)])[0].use_gpu == "false"
    f.write_text("export_hf: true\n")
    with pytest.raises(ValueError, match="--export-hf must be one of none, folder, mlflow; got 'true'"):
        parse_config(["--config", str(f)])


def test_data_actors_reach_the_pipeline_and_old_configs_read_the_default() -> None:
    cfg = config_from_dict({"data_actors": "2:16"})
    assert cfg.data_actor_range() == (2, 16) and config_from_dict({"data_actors": "3"}).data_actor_range() == (3, 3)
    assert config_from_dict({}).data_actor_range() == (1, 4)
    old = {k: v for k, v in cfg.to_dict().items() if k != "data_actors"}  # a state.json written before the option
    assert RunConfig.from_dict(old).data_actor_range() == (1, 4)
