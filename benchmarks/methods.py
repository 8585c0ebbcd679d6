"""Every synthesis method side by side: the same teacher, the same student, the same seeds, through the real pipeline.

Three settings, each teacher distilled into `lenet5_half`:

    mnist_lenet5      the embedded MNIST, the default LeNet-5 teacher   (DAFL, ZSKD, DFAD: no batch norm)
    mnist_resnet8     the embedded MNIST, resnet8 {width: 0.5}          (every method)
    fashion_resnet8   the full Fashion-MNIST, resnet8 {width: 0.5}      (every method)

For each seed and setting, in a fresh copy of the project: prepare and train_teacher once, then for
each method synthesize, distill, both baselines, export and evaluate through DVC (as
benchmarks/fashion_mnist.py does). Then, for equal CPU time, each method once more with its
synthesis length and student steps (and pool, if it draws one) scaled so that its synthesis plus
distillation would take `--budget` seconds; its accuracy at that budget is reported with the time
the run really took (fixed costs such as process start do not scale). Prints a table per setting
(mean ± sample standard deviation over the seeds), the verdict on each of issue 17's bars, and
writes both to BENCHMARKS.md with a plot, BENCHMARKS-methods.png. A seed of every setting takes
hours on 2 cores: `--results` keeps every (setting, seed) measured so far, and `--methods` runs
some methods only: on a recorded seed it adds or replaces their runs (after a change to them) and
keeps the others', on the same machine's teacher of that seed, which it checks; on a new seed it
records those methods alone, and the others can be added later. A table lists the methods measured
on every seed of its setting.

    python benchmarks/methods.py --results benchmarks/results/methods.json --settings mnist_lenet5 --seeds 0
    python benchmarks/methods.py --results benchmarks/results/methods.json --settings mnist_lenet5 --seeds 0 1 2 \\
        --methods zskd                                                            # ZSKD again, the rest kept
    python benchmarks/methods.py --results benchmarks/results/methods.json --settings mnist_resnet8 --seeds 0 \\
        --methods dafl deepinversion fast_dfkd                                    # part of a seed
    python benchmarks/methods.py --results benchmarks/results/methods.json --seeds   # tables only
    python benchmarks/methods.py --settings mnist_resnet8 --seeds 0 --no-write --budget 20 \\
        -S train_teacher.epochs=1 -S distill.batch_size=32 ...                      # a smoke test
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file only

import matplotlib.pyplot as plt  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.fashion_mnist import DATA, TEACHERS, described, fail, run_method  # noqa: E402
from benchmarks.pipeline import fresh_copy, run_stage  # noqa: E402
from benchmarks.report import machine, measure, without_float_noise, write_section  # noqa: E402
from benchmarks.zskd_vs_dafl import NAMES, SYNTHESIS_LENGTH, metrics_of, spread  # noqa: E402
from pipeline.flow import apply_overrides, overridden, parse_overrides  # noqa: E402
from stages.params import ParamsError, load_params  # noqa: E402

ALL_METHODS = ("dafl", "zskd", "deepinversion", "dfad", "fast_dfkd")
NEW_METHODS = ("deepinversion", "dfad", "fast_dfkd")
FASHION = {"prepare.source": "idx", "prepare.data_dir": str(DATA), "train_teacher.epochs": 10}
SETTINGS = {
    "mnist_lenet5": {"title": "Embedded MNIST, LeNet-5 teacher", "teacher": "lenet5", "data": {},
                     "methods": ("dafl", "zskd", "dfad")},
    "mnist_resnet8": {"title": "Embedded MNIST, batch-norm teacher", "teacher": "resnet8", "data": {},
                      "methods": ALL_METHODS},
    "fashion_resnet8": {"title": "Full Fashion-MNIST, batch-norm teacher", "teacher": "resnet8", "data": FASHION,
                        "methods": ALL_METHODS},
}
PLOT = PROJECT / "BENCHMARKS-methods.png"
# Issue 17's bars.
MAX_GAP_MNIST = 0.01  # the best student within 1.0 pt of its teacher on the embedded MNIST ...
MAX_SECONDS_MNIST = 300  # ... with synthesis plus distillation in 5 minutes or less
MIN_RATIO_FASHION = 0.95  # the best Fashion-MNIST student keeps 95% of its teacher's accuracy ...
MAX_SECONDS_FASHION = 30 * 60  # ... with the whole benchmark of a seed in 30 minutes or less
BAR_SEEDS = 3  # every bar is on the mean of 3 seeds


def verdict(met: bool, seeds: int) -> str:
    """A bar's verdict; on fewer seeds than the bar asks, what those seeds show and that it is not settled."""
    word = "met" if met else "not met"
    return f"**{word}**" if seeds >= BAR_SEEDS else f"{word} on {seeds} of the {BAR_SEEDS} seeds the bar asks: **not settled**"


