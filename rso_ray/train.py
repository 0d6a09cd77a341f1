"""Pre-train a LLaMA model with RSO on Ray Train: parse, build, run.

    python -m rso_ray.train                       # offline demo: local Ray, embedded corpus, llama-tiny
    python -m rso_ray.train --optimizer adamw --steps 300
    ray job submit --working-dir . -- python -m rso_ray.train --model llama-1b --data c4 --tokenizer t5-base --workers 8

Options are listed by --help; a --config YAML/JSON file gives defaults that the command line overrides.
"""

from __future__ import annotations

from .cluster.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
