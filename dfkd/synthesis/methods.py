"""The synthesis methods by name, and loading a saved transfer set whatever method made it."""

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from dfkd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dfkd.inputs import InputSpec
from dfkd.synthesis import TransferSet, dafl, deepinversion, dfad, fast_dfkd, zskd


class Method(NamedTuple):
    synthesize: Callable[..., TransferSet]
    transfer_set: type  # the class that loads what `synthesize` returned and was saved
    save_figures: Callable[[TransferSet, Path], None]  # figures only this method has


METHODS = {
    "dafl": Method(dafl.synthesize, dafl.GeneratorTransferSet, dafl.save_figures),
    "zskd": Method(zskd.synthesize, zskd.ImpressionTransferSet, zskd.save_figures),
    "deepinversion": Method(
        deepinversion.synthesize, deepinversion.InversionTransferSet, deepinversion.save_figures
    ),
    # The generator's starting point only: its game against the student is played in distill.
    "dfad": Method(dfad.synthesize, dfad.AdversarialGenerator, dafl.save_figures),
    # The warm-up rounds only: the rounds against the student run in distill.
    "fast_dfkd": Method(fast_dfkd.synthesize, fast_dfkd.MetaGeneratorPool, fast_dfkd.save_figures),
}


def save_transfer_set(
    path: str | os.PathLike, method: str, transfer_set, spec: InputSpec, metadata: dict | None = None
) -> None:
    """Save with the teacher's input description: the images are in its normalised input space."""
    payload = {"kind": "transfer_set", "method": method, "input": spec.model_dump(), **transfer_set.to_checkpoint()}
    save_checkpoint(path, {**payload, "metadata": metadata or {}})


def load_transfer_set(path: str | os.PathLike, device: torch.device, spec: InputSpec) -> TransferSet:
    """The transfer set at `path`, which must have been made for a teacher of input `spec`."""
    payload = load_checkpoint(path, "transfer_set")
    try:
        made_for = InputSpec.model_validate(payload.get("input"))
    except ValueError:
        raise CheckpointError(f"{path}: a transfer set without a valid input description; rerun synthesize") from None
    if made_for != spec:
        raise CheckpointError(f"{path}: made for a teacher of another input ({made_for}); rerun synthesize")
    method = payload.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{path}: transfer set of unknown method '{method}' (known: {', '.join(METHODS)})")
    try:
        return METHODS[method].transfer_set.from_checkpoint(payload, device)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: {method} transfer set does not match its architecture ({error})") from error
