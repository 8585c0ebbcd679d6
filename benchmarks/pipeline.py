"""Benchmark of the whole default pipeline, from scratch, in a fresh copy of the project.

For each seed: every DVC stage in order, timed, with the peak resident memory of its process tree;
then the four accuracies (teacher, noise floor, synthetic-data student, real-data ceiling). Prints
the table and writes it to BENCHMARKS.md with the machine and the date.

    python benchmarks/pipeline.py                 # the default params (seed 0)
    python benchmarks/pipeline.py --seeds 0 1 2
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.report import machine, write_section  # noqa: E402
from pipeline.flow import STAGES, apply_overrides  # noqa: E402

BIN = Path(sys.executable).parent

# Run by a child process: one stage through DVC, then the peak RSS (KiB) of everything it ran.
MEASURE = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


GIT_IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench",
                "GIT_COMMITTER_EMAIL": "b@b"}


def fresh_copy(destination: Path, seed: int) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT, capture_output=True, text=True, check=True,
    ).stdout.split()
    for name in files:
        if (PROJECT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT / name, destination / name)
    apply_overrides({"seed": seed}, destination / "params.yaml")
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark"]):
        subprocess.run(command, cwd=destination, check=True, env={**os.environ, **GIT_IDENTITY})
    return destination


def run_stage(root: Path, stage: str, label: str, force: bool = False) -> dict:
    """One DVC stage in its own process (`dvc repro --single-item`, with `force` even if it is up to
    date): wall seconds and peak RSS."""
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(BIN / "dvc"), "repro", "--single-item", *(["--force"] if force else []), stage],
        cwd=root, env=environment, capture_output=True, text=True,
    )
    if done.returncode:
        raise SystemExit(f"{label}: stage {stage} failed\n{done.stdout}\n{done.stderr}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    measured = {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_kib / 1024}
    print(f"  {label} {stage:15s} {measured['seconds']:7.1f} s {measured['peak_rss_mib']:7.0f} MiB", flush=True)
    return measured


def run_seed(seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as scratch:
        root = fresh_copy(Path(scratch), seed)
        stages = {stage: run_stage(root, stage, f"seed {seed}") for stage in STAGES}
        metrics = json.loads((root / "metrics.json").read_text())
    return {"seed": seed, "stages": stages, "metrics": metrics}


def table(results: list[dict]) -> str:
    lines = [
        "| seed | teacher | floor (noise) | DAFL student | ceiling (real) | DAFL gap to teacher | DAFL above floor "
        "| synthesis s | distillation s | whole pipeline s | peak RSS of any stage |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        m, s = result["metrics"], result["stages"]
        lines.append(
            f"| {result['seed']} | {m['teacher']['accuracy']:.2%} | {m['baseline_noise']['accuracy']:.2%} "
            f"| {m['student']['accuracy']:.2%} | {m['baseline_real']['accuracy']:.2%} "
            f"| {m['student']['gap_to_teacher'] * 100:.2f} pt | {m['student_above_noise'] * 100:.2f} pt "
            f"| {s['synthesize']['seconds']:.0f} | {s['distill']['seconds']:.0f} "
            f"| {sum(v['seconds'] for v in s.values()):.0f} | {max(v['peak_rss_mib'] for v in s.values()):.0f} MiB |"
        )
    return "\n".join(lines + ["", stage_table(results)])


def stage_table(results: list[dict]) -> str:
    """Each stage's wall seconds and peak memory, a column per seed."""
    lines = ["| stage | " + " | ".join(f"seed {r['seed']} s (peak MiB)" for r in results) + " |",
             "|---|" + "---:|" * len(results)]
    for stage in results[0]["stages"]:
        cells = " | ".join(
            f"{r['stages'][stage]['seconds']:.1f} ({r['stages'][stage]['peak_rss_mib']:.0f})" for r in results
        )
        lines.append(f"| {stage} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results = [run_seed(seed) for seed in args.seeds]
    body = "\n".join([
        "## Whole default pipeline (`benchmarks/pipeline.py`)",
        "",
        f"{date.today().isoformat()} on {machine()}. Every stage from scratch (`dvc repro --single-item`, one",
        "process per stage) with the default `params.yaml`; accuracies on the real 1,000-image test split.",
        "Wall time includes process start and MLflow logging; peak RSS covers the DVC process and its stage.",
        "",
        table(results),
    ])
    print("\n" + body)
    write_section("pipeline", body)


if __name__ == "__main__":
    main()
