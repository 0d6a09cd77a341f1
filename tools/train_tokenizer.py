"""Train the byte-level BPE tokenizer shipped with the embedded corpus.

Run through the corpus build (``python -m tools.build_corpus ... --train-tokenizer``) or directly::

    python -m tools.train_tokenizer --out /tmp/tokenizer /tmp/corpus/c4-train.*.json.gz

Special tokens mirror T5's ids (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2) and, as T5's tokenizer does,
every encoded text gets ``</s>`` appended, so data pipelines written for ``t5-base`` work unchanged.
Byte-level BPE needs no normaliser, so decoding reproduces the input exactly.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # ids 0, 1, 2 as in T5
DEFAULT_VOCAB_SIZE = 8192


def iter_texts(paths: Sequence[Path]) -> Iterator[str]:
    """The ``text`` field of every record in C4-format ``.json.gz`` shards, in file order."""
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def train_tokenizer(train_files: Sequence[Path], out_dir: Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train on ``train_files`` and save with ``PreTrainedTokenizerFast.save_pretrained`` into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False keeps encode/decode an exact round trip (no invented leading space).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is representable: <unk> never used
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(train_files), trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, eos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        # Recorded explicitly: transformers 5 rebuilds the post-processor from these flags when they are set,
        # and older versions keep the TemplateProcessing stored in tokenizer.json; both then append </s>.
        add_bos_token=False,
        add_eos_token=True,
        clean_up_tokenization_spaces=False,  # would rewrite " ." -> "." and break the exact round trip
        model_max_length=1_000_000,  # documents are long; sequence length is the data pipeline's business
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    _make_loadable_by_older_transformers(out_dir)
    return out_dir


def _make_loadable_by_older_transformers(out_dir: Path) -> None:
    """Name the generic fast class and write special_tokens_map.json, which transformers 5 no longer does.

    transformers 5 records ``tokenizer_class: "TokenizersBackend"``, a name 4.x does not know; the project
    supports ``transformers>=4.45``, and 5.x still resolves ``PreTrainedTokenizerFast`` (its alias).
    """
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special_map = out_dir / "special_tokens_map.json"
    if not special_map.exists():
        tokens = {"eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
        special_map.write_text(json.dumps(tokens, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on C4-format shards.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("shards", type=Path, nargs="+")
    args = parser.parse_args(argv)
    print(f"tokenizer saved to {train_tokenizer(sorted(args.shards), args.out, args.vocab_size)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