def overrides_of(setting: str, extra: dict) -> dict:
    """The overrides of params.yaml for one setting; the `-S` ones last, so they win."""
    return {**SETTINGS[setting]["data"], **TEACHERS[SETTINGS[setting]["teacher"]], **extra}


def at_budget(root: Path, method: str, run: dict, budget: float, label: str) -> dict:
    """`method` again in `root`, its synthesis and student steps scaled to take `budget` seconds."""
    factor = budget / (run["synthesis_seconds"] + run["distillation_seconds"])
    params = load_params(root / "params.yaml")
    recipe = getattr(params.distill, method)
    overrides = {"synthesize.method": method, f"distill.{method}.steps": max(1, round(recipe.steps * factor))}
    length = SYNTHESIS_LENGTH[method]
    if length:
        overrides[f"synthesize.{method}.{length}"] = max(1, round(getattr(getattr(params.synthesize, method), length) * factor))
    if recipe.pool_size:  # drawing the pool is part of distillation's time
        overrides[f"distill.{method}.pool_size"] = max(1, round(recipe.pool_size * factor))
    apply_overrides(overrides, root / "params.yaml")
    # The baselines are not rerun: only the synthetic-data student is compared at equal time. Forced:
    # a length that rounds to the full run's would otherwise be up to date and take no time.
    stages = {stage: run_stage(root, stage, f"{label} {method} at budget", force=True)
              for stage in ("synthesize", "distill", "export", "evaluate")}
    return {
        "factor": factor,
        "overrides": overrides,
        "seconds": stages["synthesize"]["seconds"] + stages["distill"]["seconds"],
        "student": metrics_of(root)["student"]["accuracy"],
    }


def run_setting(seed: int, setting: str, overrides: dict, budget: float, methods: list[str]) -> dict:
    """The setting's `methods` (those of them it has) on one seed, each at full length and at `budget`."""
    label = f"seed {seed} {setting}"
    with tempfile.TemporaryDirectory(prefix="dfkd-methods-") as scratch:
        root = fresh_copy(Path(scratch), seed)
        apply_overrides(overrides, root / "params.yaml")
        seconds = sum(run_stage(root, stage, label)["seconds"] for stage in ("prepare", "train_teacher"))
        methods = [method for method in SETTINGS[setting]["methods"] if method in methods]
        runs = {method: run_method(root, method, label) for method in methods}
        base = (root / "params.yaml").read_text()
        for method in methods:  # each from the same params: one method's scaling never reaches another
            (root / "params.yaml").write_text(base)
            runs[method]["at_budget"] = at_budget(root, method, runs[method], budget, label)
    seconds += sum(run["stage_seconds"] for run in runs.values())
    return {"seed": seed, "benchmark_seconds": seconds, "runs": runs}


def rerun_into(recorded: dict, rerun: dict) -> dict:
    """A recorded (setting, seed) with `rerun`'s methods, of the same seed, added or in place of their
    recorded runs: the others keep their runs and the date they were measured on. The stages' seconds
    add up as if the setting's methods had run once, with the teacher's stages as recorded."""
    teacher = next(iter(recorded["runs"].values()))["teacher"]  # one teacher a seed, whichever method's run
    for method, run in rerun["runs"].items():
        if without_float_noise(run["teacher"]) != without_float_noise(teacher):
            fail(f"seed {recorded['seed']}: the teacher scored {run['teacher']:.2%} in the rerun of {method} and "
                 f"{teacher:.2%} when recorded: another teacher; nothing merged")
    runs = {method: {"date": recorded["date"], **run} for method, run in recorded["runs"].items()}
    seconds = recorded["benchmark_seconds"] + sum(
        run["stage_seconds"] - runs.get(method, {"stage_seconds": 0.0})["stage_seconds"]
        for method, run in rerun["runs"].items())
    runs.update(rerun["runs"])  # dated by measure(), with the whole record
    return {"seed": recorded["seed"], "benchmark_seconds": seconds, "runs": runs}


