"""What every training stage does the same way: seed, pick the device, set CPU threads, load splits."""

import os
import sys
from collections.abc import Callable

import torch

from dfkd.amalgamation import AmalgamationError
from dfkd.checkpoint import CheckpointError
from dfkd.data import DataError, load_split, to_model_input
from dfkd.export import ParityError
from dfkd.synthesis import SynthesisError
from dfkd.runtime import resolve_device, seed_everything
from stages.params import ROOT, Params, ParamsError

PREPARED = ROOT / "data" / "prepared"
MODELS = ROOT / "models"
REPORTS = ROOT / "reports"
RESUME = ROOT / ".resume"  # mid-stage training state; outside DVC's outputs, so DVC never deletes it


def setup(params: Params) -> torch.device:
    # One intra-op thread per core; torch's default oversubscribes small CPU machines.
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    seed_everything(params.seed)
    return resolve_device(params.device)


def load_model_input(split_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A prepared split as (normalised images, labels) tensors."""
    split = load_split(PREPARED / f"{split_name}.npz")
    return to_model_input(split.images), torch.as_tensor(split.labels)


def run(main: Callable[[], None]) -> None:
    """Run a stage's main; bad input (params, data, checkpoints, a teacher that the synthesis method
    cannot use, teachers that cannot be amalgamated, ONNX parity) ends it with a one-line error naming
    the key or file and exit code 2, instead of a traceback."""
    try:
        main()
    except (ParamsError, DataError, CheckpointError, SynthesisError, AmalgamationError, ParityError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
