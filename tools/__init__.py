"""Build-time tools, outside the runtime package: the embedded corpus (``python -m tools.build_corpus``)
and its tokenizer (``python -m tools.train_tokenizer``), run from the repository root."""