def measured_methods(setting: str, results: list[dict]) -> list[str]:
    """The setting's methods measured on every one of its seeds, in the setting's order."""
    return [method for method in SETTINGS[setting]["methods"] if all(method in result["runs"] for result in results)]


def setting_table(setting: str, results: list[dict], budget: float) -> str:
    teacher = TEACHERS[SETTINGS[setting]["teacher"]]
    student = teacher["distill.student"]
    lines = [
        f"### {SETTINGS[setting]['title']}: `{described(teacher['teacher.architecture'], teacher['teacher.options'])}` "
        f"-> `{described(student['architecture'], student['options'])}`",
        "",
        "| method | student | gap to teacher | floor (noise) | ceiling (real) | teacher | synthesis | distillation "
        f"| student at {budget:.0f} s | took |",
        "|---|" + "---:|" * 9,
    ]
    methods = measured_methods(setting, results)
    for method in methods:
        runs = [result["runs"][method] for result in results]
        lines.append(
            f"| {NAMES[method]} | {spread([run['student'] for run in runs])} "
            f"| {spread([run['gap'] for run in runs]).replace('%', ' pt')} "
            f"| {spread([run['floor'] for run in runs])} | {spread([run['ceiling'] for run in runs])} "
            f"| {spread([run['teacher'] for run in runs])} "
            f"| {spread([run['synthesis_seconds'] for run in runs], ' s')} "
            f"| {spread([run['distillation_seconds'] for run in runs], ' s')} "
            f"| {spread([run['at_budget']['student'] for run in runs])} "
            f"| {spread([run['at_budget']['seconds'] for run in runs], ' s')} |"
        )
    seeds = ", ".join(str(result["seed"]) for result in results)
    whole = spread([whole_seconds(result) for result in results], " s")
    lines += ["", f"{'Seeds' if len(results) > 1 else 'Seed'} {seeds}; every stage of the setting, the budget runs included, took {whole} a seed."]
    missing = [NAMES[method] for method in SETTINGS[setting]["methods"] if method not in methods]
    if missing:
        lines.append(f"Not measured on every seed yet, so not in the table: {', '.join(missing)}.")
    return "\n".join(lines)


def whole_seconds(result: dict) -> float:
    """Every stage of a setting's seed: the teacher's, each method's and its run at the budget."""
    return result["benchmark_seconds"] + sum(run["at_budget"]["seconds"] for run in result["runs"].values())


def mean_of(results: list[dict], method: str, figure) -> float:
    return statistics.mean(figure(result["runs"][method]) for result in results)


