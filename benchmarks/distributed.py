"""Wall time of the distill stage as 1 and as 2 processes (torchrun, gloo on the CPU), side by side.

In a fresh copy of the project: prepare and train_teacher once, then the distill stage on Gaussian
noise (`--source noise`: the same loop as on a transfer set, without a synthesis to wait for), run
as one process and as two in turn, each `--rounds` times. Prints the table and writes it to
BENCHMARKS.md with the machine and the date.

    python benchmarks/distributed.py --rounds 2
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.pipeline import BIN, fresh_copy, run_stage  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from pipeline.flow import apply_overrides  # noqa: E402

# The ZSKD recipe (fresh draws, augmentation) on noise, shortened: the per-step cost is what is compared.
SETTINGS = {"synthesize.method": "zskd", "distill.zskd.steps": 600, "train_teacher.epochs": 3}


def distill_seconds(root: Path, processes: int) -> float:
    apply_overrides({"distributed.processes": processes}, root / "params.yaml")
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.distill", "--source", "noise"], cwd=root, env=environment,
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each process count, interleaved")
    rounds = parser.parse_args().rounds
    seconds = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as scratch:
        root = fresh_copy(Path(scratch), seed=0)
        apply_overrides(SETTINGS, root / "params.yaml")
        for stage in ("prepare", "train_teacher"):
            run_stage(root, stage, "setup")
        for _ in range(rounds):
            for processes in seconds:
                seconds[processes].append(distill_seconds(root, processes))
                print(f"  {processes} process(es): {seconds[processes][-1]:.1f} s", flush=True)
    one = statistics.median(seconds[1])
    lines = [
        "## Distillation on several processes (`benchmarks/distributed.py`)",
        "",
        f"{machine()}; {date.today().isoformat()}. The distill stage (`--source noise`, the ZSKD recipe, "
        f"{SETTINGS['distill.zskd.steps']} steps of batch 256, LeNet-5 teacher -> LeNet-5-half) as one process and "
        f"as two gloo processes under torchrun, {rounds} interleaved runs each; whole process wall seconds "
        "(imports, launch, rendezvous, MLflow and the checkpoint included), median.",
        "",
        "| processes | threads each | wall s (median) | runs | speed-up |",
        "|---:|---:|---:|---|---:|",
    ]
    cores = len(os.sched_getaffinity(0))
    for processes, measured in seconds.items():
        median = statistics.median(measured)
        runs = ", ".join(f"{value:.1f}" for value in measured)
        lines.append(f"| {processes} | {max(1, cores // processes)} | {median:.1f} | {runs} | {one / median:.2f}x |")
    table = "\n".join(lines)
    print(table)
    write_section("distributed", table)


if __name__ == "__main__":
    main()
