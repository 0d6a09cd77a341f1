"""Sweep RSO's hyper-parameters with Ray Tune: parse the sweep file, check it, run it.

    python -m rso_ray.tune tune_spaces/smoke.yaml                 # a few minutes on a laptop CPU
    ray job submit --working-dir . -- python -m rso_ray.tune tune_spaces/rank_sweep.yaml

The sweep file (see rso_ray/tuning/spec.py for the schema) holds the base training config, the search
space, the metric and scheduler (ASHA on the eval loss by default) and the resources of a trial. The best
config is printed and written as a YAML that `python -m rso_ray.train --config` accepts.
"""

from __future__ import annotations

import argparse
import sys

from .tuning.spec import SweepError, load_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rso_ray.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML file (e.g. tune_spaces/rank_sweep.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the file and print the trials' count, then exit")
    parser.add_argument("--output", help="where to write the best config (overrides the file's output:)")
    args = parser.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
    except (SweepError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output:
        spec.output = args.output
    if args.check:
        print(f"{spec.path}: valid; {spec.trial_count()} trial(s) over {', '.join(d.key for d in spec.space)}")
        return 0
    from .tuning.runner import run_sweep

    try:
        outcomes = run_sweep(spec)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if any(o.status != "failed" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