def verdicts(results: dict[str, list[dict]]) -> str:
    """Issue 17's bars, on the settings measured; a setting not measured is said to be."""
    lines = []
    for setting in ("mnist_lenet5", "mnist_resnet8"):
        if setting not in results:
            lines.append(f"- {SETTINGS[setting]['title']}: not measured yet.")
            continue
        rs, methods = results[setting], measured_methods(setting, results[setting])
        top = min(methods, key=lambda method: mean_of(rs, method, lambda run: run["gap"]))
        gap = without_float_noise(mean_of(rs, top, lambda run: run["gap"]))
        seconds = mean_of(rs, top, lambda run: run["synthesis_seconds"] + run["distillation_seconds"])
        met = gap <= MAX_GAP_MNIST and seconds <= MAX_SECONDS_MNIST
        lines.append(f"- {SETTINGS[setting]['title']}: the best student ({NAMES[top]}) is {gap * 100:.2f} pt below its "
                     f"teacher in {seconds:.0f} s (bar: {MAX_GAP_MNIST * 100:.1f} pt in {MAX_SECONDS_MNIST} s): "
                     f"{verdict(met, len(rs))}.")
    if "fashion_resnet8" in results:
        rs, methods = results["fashion_resnet8"], measured_methods("fashion_resnet8", results["fashion_resnet8"])
        top = max(methods, key=lambda method: mean_of(rs, method, lambda run: run["student"] / run["teacher"]))
        ratio = without_float_noise(mean_of(rs, top, lambda run: run["student"] / run["teacher"]))
        seconds = statistics.mean(whole_seconds(result) for result in rs)
        met = ratio >= MIN_RATIO_FASHION and seconds <= MAX_SECONDS_FASHION
        lines.append(f"- Full Fashion-MNIST: the best student ({NAMES[top]}) keeps {ratio:.3f} of its teacher's "
                     f"accuracy, the benchmark of a seed takes {seconds / 60:.0f} min (bar: {MIN_RATIO_FASHION} in "
                     f"{MAX_SECONDS_FASHION // 60} min): {verdict(met, len(rs))}.")
    else:
        lines.append("- Full Fashion-MNIST: not measured yet.")
    wins, compared = set(), set()
    for setting, rs in results.items():
        methods = measured_methods(setting, rs)
        at_budget = {method: mean_of(rs, method, lambda run: run["at_budget"]["student"]) for method in methods}
        new = max((m for m in methods if m in NEW_METHODS), key=at_budget.get, default=None)
        old = max((m for m in methods if m not in NEW_METHODS), key=at_budget.get, default=None)
        if new is None or old is None:
            lines.append(f"- At equal CPU time on {setting}: not compared yet (a new method and DAFL or ZSKD on every seed).")
            continue
        compared.add(setting)
        if at_budget[new] > at_budget[old]:
            wins.add(setting)
        # Partial where some of the setting's methods are not measured yet: a best of the rest could differ.
        partial = "" if len(methods) == len(SETTINGS[setting]["methods"]) else " (of the methods measured)"
        lines.append(f"- At equal CPU time on {setting}{partial}: best new method {NAMES[new]} {at_budget[new]:.2%}, "
                     f"best of DAFL and ZSKD {NAMES[old]} {at_budget[old]:.2%}.")
    # Settled once two settings measured on every seed the bar asks, every method of them, agree: more
    # seeds or settings cannot change it.
    settled = {setting for setting in compared if len(results[setting]) >= BAR_SEEDS
               and len(measured_methods(setting, results[setting])) == len(SETTINGS[setting]["methods"])}
    if len(wins & settled) >= 2 or len(settled - wins) >= 2:
        outcome = verdict(len(wins & settled) >= 2, BAR_SEEDS)
    else:
        outcome = f"{'met' if len(wins) >= 2 else 'not met'} on what is measured so far: **not settled**"
    lines.append(f"- The new methods beat DAFL and ZSKD at equal CPU time on {len(wins)} of the {len(compared)} settings "
                 f"measured, {len(settled)} of them on {BAR_SEEDS} seeds (bar: at least two of the three): {outcome}.")
    return "\n".join(lines)


