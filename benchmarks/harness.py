"""What the benchmark scripts share: a fresh copy of the project, timed DVC stages with their peak
memory, the machine's description, and writing one's own section of BENCHMARKS.md."""

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from pipeline.flow import apply_overrides  # noqa: E402

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


def run_stages(root: Path, stages: list[str], label: str) -> dict[str, dict[str, float]]:
    """Each DVC stage in order (`dvc repro --single-item`), timed, with its peak resident memory."""
    environment = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    measured = {}
    for stage in stages:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(BIN / "dvc"), "repro", "--single-item", stage],
            cwd=root, env=environment, capture_output=True, text=True,
        )
        if done.returncode:
            raise SystemExit(f"{label}: stage {stage} failed\n{done.stdout}\n{done.stderr}")
        peak_kib = int(done.stderr.strip().splitlines()[-1])
        name = stage.rpartition(":")[2]
        measured[name] = {"seconds": time.perf_counter() - start, "peak_rss_mib": peak_kib / 1024}
        print(f"  {label} {name:24s} {measured[name]['seconds']:7.1f} s {peak_kib / 1024:7.0f} MiB", flush=True)
    return measured


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor() or "unknown CPU",
    )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory_gib:.0f} GiB, no GPU used"


def write_section(name: str, body: str) -> None:
    """Replace the section between `<!-- benchmark:NAME:start -->` and its end marker (or append it)."""
    start, end = f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"
    path = PROJECT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`.\n"
    section = f"{start}\n{body}\n{end}"
    if start in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
