"""Benchmark of the whole default pipeline, from scratch, in a fresh copy of the project.

For each seed: every DVC stage in order, timed, with the peak resident memory of its process tree;
then the four accuracies (teacher, noise floor, synthetic-data student, real-data ceiling). Prints
the table and writes it to BENCHMARKS.md with the machine and the date.

    python benchmarks/pipeline.py                 # the default params (seed 0)
    python benchmarks/pipeline.py --seeds 0 1 2
"""

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

from harness import fresh_copy, machine, run_stages, write_section  # also puts the project on sys.path

from pipeline.flow import STAGES


def run_seed(seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as scratch:
        root = fresh_copy(Path(scratch), seed)
        stages = run_stages(root, STAGES, f"seed {seed}")
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
    lines += ["", "| stage | " + " | ".join(f"seed {r['seed']} s (peak MiB)" for r in results) + " |",
              "|---|" + "---:|" * len(results)]
    for stage in STAGES:
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