def save_plot(results: dict[str, list[dict]]) -> None:
    """Student accuracy per method, full length and at the budget, a panel per setting."""
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (setting, rs) in zip(axes[0], results.items()):
        methods = measured_methods(setting, rs)
        for offset, (name, figure_of) in enumerate((("full length", lambda run: run["student"]),
                                                    ("at equal CPU time", lambda run: run["at_budget"]["student"]))):
            values = [[figure_of(result["runs"][method]) * 100 for result in rs] for method in methods]
            errors = [statistics.stdev(seeds) for seeds in values] if len(rs) > 1 else None
            positions = [index + (offset - 0.5) * 0.4 for index in range(len(methods))]
            axis.bar(positions, [statistics.mean(seeds) for seeds in values], width=0.4, yerr=errors, capsize=3, label=name)
        teacher = statistics.mean(result["runs"][methods[0]]["teacher"] for result in rs) * 100
        axis.axhline(teacher, color="black", linestyle="--", linewidth=1, label="teacher")
        axis.set_xticks(range(len(methods)), [NAMES[method] for method in methods], rotation=20)
        axis.set_ylim(0, 100)
        axis.set_ylabel("test accuracy (%)")
        axis.set_title(SETTINGS[setting]["title"], fontsize="medium")
    # Below the panels: inside, it would hide the bars of whichever method sits under it.
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=3, fontsize="small",
                  bbox_to_anchor=(0.5, -0.06))
    figure.savefig(PLOT, dpi=100, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds to run (default 0 1 2); none, with --results, writes the tables of what it holds")
    parser.add_argument("--budget", type=float, default=MAX_SECONDS_MNIST,
                        help=f"seconds of synthesis + distillation for the equal-time runs (default {MAX_SECONDS_MNIST})")
    parser.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param of every run, as `dvc exp run -S` does (repeatable)")
    parser.add_argument("--results", type=Path, help="JSON file keeping every setting and seed measured so far")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS,
                        help="run only these methods: on a recorded seed, in place of or beside its other methods' runs")
    parser.add_argument("--no-write", action="store_true", help="print the tables only: no BENCHMARKS.md, no plot")
    args = parser.parse_args()
    if "fashion_resnet8" in args.settings and args.seeds and not DATA.is_dir():
        fail(f"no Fashion-MNIST at {DATA}: `sudo apt-get install dataset-fashion-mnist`")
    try:  # every run's params checked before the first stage, not hours into the benchmark
        extra = parse_overrides(args.set_param)
        for setting in args.settings:
            for method in SETTINGS[setting]["methods"]:
                overridden({**overrides_of(setting, extra), "synthesize.method": method}, PROJECT / "params.yaml")
    except ParamsError as error:
        fail(str(error))

    recorded = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    if recorded and (recorded["budget"], recorded["overrides"]) != (args.budget, args.set_param):
        fail(f"{args.results} holds results of another budget or overrides: pass another --results file")
    recorded = {"budget": args.budget, "overrides": args.set_param, "results": recorded.get("results", {})}
    if args.methods:  # refused before any work where the seed's record is of another machine's teacher
        for setting in args.settings:
            if not set(args.methods) & set(SETTINGS[setting]["methods"]):
                fail(f"{setting} runs {', '.join(SETTINGS[setting]['methods'])}: none of --methods")
            for seed in args.seeds:
                old = recorded["results"].get(setting, {}).get(str(seed))
                if old is not None and old["machine"] != machine():
                    fail(f"seed {seed} of {setting} in {args.results} was measured on {old['machine']}: --methods adds "
                         "to seeds of this machine's teachers; rerun that seed of every method here")

    def run(seed: int, setting: str) -> dict:
        runs = run_setting(seed, setting, overrides_of(setting, extra), args.budget, args.methods or ALL_METHODS)
        old = recorded["results"].get(setting, {}).get(str(seed))
        return rerun_into(old, runs) if args.methods and old is not None else runs

    measured = measure(recorded, args.seeds, args.settings, run, args.results)
    # A setting whose seeds share no measured method (each seed run with other --methods) has no table yet.
    results = {setting: measured[setting] for setting in SETTINGS
               if setting in measured and measured_methods(setting, measured[setting])}
    if not results:
        fail("no seeds to run and no results recorded: pass --seeds, or --results with a file of measured seeds")

    runs_on = "; ".join(sorted({f"{run.get('date', result['date'])} on {result['machine']}"
                                for rs in results.values() for result in rs for run in result["runs"].values()}))
    overrides = ", ".join(f"`{pair}`" for pair in args.set_param)
    body = "\n".join([
        "## Every synthesis method side by side (`benchmarks/methods.py`)",
        "",
        f"{runs_on}. Accuracies on the real test split; times are wall seconds of the stage processes",
        "(`dvc repro --single-item`, MLflow logging included). Each method with its defaults"
        + (f" and {overrides}" if overrides else "") + ", its floor and ceiling",
        f"distilled with its own recipe; \"at {args.budget:.0f} s\" is the method rerun with its synthesis length",
        "and student steps scaled to that budget. Mean ± sample standard deviation over the seeds.",
        "",
        "\n\n".join(setting_table(setting, rs, args.budget) for setting, rs in results.items()),
        "",
        verdicts(results),
    ])
    print("\n" + body)
    if not args.no_write:
        save_plot(results)
        write_section("methods", f"{body}\n\n![Student accuracy per method and setting]({PLOT.name})")


if __name__ == "__main__":
    main()
