"""The synthesis methods by name, and loading a saved transfer set whatever method made it."""

import os

import torch

from dfkd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dfkd.synthesis import TransferSet, dafl

# name -> (synthesize function, transfer-set class that loads what it saved)
METHODS = {
    "dafl": (dafl.synthesize, dafl.GeneratorTransferSet),
}


def save_transfer_set(path: str | os.PathLike, method: str, transfer_set, metadata: dict | None = None) -> None:
    save_checkpoint(
        path, {"kind": "transfer_set", "method": method, **transfer_set.to_checkpoint(), "metadata": metadata or {}}
    )


def load_transfer_set(path: str | os.PathLike, device: torch.device) -> TransferSet:
    payload = load_checkpoint(path, "transfer_set")
    method = payload.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{path}: transfer set of unknown method '{method}' (known: {', '.join(METHODS)})")
    try:
        return METHODS[method][1].from_checkpoint(payload, device)
    except (KeyError, TypeError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"{path}: {method} transfer set does not match its architecture ({error})") from error
