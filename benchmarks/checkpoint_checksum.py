"""What the weights checksum costs: saving and loading the pipeline's checkpoints with it, against
torch.save / torch.load of the same payload without it (median of several rounds, one after the other).

    python benchmarks/checkpoint_checksum.py          # prints the table and writes BENCHMARKS.md
"""

import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.report import machine, write_section  # noqa: E402
from dfkd.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dfkd.models import Generator  # noqa: E402
from dfkd.zoo import ModelConfig, build_model  # noqa: E402

ROUNDS = 7


def payloads() -> dict[str, dict]:
    """Checkpoints of the default pipeline's sizes: the teacher, the DAFL generator, ZSKD's impressions."""
    return {
        "teacher (LeNet-5)": {"kind": "classifier", "state_dict": build_model(ModelConfig(architecture="lenet5"), 1, 32, 10).state_dict()},
        "DAFL generator (width 32)": {"kind": "transfer_set", "state_dict": Generator(latent_dim=100, width=32).state_dict()},
        "ZSKD transfer set (4,000 impressions)": {
            "kind": "transfer_set", "images": torch.rand(4000, 1, 32, 32), "targets": torch.rand(4000, 10),
        },
    }


def median_ms(action) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, payload in payloads().items():
            plain, checked = Path(scratch) / "plain.pt", Path(scratch) / "checked.pt"
            save_plain = median_ms(lambda: torch.save(payload, plain))
            save_checked = median_ms(lambda: save_checkpoint(checked, payload))
            load_plain = median_ms(lambda: torch.load(plain, weights_only=True))
            load_checked = median_ms(lambda: load_checkpoint(checked, payload["kind"]))
            rows.append((name, checked.stat().st_size / 2**20, save_plain, save_checked, load_plain, load_checked))
    lines = [
        "## Weights checksum (`benchmarks/checkpoint_checksum.py`)",
        "",
        f"{machine()}; {date.today().isoformat()}. Median of {ROUNDS} rounds. Every checkpoint carries the sha256 of its "
        "tensors and values, checked on load; plain: `torch.save` / `torch.load(weights_only=True)` of the same payload.",
        "",
        "| checkpoint | MiB | save plain ms | save with checksum ms | load plain ms | load and verify ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {size:.2f} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for name, size, a, b, c, d in rows]
    table = "\n".join(lines)
    print(table)
    write_section("checkpoint-checksum", table)


if __name__ == "__main__":
    main()
