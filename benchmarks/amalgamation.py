"""Benchmark of the amalgamation pipeline (DFKA), from scratch, in a fresh copy of the project.

For each seed: every stage of `amalgamation/dvc.yaml` in order (with the main pipeline's prepare and
teacher stages it reuses), timed, with peak resident memory; then, on the real 10-class test split,
each teacher on its own classes, the naive combination of the teachers, the end-to-end ablation,
the group-stack student and the single 10-class reference teacher. Prints the table and writes it
to BENCHMARKS.md with the machine and the date.

    python benchmarks/amalgamation.py                 # the default params (seed 0)
    python benchmarks/amalgamation.py --seeds 0 1 2
"""

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.pipeline import fresh_copy, run_stage, stage_table  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from pipeline.flow import AMALGAMATION_STAGES  # noqa: E402

# (metrics key, column) of the models evaluated on all ten classes
MODELS = [
    ("naive_combination", "naive combination"),
    ("teachers_raw_label_union", "teachers' label union, raw logits"),
    ("teachers_label_union", "teachers' label union, offset logits (what the student imitates)"),
    ("student_end_to_end", "ablation: end to end only"),
    ("student", "group-stack student"),
    ("reference", "reference: one 10-class teacher"),
]


def run_seed(seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="dfkd-amalgamation-bench-") as scratch:
        root = fresh_copy(Path(scratch), seed)
        stages = {stage.rpartition(":")[2]: run_stage(root, stage, f"seed {seed}") for stage in AMALGAMATION_STAGES}
        metrics = json.loads((root / "amalgamation" / "metrics.json").read_text())
    return {"seed": seed, "stages": stages, "metrics": metrics}


def table(results: list[dict]) -> str:
    teachers = list(results[0]["metrics"]["teachers"])
    lines = [
        "| seed | " + " | ".join(f"teacher '{name}' on its classes" for name in teachers) + " | "
        + " | ".join(label for _, label in MODELS) + " | group-stack vs naive | group-stack vs ablation "
        "| amalgamation pipeline s |",
        "|---:|" + "---:|" * (len(teachers) + len(MODELS) + 3),
    ]
    for result in results:
        m = result["metrics"]
        cells = [f"{m['teachers'][name]['own_class_accuracy']:.2%}" for name in teachers]
        cells += [f"{m[key]['accuracy']:.2%}" for key, _ in MODELS]
        cells += [f"{m['student_above_naive'] * 100:+.2f} pt", f"{m['student_above_end_to_end'] * 100:+.2f} pt",
                  f"{sum(s['seconds'] for s in result['stages'].values()):.0f}"]
        lines.append(f"| {result['seed']} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        def spread(values: list[float], scale: float = 100, unit: str = "%") -> str:
            return f"{statistics.mean(values) * scale:.2f}{unit} ± {statistics.stdev(values) * scale:.2f}"

        ms = [r["metrics"] for r in results]
        cells = [spread([m["teachers"][name]["own_class_accuracy"] for m in ms]) for name in teachers]
        cells += [spread([m[key]["accuracy"] for m in ms]) for key, _ in MODELS]
        cells += [spread([m["student_above_naive"] for m in ms], unit=" pt"),
                  spread([m["student_above_end_to_end"] for m in ms], unit=" pt"),
                  spread([sum(s["seconds"] for s in r["stages"].values()) for r in results], scale=1, unit="")]
        lines.append("| mean ± sd | " + " | ".join(cells) + " |")

    m = results[0]["metrics"]
    together = m["naive_combination"]["parameters"]
    lines += [
        "",
        "| model | parameters | FLOPs/image |",
        "|---|---:|---:|",
        *(f"| teacher '{name}' | {m['teachers'][name]['parameters']:,} | {m['teachers'][name]['flops']:,} |"
          for name in teachers),
        f"| the teachers together (naive combination) | {together:,} | {m['naive_combination']['flops']:,} |",
        f"| TargetNet student (group-stack and ablation) | {m['student']['parameters']:,} "
        f"({m['student_parameter_ratio']:.1%} of the teachers', {together - m['student']['parameters']:,} fewer) "
        f"| {m['student']['flops']:,} |",
        f"| reference 10-class teacher | {m['reference']['parameters']:,} | {m['reference']['flops']:,} |",
        "",
        stage_table(results),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    results = [run_seed(seed) for seed in args.seeds]
    m = results[0]["metrics"]
    body = "\n".join([
        "## Amalgamation of specialised teachers (DFKA, `benchmarks/amalgamation.py`)",
        "",
        f"{date.today().isoformat()} on {machine()}. Every stage of `amalgamation/dvc.yaml` from scratch",
        "(`dvc repro --single-item`, one process per stage, the main pipeline's `prepare` and `train_teacher`",
        "included) with the default `params.yaml`: teachers " + ", ".join(f"{n} {t['classes']}" for n, t in m["teachers"].items()) + ".",
        "Accuracies on the real 1,000-image test split, all ten classes except each teacher's own column;",
        "the students never saw real data (they start from the teachers' weights and learn on the generator's",
        "and the conflict images). Wall time includes process start and MLflow logging.",
        "",
        table(results),
    ])
    print("\n" + body)
    write_section("amalgamation", body)


if __name__ == "__main__":
    main()
