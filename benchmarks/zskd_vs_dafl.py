"""DAFL and ZSKD side by side: the same teacher, the same student, the same seed, through the real pipeline.

For each seed, in a fresh copy of the project (made as benchmarks/pipeline.py makes it): prepare the
data and train the teacher once; run synthesize, distill, both baselines, export and evaluate with
`synthesize.method=dafl`; then set only `synthesize.method=zskd` and run them again. DVC keeps the
teacher, and the two baselines follow the selected method's distillation recipe, so each method is
compared with a floor and a ceiling distilled exactly as its own student is.

Equal CPU time: the method whose synthesis + distillation took longer runs once more with its
synthesis length (DAFL generator steps, ZSKD impressions), its student steps and its transfer pool
(if it draws one) scaled by the ratio
of the faster method's time to its own, and its accuracy at that budget is reported with the time
the scaled run really took (fixed costs such as process start do not scale).

    python benchmarks/zskd_vs_dafl.py --seeds 0 1 2
    python benchmarks/zskd_vs_dafl.py --seeds 1 --results /tmp/zskd_vs_dafl.json   # one seed per call
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

from benchmarks.pipeline import fresh_copy, run_stage  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from pipeline.flow import apply_overrides  # noqa: E402
from stages.params import load_params  # noqa: E402

METHODS = ("dafl", "zskd")
METHOD_STAGES = ("synthesize", "distill", "baseline_noise", "baseline_real", "export", "evaluate")
# The knob that sets how long each method's synthesis runs, scaled for an equal-time run (DFAD's
# synthesis is all in distill: its student steps are what scale).
SYNTHESIS_LENGTH = {"dafl": "steps", "zskd": "impressions", "deepinversion": "images", "dfad": None,
                    "fast_dfkd": "warmup_rounds"}
NAMES = {"dafl": "DAFL", "zskd": "ZSKD", "deepinversion": "DeepInversion", "dfad": "DFAD", "fast_dfkd": "Fast-DFKD"}


def metrics_of(root: Path) -> dict:
    return json.loads((root / "metrics.json").read_text())


def equal_time_run(root: Path, runs: dict, label: str) -> dict:
    """The slower method again, its synthesis and student steps scaled to the faster one's time."""
    total = {method: runs[method]["seconds"] for method in METHODS}
    slow = max(total, key=total.get)
    fast = min(total, key=total.get)
    factor = total[fast] / total[slow]
    params = load_params(root / "params.yaml")
    length = SYNTHESIS_LENGTH[slow]
    overrides = {
        "synthesize.method": slow,
        f"synthesize.{slow}.{length}": max(1, round(getattr(getattr(params.synthesize, slow), length) * factor)),
        f"distill.{slow}.steps": max(1, round(getattr(params.distill, slow).steps * factor)),
    }
    pool_size = getattr(params.distill, slow).pool_size  # drawing the pool is part of distillation's time
    if pool_size:
        overrides[f"distill.{slow}.pool_size"] = max(1, round(pool_size * factor))
    apply_overrides(overrides, root / "params.yaml")
    # The baselines are not rerun: only the synthetic-data student is compared at equal time.
    stages = {stage: run_stage(root, stage, f"{label} {slow} scaled") for stage in ("synthesize", "distill", "export", "evaluate")}
    return {
        "method": slow,
        "budget_of": fast,
        "budget_seconds": total[fast],
        "factor": factor,
        "overrides": overrides,
        "seconds": stages["synthesize"]["seconds"] + stages["distill"]["seconds"],
        "accuracy": metrics_of(root)["student"]["accuracy"],
    }


def run_seed(seed: int) -> dict:
    label = f"seed {seed}"
    with tempfile.TemporaryDirectory(prefix="dfkd-zskd-vs-dafl-") as scratch:
        root = fresh_copy(Path(scratch), seed)
        for stage in ("prepare", "train_teacher"):
            run_stage(root, stage, label)
        runs = {}
        for method in METHODS:
            apply_overrides({"synthesize.method": method}, root / "params.yaml")
            stages = {stage: run_stage(root, stage, f"{label} {method}") for stage in METHOD_STAGES}
            metrics = metrics_of(root)
            runs[method] = {
                "stages": stages,
                "seconds": stages["synthesize"]["seconds"] + stages["distill"]["seconds"],
                "teacher": metrics["teacher"]["accuracy"],
                "student": metrics["student"]["accuracy"],
                "floor": metrics["baseline_noise"]["accuracy"],
                "ceiling": metrics["baseline_real"]["accuracy"],
            }
        assert runs["dafl"]["teacher"] == runs["zskd"]["teacher"], "both methods distil the same teacher"
        equal_time = equal_time_run(root, runs, label)
    return {"seed": seed, "teacher": runs["dafl"]["teacher"], "runs": runs, "equal_time": equal_time}


