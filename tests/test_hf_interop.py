"""Hugging Face interop against transformers itself: a run exported with rso_ray.export loads in
transformers' LlamaForCausalLM and gives the logits of rso_ray's model (RSO mid-subspace and at a
boundary, AdamW, GaLore; sharded or not); --init-from loads transformers weights so that the first eval
loss is transformers' loss on the same tokens, and training goes on from there. No network: every
transformers folder is built here from a config.

Sharded (FSDP-style) checkpoints do not exist in rso_ray yet, so there is no test of exporting one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from rso_ray.config import config_from_dict, parse_config
from rso_ray.core.methods import build_method
from rso_ray.data.embedded_assets import embedded_tokenizer_dir
from rso_ray.export import export_checkpoint, main
from rso_ray.models import build_model
from rso_ray.models.hf_io import SAFE_INDEX, SAFE_WEIGHTS, load_pretrained, parse_size, plan_shards
from rso_ray.training.checkpoint import MODEL_FILE, write_checkpoint
from rso_ray.training.engine import evaluate

VOCAB = 8192  # the embedded tokenizer's
# float32 on both sides, the same maths through different kernels (transformers' attention, RMSNorm and
# rotary code vs ours; the merged W + P B vs W and B applied in the forward): equal to the last bit on
# this CPU, but summation order may differ across kernels and thread counts, so allow float32 rounding.
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def _ids(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def _trained_run(tmp: Path, optimizer: str, *, steps: int, resample_every: int = 100):
    """Train llama-micro in-process for ``steps`` and write the checkpoint a run would write."""
    cfg = config_from_dict(dict(model="llama-micro", optimizer=optimizer, steps=8, rank=16, resample_every=resample_every,
                                storage_path=str(tmp / "runs"), run_name="run"))
    model = build_model("llama-micro", vocab_size=VOCAB, seed=0)
    method = build_method(model, cfg.method)
    ids = _ids()
    for _ in range(steps):
        method.zero_grad()
        model(ids, labels=ids).loss.backward()
        method.step()
    ckpt = Path(write_checkpoint(tmp / "run" / f"checkpoint_{steps:08d}", model=model, method=method,
                                 state={"step": steps, "run": {"config": cfg.to_dict(), "mlflow_run_id": None}}))
    return model, method, ckpt


@pytest.mark.parametrize(("optimizer", "steps", "resample_every"),
                         [("rso", 3, 100), ("rso", 4, 2), ("adamw", 3, 100), ("galore", 3, 100), ("apollo", 3, 2),
                          ("apollo-mini", 3, 2), ("muon", 3, 100)],
                         ids=["rso-mid-subspace", "rso-at-boundary", "adamw", "galore", "apollo", "apollo-mini", "muon"])
def test_export_gives_the_same_logits_in_transformers(tmp_path: Path, optimizer: str, steps: int, resample_every: int) -> None:
    model, method, ckpt = _trained_run(tmp_path, optimizer, steps=steps, resample_every=resample_every)
    saved = torch.load(ckpt / MODEL_FILE, weights_only=True)
    has_b = any(k.endswith("rso_B") for k in saved)
    assert has_b == (optimizer == "rso" and not method.at_boundary)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")  # a run folder: its newest checkpoint
    hf = _hf(out)
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.dtype == torch.float32
    ids = _ids(2, 48, seed=1)
    with torch.no_grad():
        ours = model(ids).logits
        assert_close(hf(ids).logits, ours, **FP32)
        if has_b:
            # B is what the merge adds: the same model without it is measurably another model.
            bs = method.handle.b_parameters()
            assert all(b.abs().max() > 0 for b in bs)
            for b in bs:
                b.zero_()
            assert (model(ids).logits - ours).abs().max() > 1e-3
    files = {p.name for p in out.iterdir()}
    assert {"config.json", SAFE_WEIGHTS, "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files


def test_exported_tokenizer_and_generation_load_with_no_extra_code(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    _trained_run(tmp_path, "rso", steps=2)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    ref = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    tok = AutoTokenizer.from_pretrained(str(out))
    text = "The river flows past the old mill."
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and len(tok) == len(ref) == VOCAB
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["tie_word_embeddings"]) == (ref.eos_token_id, ref.pad_token_id, False)
    hf = _hf(out)
    prompt = tok(text, return_tensors="pt")
    generated = hf.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    assert json.loads((out / "rso_ray_export.json").read_text())["step"] == 2


def test_sharded_export_has_an_index_and_loads(tmp_path: Path) -> None:
    model, _, _ = _trained_run(tmp_path, "rso", steps=3)
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf", max_shard_size="1MB")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    # embed_tokens and lm_head (2 MiB each) exceed 1 MB: a shard each, the blocks (0.4 MB) in between.
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    assert not (out / SAFE_WEIGHTS).exists()
    index = json.loads((out / SAFE_INDEX).read_text())
    where = index["weight_map"]
    assert (where["model.embed_tokens.weight"], where["model.layers.1.mlp.down_proj.weight"], where["lm_head.weight"]) == tuple(shards)
    assert index["metadata"]["total_size"] == model.config.num_parameters() * 4  # the merged float32 weights
    ids = _ids(2, 16, seed=2)
    with torch.no_grad():
        assert_close(_hf(out)(ids).logits, model(ids).logits, **FP32)


def test_size_parsing_and_shard_plan() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("1.5 MB") == 1_500_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="size 'five' is not a number of bytes"):
        parse_size("five")
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]


def test_export_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run holds no complete checkpoint"):
        export_checkpoint(tmp_path / "empty_run", tmp_path / "out")
    _trained_run(tmp_path, "adamw", steps=1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="busy exists and is not empty: choose another folder or pass --overwrite"):
        export_checkpoint(tmp_path / "run", busy)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="holds the checkpoint being exported"):
        export_checkpoint(tmp_path / "run", tmp_path, overwrite=True)
    export_checkpoint(tmp_path / "run", busy, overwrite=True)
    assert not (busy / "keep.txt").exists() and (busy / SAFE_WEIGHTS).is_file()
    # The command line: the same message on one line, exit code 2.
    assert main([str(tmp_path / "empty_run"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "o").exists()
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
    assert _hf(tmp_path / "o").dtype == torch.bfloat16


def test_export_logged_to_the_runs_mlflow_run(tmp_path: Path, capsys) -> None:
    """--mlflow: the exported model becomes a transformers-flavour model of the run's MLflow run, which
    mlflow loads back with the same weights."""
    import mlflow

    from rso_ray.cluster import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "run")
    cfg = config_from_dict(dict(model="llama-micro", optimizer="adamw", steps=2, mlflow_tracking_uri=uri))
    model = build_model("llama-micro", vocab_size=VOCAB, seed=0)
    method = build_method(model, cfg.method)
    write_checkpoint(tmp_path / "run" / "checkpoint_00000000", model=model, method=method,
                     state={"step": 0, "run": {"config": cfg.to_dict(), "mlflow_run_id": run_id}})
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--mlflow"]) == 0
    model_uri = capsys.readouterr().out.strip().splitlines()[-1].split(" as ")[-1]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_run(run_id).info.experiment_id
        logged = mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                             output_format="list")
        assert [m.model_uri for m in logged] == [model_uri]
        loaded = mlflow.transformers.load_model(model_uri, return_type="components")["model"]
    finally:
        mlflow.set_tracking_uri(previous)
    ids = _ids(2, 16)
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits, **FP32)


# -- --init-from -------------------------------------------------------------------------------------

def _pretrained_folder(tmp: Path, *, hidden: int = 64, tie: bool = False, seed: int = 0) -> Path:
    """A transformers LlamaForCausalLM with llama-micro's shapes (or another width), saved with the embedded
    tokenizer: what a user's local checkpoint looks like."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=176, num_attention_heads=4,
                         num_hidden_layers=2, tie_word_embeddings=tie, eos_token_id=1, pad_token_id=0, bos_token_id=None)
    folder = tmp / f"pretrained-{hidden}-{tie}"
    LlamaForCausalLM(config).save_pretrained(str(folder))
    for f in embedded_tokenizer_dir().iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _hf_loss(folder: Path, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        return float(_hf(folder)(input_ids=blocks, labels=blocks).loss)


def test_export_of_an_hf_run_with_tied_embeddings(tmp_path: Path) -> None:
    """A run of a transformers model (--model hf:<folder>, here one that ties lm_head to the embedding),
    mid-subspace: exported with one copy of the tied matrix, it gives the logits of the trained model."""
    folder = _pretrained_folder(tmp_path, tie=True)
    cfg = config_from_dict(dict(init_from=str(folder), steps=8, rank=16, resample_every=100))
    model = load_pretrained(build_model(cfg.model, vocab_size=VOCAB, seed=0), str(folder))
    method = build_method(model, cfg.method)
    ids = _ids()
    for _ in range(3):
        method.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        method.step()
    write_checkpoint(tmp_path / "run" / "checkpoint_00000003", model=model, method=method,
                     state={"step": 3, "run": {"config": cfg.to_dict()}})
    out = export_checkpoint(tmp_path / "run", tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(str(out / SAFE_WEIGHTS), framework="pt") as fh:
        assert "lm_head.weight" not in fh.keys() and "model.embed_tokens.weight" in fh.keys()  # noqa: SIM118
    hf = _hf(out)
    assert hf.config.tie_word_embeddings and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert_close(hf(ids).logits, model(input_ids=ids).logits, **FP32)


@pytest.mark.parametrize("model_name", ["llama-micro", "hf"])
def test_init_from_gives_transformers_loss_then_trains(tmp_path: Path, model_name: str) -> None:
    folder = _pretrained_folder(tmp_path)
    name = f"hf:{folder}" if model_name == "hf" else model_name
    model = load_pretrained(build_model(name, vocab_size=VOCAB, seed=123), str(folder))
    blocks = _ids(6, 64, seed=3)
    first = evaluate(model, blocks, batch_size=4).loss
    # Same float32 maths in two implementations (see FP32), and our loss is a token-weighted mean over
    # two batches where transformers' is one mean: float32 rounding of the sums only.
    assert first == pytest.approx(_hf_loss(folder, blocks), rel=1e-5)
    cfg = config_from_dict(dict(model=name, init_from=str(folder), steps=12, rank=16, resample_every=4, lr=3e-3))
    method = build_method(model, cfg.method)
    for _ in range(12):
        method.zero_grad()
        model(blocks, labels=blocks).loss.backward()
        method.step()
    assert evaluate(model, blocks, batch_size=4).loss < first - 0.5  # it trains from the loaded weights


def test_init_from_defaults_to_the_folder_architecture_and_tokenizer(tmp_path: Path) -> None:
    cfg, _ = parse_config(["--init-from", str(tmp_path)])
    assert (cfg.model, cfg.tokenizer, cfg.init_from) == (f"hf:{tmp_path}", str(tmp_path), str(tmp_path))
    cfg, _ = parse_config(["--init-from", str(tmp_path), "--model", "llama-micro", "--tokenizer", "embedded"])
    assert (cfg.model, cfg.tokenizer) == ("llama-micro", "embedded")
    assert config_from_dict({"init_from": "org/model"}).model == "hf:org/model"  # sweeps build configs this way
    assert parse_config(["--export-hf"])[0].export_hf == "folder"
    assert parse_config(["--export-hf", "mlflow"])[0].export_hf == "mlflow"
    assert parse_config([])[0].export_hf == "none"
    with pytest.raises(ValueError, match="--export-hf must be one of none, folder, mlflow; got 'yes'"):
        parse_config(["--export-hf", "yes"])
    with pytest.raises(ValueError, match="--init-from must be a hub id or a local folder, got 's3://b/m'"):
        parse_config(["--init-from", "s3://b/m"])


def test_init_from_checked_before_ray_starts(tmp_path: Path, capsys) -> None:
    import ray

    from rso_ray.cluster.driver import main as train_main
    from rso_ray.cluster.driver import prepare

    folder = _pretrained_folder(tmp_path)
    prep = prepare(parse_config(["--init-from", str(folder), "--model", "llama-micro"])[0])
    assert prep.vocab_size == VOCAB

    def fails(argv: list[str]) -> str:
        capsys.readouterr()  # drop transformers' progress bars of the folders saved above
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and not ray.is_initialized()
        return err

    err = fails(["--init-from", str(folder), "--model", "llama-tiny"])
    assert f"--init-from {folder} does not fit --model llama-tiny: its architecture differs from the model's " \
           "(model vs folder): hidden_size 128 vs 64, intermediate_size 352 vs 176" in err
    tied = _pretrained_folder(tmp_path, tie=True)
    err = fails(["--init-from", str(tied), "--model", "llama-micro"])
    assert "rso_ray's llama-* models do not have tie_word_embeddings=True" in err
    wide = _pretrained_folder(tmp_path, hidden=128)
    err = fails(["--init-from", str(folder), "--model", f"hf:{wide}"])  # another transformers architecture
    assert "the weights do not fit the model: shapes differ (weights vs model): lm_head.weight (8192, 64) vs (8192, 128)" in err
    (folder / SAFE_WEIGHTS).unlink()
    err = fails(["--init-from", str(folder), "--model", "llama-micro"])
    assert f"--init-from {folder}: {folder} has no weights: no model.safetensors" in err
    err = fails(["--init-from", str(tmp_path / "nope")])
    assert f"--init-from {tmp_path / 'nope'}: '{tmp_path / 'nope'}' is not a folder" in err


@pytest.mark.slow
def test_init_from_end_to_end_on_ray(tmp_path: Path) -> None:
    """A Ray run from a local transformers folder (architecture and tokenizer from it): the eval loss it
    logs at step 0 is transformers' loss on the same validation blocks; then the loss falls; the final
    model is exported (--export-hf) and loads in transformers."""
    import ray
    from mlflow.tracking import MlflowClient

    from rso_ray.cluster.driver import prepare, run

    folder = _pretrained_folder(tmp_path)
    cfg = config_from_dict(dict(
        init_from=str(folder), steps=12, workers="1", global_batch_size=8, micro_batch_size=8, rank=16,
        resample_every=4, log_every=4, eval_every=12, eval_tokens=4096, seq_len=128, lr=3e-3, export_hf="folder",
        storage_path=str(tmp_path / "runs"), mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_name="run",
    ))
    assert cfg.model == f"hf:{folder}"
    prep = prepare(cfg)
    reference = _hf_loss(folder, torch.from_numpy(prep.validation).long())
    ray.init(num_cpus=2, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    try:
        summary = run(cfg, prepared=prep)
    finally:
        ray.shutdown()
    hist = sorted((m.step, m.value) for m in MlflowClient(cfg.mlflow_tracking_uri).get_metric_history(summary["mlflow_run_id"], "eval/loss"))
    assert hist[0][0] == 0
    assert hist[0][1] == pytest.approx(reference, rel=1e-5)  # float32 sums in another order (see FP32)
    assert hist[-1][0] == 12 and hist[-1][1] < hist[0][1] - 0.3
    exported = Path(summary["export"])
    assert exported == tmp_path / "runs" / "run" / "hf"
    # The exported model is the run's last checkpoint: its loss is the run's final eval loss.
    assert _hf_loss(exported, torch.from_numpy(prep.validation).long()) == pytest.approx(hist[-1][1], rel=1e-5)
