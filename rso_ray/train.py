"""Pre-train a LLaMA model with RSO on Ray Train: parse, build, run.

    python -m rso_ray.train                       # offline demo: local Ray, embedded corpus, llama-tiny
    python -m rso_ray.train --optimizer adamw --steps 300
    ray job submit --working-dir . -- python -m rso_ray.train --model llama-1b --data c4 --tokenizer t5-base --workers 8

Options are listed by --help; a --config YAML/JSON file gives defaults that the command line overrides.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from .cluster.driver import main as train_main  # torch, Ray and MLflow load here: seconds
    except KeyboardInterrupt:  # Ctrl-C while the libraries load: no traceback from inside an import
        print("\n[rso_ray] interrupted while starting: nothing was trained", file=sys.stderr)
        return 130
    return train_main(argv)


if __name__ == "__main__":
    code = main()
    from .cluster.driver import end_process

    end_process(code)  # quick: a local Ray instance this process started is stopped at once
