"""Where a training job's time goes outside its training steps: the default run (`python -m rso_ray.train`,
a local Ray instance, llama-tiny, the embedded corpus) launched as a user would, each line of its output
timestamped as it arrives, cut into phases by the lines every version of rso_ray prints.

    python benchmarks/job_timeline.py --out benchmarks/results/job_timeline_cpu
    python benchmarks/job_timeline.py --checkout before=/tmp/rso-before --checkout after=. --runs 2 --out ...

Each ``--checkout NAME=PATH`` is a copy of the repository whose rso_ray runs (PYTHONPATH); several are run in
turn, ``--runs`` times each, alternating, so that a busy machine slows them alike (the figures are read
side by side). Phases, from the launch of the process:

- start to the Ray start line ("starting a local Ray instance", where printed): imports and the checks of
  options and data before Ray starts (tokenizer, model on the meta device, validation set);
- to the run line ("[rso_ray] run NAME: ..."): Ray's start and the MLflow run;
- to the worker's first line ("starting: MODEL / METHOD, ..."): the worker group, the model, the method,
  a restored checkpoint, the data pipeline;
- to "step 1/": the first batch and the first step;
- the steps: the run's summed step times (its outcome file's ``wall_time``; the summary's "training time"
  is the same sum rounded to whole seconds);
- evaluation, checkpoints and logging: the rest of the time from "step 1/" to "done:";
- to the process's exit: the summary, MLflow, Ray's shutdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKERS = {
    "ray_start": re.compile(r"\[rso_ray\] (starting a local Ray instance|connecting to )"),
    "run_line": re.compile(r"\[rso_ray\] run \S+: "),
    "worker_start": re.compile(r"\[rso_ray\] starting: "),
    "first_step": re.compile(r"\[rso_ray\] step 1/"),
    "done": re.compile(r"\[rso_ray\] done: "),
}
TRAINING_TIME = re.compile(r"training time\s+(\S+)")
PHASES = ("before Ray (imports, checks)", "Ray start and MLflow run", "worker group, model, data pipeline",
          "first batch and step", "training steps", "evaluation, checkpoints, logging", "summary and shutdown")


def seconds(text: str) -> float:
    """'1m30s' / '53s' / '2.5s' (rso_ray.console.human_duration) in seconds."""
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)([hms])", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def launch(checkout: Path, extra: list[str]) -> tuple[dict[str, float], list[tuple[float, str]], float]:
    """One run of the default job in a fresh folder: (marker -> seconds after launch, timed lines, job time)."""
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), PYTHONUNBUFFERED="1", RAY_ADDRESS="")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a warm machine has rso_ray's bytecode cached, as a user's would
    with tempfile.TemporaryDirectory(prefix="rso-timeline-") as work:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "rso_ray.train", *extra], cwd=work, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip()))
        code = proc.wait()
        job = time.perf_counter() - t0
        outcomes = list(Path(work).rglob("rso_outcome.json"))  # the summed step times, unrounded
        exact = json.loads(outcomes[0].read_text()).get("wall_time") if len(outcomes) == 1 else None
    if code != 0:
        raise RuntimeError(f"the job failed ({code}): " + "\n".join(text for _, text in lines[-20:]))
    found = {}
    for name, pattern in MARKERS.items():
        found[name] = next((t for t, text in lines if pattern.search(text)), float("nan"))
    # The summary rounds "training time" to whole seconds; the run's outcome file has it exactly.
    train = exact if exact is not None else next(
        (seconds(m.group(1)) for _, text in lines if (m := TRAINING_TIME.search(text))), float("nan"))
    found["training_time"] = train
    return found, lines, job


def phases(marks: dict[str, float], job: float) -> list[float]:
    """The seven phases' seconds (the Ray start line is missing from older versions: its phase is then 0)."""
    ray_start = marks["ray_start"] if marks["ray_start"] == marks["ray_start"] else marks["run_line"]
    between = marks["done"] - marks["first_step"]
    return [ray_start, marks["run_line"] - ray_start, marks["worker_start"] - marks["run_line"],
            marks["first_step"] - marks["worker_start"], marks["training_time"],
            between - marks["training_time"], job - marks["done"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH",
                        help="a copy of the repository to time (default: this one, as 'this')")
    parser.add_argument("--runs", type=int, default=1, help="runs per checkout, alternating (default 1)")
    parser.add_argument("--out", required=True, help="path prefix of the .json and .md written")
    parser.add_argument("train_args", nargs="*", help="options for rso_ray.train after --, e.g. -- --steps 50")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    checkouts = [tuple(c.split("=", 1)) for c in args.checkout] or [("this", str(Path(__file__).resolve().parents[1]))]
    for name, path in checkouts:
        if not (Path(path) / "rso_ray" / "train.py").is_file():
            parser.error(f"--checkout {name}={path}: no rso_ray/train.py there")
    results: dict[str, list[dict]] = {name: [] for name, _ in checkouts}
    for i in range(args.runs):
        for name, path in checkouts:
            marks, _lines, job = launch(Path(path), args.train_args)
            row = {"job_s": job, "marks": marks, "phases": dict(zip(PHASES, phases(marks, job), strict=True))}
            results[name].append(row)
            print(f"[timeline] {name} run {i + 1}/{args.runs}: job {job:.1f} s, first step at {marks['first_step']:.1f} s, "
                  f"training {marks['training_time']:.1f} s", flush=True)
    write(Path(args.out), results, args.train_args)
    return 0


def write(out: Path, results: dict[str, list[dict]], train_args: list[str]) -> None:
    """out.json (every run) and out.md (median of each phase per checkout, side by side)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()} CPU threads, load average {os.getloadavg()[0]:.1f} at the end"
    out.with_suffix(".json").write_text(json.dumps({"train_args": train_args, "machine": machine, "runs": results}, indent=1))
    names = list(results)
    rows = [f"| phase | {' | '.join(names)} |", "| --- |" + " --- |" * len(names)]
    for phase in PHASES:
        rows.append(f"| {phase} | " + " | ".join(f"{statistics.median(r['phases'][phase] for r in results[n]):.1f} s"
                                                  for n in names) + " |")
    for label, key in (("first step, from launch", "first_step"),):
        rows.append(f"| **{label}** | " + " | ".join(f"**{statistics.median(r['marks'][key] for r in results[n]):.1f} s**"
                                                       for n in names) + " |")
    rows.append("| **job time** | " + " | ".join(f"**{statistics.median(r['job_s'] for r in results[n]):.1f} s**"
                                               for n in names) + " |")
    rows.append("| **job time minus training steps** | " + " | ".join(
        f"**{statistics.median(r['job_s'] - r['marks']['training_time'] for r in results[n]):.1f} s**" for n in names) + " |")
    text = (f"# Where the default job's time goes\n\n`python benchmarks/job_timeline.py {' '.join(sys.argv[1:])}`\n\n"
            f"Machine: {machine}; medians of {len(next(iter(results.values())))} run(s) per column, the columns "
            "alternated.\n\n" + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