def spread(values: list[float], unit: str = "%") -> str:
    """Mean ± sample standard deviation (the mean alone for one seed)."""
    scale, digits = (100, 2) if unit == "%" else (1, 0)
    mean = statistics.mean(values) * scale
    if len(values) < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}{unit}"


def tables(results: list[dict]) -> str:
    lines = [
        "| seed | method | teacher | student | gap to teacher | floor (noise) | ceiling (real) "
        "| synthesis s | distillation s | synthesis + distillation s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for method in METHODS:
            run = result["runs"][method]
            lines.append(
                f"| {result['seed']} | {NAMES[method]} | {result['teacher']:.2%} | {run['student']:.2%} "
                f"| {(result['teacher'] - run['student']) * 100:.2f} pt | {run['floor']:.2%} | {run['ceiling']:.2%} "
                f"| {run['stages']['synthesize']['seconds']:.0f} | {run['stages']['distill']['seconds']:.0f} "
                f"| {run['seconds']:.0f} |"
            )
    seeds = ", ".join(str(result["seed"]) for result in results)
    lines += [
        "",
        f"Mean ± sample standard deviation over seeds {seeds}:",
        "",
        "| method | student | gap to teacher | floor (noise) | ceiling (real) | synthesis | distillation "
        "| synthesis + distillation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        runs = [result["runs"][method] for result in results]
        gaps = [result["teacher"] - result["runs"][method]["student"] for result in results]
        lines.append(
            f"| {NAMES[method]} | {spread([r['student'] for r in runs])} | {spread(gaps).replace('%', ' pt')} "
            f"| {spread([r['floor'] for r in runs])} | {spread([r['ceiling'] for r in runs])} "
            f"| {spread([r['stages']['synthesize']['seconds'] for r in runs], ' s')} "
            f"| {spread([r['stages']['distill']['seconds'] for r in runs], ' s')} "
            f"| {spread([r['seconds'] for r in runs], ' s')} |"
        )
    lines += [
        "",
        "At equal CPU time: the slower method rerun with its synthesis length, student steps and pool scaled to the "
        "faster method's synthesis + distillation time.",
        "",
        "| seed | budget (the faster method's time) | rerun method | scaled to | took | its accuracy "
        "| the faster method's accuracy |",
        "|---:|---:|---|---|---:|---:|---:|",
    ]
    for result in results:
        equal = result["equal_time"]
        scaled = ", ".join(f"`{key}={value}`" for key, value in equal["overrides"].items() if key != "synthesize.method")
        lines.append(
            f"| {result['seed']} | {equal['budget_seconds']:.0f} s ({NAMES[equal['budget_of']]}) "
            f"| {NAMES[equal['method']]} | {scaled} (x{equal['factor']:.2f}) | {equal['seconds']:.0f} s "
            f"| {equal['accuracy']:.2%} | {result['runs'][equal['budget_of']]['student']:.2%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--results", type=Path, help="JSON file keeping every seed measured so far; the table covers all of them"
    )
    args = parser.parse_args()
    recorded = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    for seed in args.seeds:
        recorded[str(seed)] = {**run_seed(seed), "date": date.today().isoformat(), "machine": machine()}
        if args.results:
            args.results.write_text(json.dumps(recorded, indent=1))
    results = sorted(recorded.values(), key=lambda result: result["seed"])
    runs_on = sorted({f"{result['date']} on {result['machine']}" for result in results})
    body = "\n".join([
        "## DAFL and ZSKD side by side (`benchmarks/zskd_vs_dafl.py`)",
        "",
        f"{'; '.join(runs_on)}. For each seed, one teacher; the default `params.yaml` run",
        "through DVC (`dvc repro --single-item`, one process per stage) with `synthesize.method=dafl`, then",
        "with only `synthesize.method=zskd` changed; each method's floor and ceiling are distilled with its",
        "own recipe (`distill.dafl`, `distill.zskd`). Accuracies on the real 1,000-image test split; times",
        "are wall seconds of the stage processes, MLflow logging included.",
        "",
        tables(results),
    ])
    print("\n" + body)
    write_section("zskd_vs_dafl", body)


if __name__ == "__main__":
    main()
