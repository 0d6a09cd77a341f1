"""Tokenizers: the embedded one (offline, shipped in the package) or any Hugging Face tokenizer by hub id
("t5-base", the papers' choice) or local folder, with errors that say what to do when offline.

    python -c "from rso_ray.data.tokenizer import load_tokenizer; t = load_tokenizer('embedded'); print(len(t), t('The river')['input_ids'])"
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"


def resolve_tokenizer_path(spec: str) -> str:
    """The folder or hub id behind ``spec`` ("embedded", a local folder, or a hub id)."""
    if spec == EMBEDDED:
        from .embedded_assets import embedded_tokenizer_dir

        return str(embedded_tokenizer_dir())
    return spec


def load_tokenizer(spec: str) -> Any:
    """A transformers tokenizer. Raises ValueError naming ``spec`` when it cannot be loaded (offline and
    not in the local cache, a folder without tokenizer files, ...)."""
    from transformers import AutoTokenizer

    path = resolve_tokenizer_path(spec)
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        tok = AutoTokenizer.from_pretrained(str(local) if looks_local else path, local_files_only=offline or looks_local)
    except (OSError, ValueError, TypeError) as err:
        if looks_local and not local.exists():
            hint = "the folder does not exist"
        elif looks_local:
            hint = "the folder has no tokenizer files (tokenizer.json or a sentencepiece model)"
        elif offline:
            hint = "HF_HUB_OFFLINE is set and it is not in the local cache: download it once, or pass a local folder"
        else:
            hint = "it is not a hub id that can be reached from here: pass a local folder, or use 'embedded'"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"cannot load tokenizer {spec!r}: {hint} ({type(err).__name__}: {first_line})") from None
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no end-of-sequence token, which packing needs between documents")
    return tok


class EmbeddedEncoder:
    """The embedded tokenizer's encoding through the tokenizers library alone. transformers'
    PreTrainedTokenizerFast (what AutoTokenizer loads for it) encodes with the same Rust tokenizer and its
    post-processor; loading it imports transformers and torch, which cost a tokenizer actor ~2 s before its
    first block and the driver ~1 s (benchmarks/results/job_timeline_cpu.md). Same ids, ends and length as
    AutoTokenizer's over the whole embedded corpus: tests/test_data_pipeline.py. Packing needs no more."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.name_or_path = str(folder)
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_truncation()  # as transformers sets it for a call without truncation or padding
        self._tok.no_padding()
        special = json.loads((folder / "tokenizer_config.json").read_text())
        self.eos_token_id = self._tok.token_to_id(special["eos_token"])
        self.unk_token_id = self._tok.token_to_id(special["unk_token"])

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(texts, str):
            return {"input_ids": self._tok.encode(texts, add_special_tokens=add_special_tokens).ids}
        return {"input_ids": [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]}


def load_encoder(spec: str) -> Any:
    """What packing needs of a tokenizer (call, eos/unk ids, length): :class:`EmbeddedEncoder` for the
    embedded one, else :func:`load_tokenizer`'s. Export and anything that saves a tokenizer use the latter."""
    if spec == EMBEDDED:
        return EmbeddedEncoder(Path(resolve_tokenizer_path(spec)))
    return load_tokenizer(spec)


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What identifies a tokenizer in logs and checkpoints."""
    return {"name": getattr(tok, "name_or_path", "?"), "vocab": len(tok), "eos": tok.eos_token_id}
