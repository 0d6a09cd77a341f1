"""Export a training run as a Hugging Face transformers model: the run's newest complete checkpoint (or the
checkpoint folder given), RSO's current subspace merged into the weights (X <- X + P B; B is in the
checkpoint mid-subspace, absent at a subspace boundary), written as config.json, model.safetensors
(sharded with an index above --max-shard-size), generation_config.json and the run's tokenizer.

    python -m rso_ray.export rso_runs/<run name> --out my-llama
    python -c "from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; t = T.from_pretrained('my-llama'); print(t.decode(M.from_pretrained('my-llama').generate(**t('The river', add_special_tokens=False, return_tensors='pt'), max_new_tokens=8)[0]))"

The model is rebuilt from the config in the checkpoint's state.json, so an ``hf:<folder>`` run needs that
folder's config.json still in place. Nothing is downloaded for the llama-* models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .models.hf_io import DEFAULT_MAX_SHARD, parse_size, save_hf_folder
from .training.checkpoint import (
    CHECKPOINT_NAME,
    COMPLETE_FILE,
    STATE_FILE,
    TRAIN_STATE_FILE,
    checkpoints,
    is_complete,
    read_model_weights,
    read_state,
    verify,
)
from .training.progress import RunRecord
from .training.sharded_state import load_whole_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVENANCE = "rso_ray_export.json"  # which checkpoint the folder came from; transformers ignores it


def find_checkpoint(path: str | os.PathLike[str], say: Callable[[str], None] = print) -> Path:
    """``path`` itself when it is a checkpoint folder (complete and intact, else an error), or the newest
    intact checkpoint of a run folder: damaged ones (bytes unlike their checksums) are reported and skipped."""
    p = Path(path)
    if (p / COMPLETE_FILE).is_file() or (p / STATE_FILE).is_file() or CHECKPOINT_NAME.match(p.name):
        if not is_complete(p):
            raise FileNotFoundError(f"{p} is not a complete checkpoint: {COMPLETE_FILE} is missing or does not match its files")
        damaged = verify(p)
        if damaged:
            raise ValueError(f"checkpoint {p} is damaged: {', '.join(damaged)} differ(s) from the checksums in its "
                             f"{COMPLETE_FILE}; export the run folder {p.parent} to use its newest intact checkpoint")
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is neither a run folder nor a checkpoint folder: it does not exist")
    complete = [Path(c) for _, c in reversed(checkpoints(p)) if is_complete(c)]
    if not complete:
        raise FileNotFoundError(f"{p} holds no complete checkpoint (no checkpoint_*/{COMPLETE_FILE} matching its files)")
    for candidate in complete:
        damaged = verify(candidate)
        if not damaged:
            return candidate
        say(f"checkpoint {candidate.name} is damaged ({', '.join(damaged)} differ(s) from its checksums): skipped")
    raise ValueError(f"every complete checkpoint of {p} is damaged: nothing to export")


def run_config(state: dict[str, Any]) -> RunConfig:
    """The training config stored in a checkpoint's state.json."""
    config = RunRecord.from_state(state).config
    if config is None:
        raise ValueError("the checkpoint's state.json holds no run config: it was not written by a training run")
    return RunConfig.from_dict(config)


