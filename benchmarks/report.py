"""What every benchmark script shares: the machine line, its own section of BENCHMARKS.md and the
results kept seed by seed."""

import json
import os
import platform
from collections.abc import Callable
from datetime import date
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor() or "unknown CPU",
    )
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory_gib:.0f} GiB, no GPU used"


def without_float_noise(fraction: float) -> float:
    """An accuracy, or a mean or difference of them, fit to compare with a bar: test splits hold far
    fewer than a million images, so six decimals keep every real difference and drop the noise that
    makes 0.968 - 0.958 come out as 0.010000000000000009."""
    return round(fraction, 6)


def write_section(name: str, body: str) -> None:
    """Replace the text between `<!-- benchmark:NAME:start -->` and `...:end -->`, or append it."""
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


def measure(recorded: dict, seeds: list[int], names: list[str], run: Callable[[int, str], dict],
            path: Path | None) -> dict[str, list[dict]]:
    """`run(seed, name)` for every seed and name (a teacher, a setting), each result kept in
    `recorded["results"][name][seed]` with the date and the machine and, after each, saved to `path`
    (so an interrupted benchmark keeps what it measured); every name's results so far, by seed."""
    for seed in seeds:
        for name in names:
            recorded["results"].setdefault(name, {})[str(seed)] = {
                **run(seed, name), "date": date.today().isoformat(), "machine": machine()
            }
            if path:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(recorded, indent=1))
    return {name: sorted(results.values(), key=lambda result: result["seed"]) for name, results in recorded["results"].items()}
