"""TrainConfig: precedence (command line over file over defaults), recipes, and errors naming the option."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from rso_ray.config import RECIPES, TrainConfig, build_parser, load_config_file, parse_config
from rso_ray.training.worker import split_share


def test_defaults_are_the_offline_demo() -> None:
    cfg, _ = parse_config([])
    assert (cfg.model, cfg.optimizer, cfg.data, cfg.tokenizer) == ("llama-tiny", "rso", "embedded", "embedded")
    assert cfg.steps == RECIPES["llama-tiny"]["steps"] and cfg.rank == 64 and cfg.seq_len == 256
    assert cfg.eta == math.inf and cfg.projection == "coordinate"  # the small models' recipe
    assert cfg.mlflow_tracking_uri.startswith("sqlite:///") and cfg.mlflow_tracking_uri.endswith("mlflow.db")
    assert Path(cfg.storage_path).is_absolute()


def test_paper_recipe_for_llama_1b() -> None:
    cfg, _ = parse_config(["--model", "llama-1b", "--optimizer", "galore"])
    assert (cfg.steps, cfg.rank, cfg.global_batch_size, cfg.resample_every) == (100_000, 512, 512, 200)
    assert cfg.lr == 1e-2 and cfg.eval_tokens == 10_000_000
    m = cfg.method_config()
    assert m.warmup_steps == 10_000 and m.min_lr_ratio == 0.1 and m.galore_update_proj_gap == 200


def test_tokens_budget_sets_steps() -> None:
    cfg, _ = parse_config(["--model", "llama-60m", "--tokens", "1.3e9"])
    assert cfg.steps == math.ceil(1.3e9 / (512 * 256)) and cfg.tokens is None


def test_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("rank: 32\nlr: 0.002\nresample-every: 40\nworkers: 2\n")
    cfg, _ = parse_config(["--config", str(f), "--lr", "0.005"])
    assert cfg.rank == 32  # file over defaults
    assert cfg.lr == 0.005  # command line over file
    assert cfg.resample_every == 40 and cfg.workers == "2"
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
        (["--eta", "0"], r"--eta must be > 0 \(inf disables the proximal term\), got 0.0"),
        (["--workers", "4:2"], "--workers needs 1 <= min <= max, got '4:2'"),
        (["--workers", "two"], "--workers must be a number or min:max"),
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


def test_config_round_trips_through_a_dict() -> None:
    cfg, _ = parse_config(["--model", "llama-micro", "--rank", "8"])
    again = TrainConfig(**cfg.to_dict())
    assert again == cfg


def test_yaml_min_max_workers_is_not_a_base60_number(tmp_path: Path) -> None:
    """YAML 1.1 reads 2:8 as 128; a config file must mean 2 to 8 workers."""
    f = tmp_path / "run.yaml"
    f.write_text("workers: 2:8\nlr: 1e-3\nsteps: 1e3\n")
    values = load_config_file(f)
    assert values["workers"] == "2:8" and values["lr"] == 1e-3 and values["steps"] == 1000
    assert TrainConfig(**values).worker_range() == (2, 8)


def test_target_lr_scale_reaches_the_method() -> None:
    cfg, _ = parse_config(["--optimizer", "adamw", "--lr", "0.01", "--target-lr-scale", "0.25"])
    method = cfg.method_config()
    assert (method.lr, method.target_scale) == (0.01, 0.25)
    galore, _ = parse_config(["--optimizer", "galore"])
    assert galore.method_config().target_scale == 0.25  # GaLore's scale, as in its scripts


@pytest.mark.parametrize(("optimizer", "scale"), [("rso", 0.25), ("adamw", 0.125), ("galore", 0.25)])
def test_small_model_recipes_take_the_tuned_target_lr_scale(optimizer: str, scale: float) -> None:
    cfg, _ = parse_config(["--optimizer", optimizer])
    assert (cfg.lr, cfg.target_lr_scale) == (1e-2, scale)
    paper, _ = parse_config(["--optimizer", optimizer, "--model", "llama-60m"])
    # The paper's models keep the published recipes: one lr for RSO (Algorithm 1) and AdamW, GaLore's 0.25.
    assert paper.target_lr_scale is None
    assert paper.method_config().target_scale == (0.25 if optimizer == "galore" else 1.0)
    explicit, _ = parse_config(["--optimizer", optimizer, "--target-lr-scale", "1"])
    assert explicit.method_config().target_scale == 1.0  # the command line wins over the recipe


def test_inner_warmup_comes_from_the_recipe_else_algorithm_1() -> None:
    tiny, _ = parse_config([])
    assert tiny.method_config().inner_warmup == 10
    paper, _ = parse_config(["--model", "llama-60m"])
    assert paper.method_config().inner_warmup == 0
    algorithm_1, _ = parse_config(["--target-lr-scale", "1", "--inner-warmup", "0"])
    method = algorithm_1.method_config()
    assert (method.target_scale, method.inner_warmup, method.inner_state) == (1.0, 0, "reset")


def test_algorithm_1_is_one_option_away() -> None:
    tiny, _ = parse_config([])
    assert (tiny.target_lr_scale, tiny.inner_warmup, tiny.projection) == (0.25, 10, "coordinate")  # the recipe
    exact, _ = parse_config(["--algorithm-1"])
    method = exact.method_config()
    assert (method.target_scale, method.inner_warmup, method.inner_state, method.projection) == (1.0, 0, "reset", "haar")
    assert method.lr == tiny.lr  # the recipe's lr stays: one lr for every parameter
    coordinate, _ = parse_config(["--algorithm-1", "--projection", "coordinate", "--inner-warmup", "0"])
    assert (coordinate.projection, coordinate.inner_warmup) == ("coordinate", 0)  # P stays the user's choice
    paper, _ = parse_config(["--model", "llama-60m"])
    assert (paper.projection, paper.method_config().target_scale, paper.inner_warmup) == ("haar", 1.0, 0)


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