def load_merged_model(checkpoint: str | os.PathLike[str], *, check: bool = True) -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """The model of a checkpoint as a plain model: weights loaded into the run's model and method, then the
    method's export (RSO merges its current subspace, W + P B, and unloads its layers). Returns it with the
    run's config and the checkpoint's state.json. ``check``: verify the checksums first (skipped when the
    caller just did)."""
    from .core.methods import build_method
    from .models import build_model

    d = Path(checkpoint)
    state = read_state(d)
    damaged = verify(d) if check else []
    if damaged:
        raise ValueError(f"checkpoint {d} is damaged: {', '.join(damaged)} differ(s) from the checksums in its {COMPLETE_FILE}")
    cfg = run_config(state)
    weights = read_model_weights(d, state)  # model.pt, or the shards of an FSDP run
    vocab = next((v.shape[0] for k, v in weights.items() if k.endswith("embed_tokens.weight")), None)
    model = build_model(cfg.model, vocab_size=vocab, seed=cfg.seed)
    method = build_method(model, cfg.method)  # the layers the weights were saved from (RSO's B and base_layer)
    misfit = load_whole_weights(model, method, weights, at_boundary=bool(state.get("at_boundary")))
    if misfit:
        raise ValueError(f"checkpoint {d} does not fit model {cfg.model}: {', '.join(misfit[:5])}")
    train_state = torch.load(d / TRAIN_STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    method.load_counters(train_state["method"])  # RSO: the subspace (P) its B lives in is drawn again
    return method.export_model().eval(), cfg, state


def _check_out(out: Path, checkpoint: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty: choose another folder or pass --overwrite")
    if checkpoint.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {out} holds the checkpoint being exported ({checkpoint}): choose another folder")


def export_checkpoint(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write the model of ``source`` (a run folder or a checkpoint) to ``out`` as a transformers folder.
    The folder is written next to ``out`` and renamed into place: ``out`` is never left half-written."""
    from .data.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    parse_size(max_shard_size)  # fail before the work
    ckpt = find_checkpoint(source)
    target = Path(out)
    _check_out(target, ckpt, overwrite)
    model, cfg, state = load_merged_model(ckpt, check=False)  # find_checkpoint verified it
    tokenizer = load_tokenizer(cfg.tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_hf_folder(model, tmp, tokenizer=tokenizer, max_shard_size=max_shard_size, dtype=DTYPES[dtype])
        provenance = {"checkpoint": str(ckpt.resolve()), "step": state.get("step"), "method": state.get("method"),
                      "model": cfg.model, "run_name": cfg.run_name, "mlflow_run_id": RunRecord.from_state(state).mlflow_run_id}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def log_to_mlflow(folder: str | os.PathLike[str], tracking_uri: str, run_id: str) -> str:
    """Log an exported folder to an MLflow run as a model of mlflow's transformers flavour (shown beside
    the run's metrics in the UI). Loads the model once in this process. Returns the model URI."""
    import mlflow
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    # Explicit requirements: mlflow's inference imports every optional vision/audio package it knows.
    reqs = [f"transformers=={transformers.__version__}", f"torch=={torch.__version__.split('+')[0]}"]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer}, name="hf_model",
                task="text-generation", pip_requirements=reqs,
            )
    finally:
        mlflow.set_tracking_uri(previous)
    return str(info.model_uri)


def export_run(cfg: RunConfig, checkpoint: Any, run_id: str) -> str:
    """--export-hf: the final checkpoint (its folder, local or on storage) to <storage path>/<run name>/hf,
    replacing an earlier export of the same run; 'mlflow' also logs it to the run. Returns where it went."""
    from .training.checkpoint import local_copy
    from .training.storage import run_dir

    dest = f"{run_dir(cfg.storage_path, cfg.run_name)}/hf"
    with local_copy(checkpoint) as ckpt, tempfile.TemporaryDirectory(prefix="rso-export-") as tmp:
        local = Path(tmp) / "hf" if "://" in dest else Path(dest)
        export_checkpoint(ckpt, local, overwrite=True)
        if "://" in dest:  # shared storage: upload the finished folder
            from pyarrow import fs as pafs

            pafs.copy_files(str(local), dest)
        if cfg.export_hf == "mlflow":
            uri = log_to_mlflow(local, cfg.mlflow_tracking_uri, run_id)
            print(f"[rso_ray] logged the model to MLflow run {run_id} as {uri}", flush=True)
    print(f"[rso_ray] exported the final model as a transformers folder: {dest}", flush=True)
    return dest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rso_ray.export",
        description="Write a run's model as a Hugging Face transformers folder (AutoModelForCausalLM.from_pretrained "
        "loads it), with RSO's current subspace merged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("source", help="run folder (its newest complete checkpoint is used) or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write (must be empty or absent unless --overwrite)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                        help="largest safetensors file; bigger models are sharded with an index (5GB, 500MB, 2GiB)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    parser.add_argument("--mlflow", action="store_true",
                        help="also log the model to the run's MLflow run (transformers flavour)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.source, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    made = json.loads((out / PROVENANCE).read_text())
    print(f"exported {out} from {made['checkpoint']} (step {made['step']}): "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if args.mlflow:
        state = read_state(find_checkpoint(args.source))
        run_id = RunRecord.from_state(state).mlflow_run_id
        if run_id is None:
            raise ValueError("the checkpoint names no MLflow run to log to")
        uri = log_to_mlflow(out, run_config(state).mlflow_tracking_uri, run_id)
        print(f"logged to MLflow run {run_id} as {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
