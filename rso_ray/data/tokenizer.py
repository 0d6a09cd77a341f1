"""Tokenizers: the embedded one (offline, shipped in the package) or any Hugging Face tokenizer by hub id
("t5-base", the papers' choice) or local folder, with errors that say what to do when offline.

    python -c "from rso_ray.data.tokenizer import load_tokenizer; t = load_tokenizer('embedded'); print(len(t), t('The river')['input_ids'])"
"""

from __future__ import annotations

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


def tokenizer_fingerprint(tok: Any) -> dict[str, Any]:
    """What identifies a tokenizer in logs and checkpoints."""
    return {"name": getattr(tok, "name_or_path", "?"), "vocab": len(tok), "eos": tok.eos_token_id}
