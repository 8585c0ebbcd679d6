"""Atomic file writes and safe checkpoints.

A checkpoint is a dict of tensors and plain values (the architecture config, metadata), written with
`torch.save` and read back with `torch.load(weights_only=True)`: loading never unpickles code.
"""

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dfkd.distributed import is_main

CHECKSUM_KEY = "sha256"  # of the rest of the payload, stored beside it


# Why a write fails when the disk or the folder is at fault, not the program.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class OutputError(RuntimeError):
    """An output that cannot be written (disk full, read-only folder); the message names the file."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or of the wrong kind; the message names the file."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    The rename is atomic on POSIX, so readers (DVC, the next stage) see the old file or the whole new
    one, never half a file, even if the process is killed midway. The file keeps the mode of the one it
    replaces; a new one gets the user's umask, like any file the user creates (mkstemp's is 0600).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(handle, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~current_umask())
        os.close(handle)
    except OSError as error:
        raise OutputError(f"{path}: cannot be written ({error.strerror})") from error
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:  # e.g. an input the block reads that is missing
            raise
        raise OutputError(f"{path}: cannot be written ({error.strerror})") from error
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def payload_sha256(payload: dict) -> str:
    """sha256 of every tensor's bytes (with its dtype and shape) and every plain value of a payload, in
    a fixed order: torch.load does not check the archive's CRCs, so a flipped bit would load silently."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(payload)
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    with atomic_path(path) as tmp:
        try:
            # Through a file object: given a path, torch names the archive's inner folder after the
            # (random) temporary file, so two saves of one payload would differ and DVC's hashes with them.
            with open(tmp, "wb") as file:
                torch.save({**payload, CHECKSUM_KEY: payload_sha256(payload)}, file)
        except RuntimeError as error:  # torch's writer reports a full disk as "basic_ios::clear: iostream error"
            raise OutputError(f"{path}: cannot be written ({error})") from error


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict:
    """Load a checkpoint written by this package and check that it is of the expected `kind`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(f"{path}: corrupted or not a checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected a '{kind}' checkpoint, found '{found}'")
    if payload.pop(CHECKSUM_KEY, None) != payload_sha256(payload):
        raise CheckpointError(
            f"{path}: its contents do not match the checksum saved with them (damaged on disk or in transfer, or "
            "written by an older version): write it again, e.g. rerun the stage that made it"
        )
    return payload


class ResumeState:
    """Periodic training state of a long loop, so a killed stage continues where it stopped.

    The state is saved with the run's `inputs`: whatever decides its result (its settings; for a
    pipeline stage, also the hashes of the code and files it reads). A file saved for other inputs is
    deleted with a line saying why, never resumed into the wrong run. The torch RNG state is saved
    too, so a resumed run draws the same samples an unbroken one would. What lives around the loop
    (a stage's curve, its MLflow run) is `attach`ed and saved with every state, so a resumed stage
    continues its records instead of starting new ones.
    """

    def __init__(self, path: str | os.PathLike, inputs: dict, every: int, label: str = "resume"):
        self.path = Path(path)
        self.inputs = inputs
        self.every = every
        self.label = label  # who speaks in the one-line messages (the stage)
        self.attached: dict[str, object] = {}

    @property
    def shown(self) -> str:
        """The file relative to the working directory (a stage's is the repository), as a person types it."""
        return os.path.relpath(self.path)

    def load(self) -> dict | None:
        """The saved state, if there is one saved for these inputs; any other file is deleted."""
        if not self.path.is_file():
            return None
        try:
            payload = load_checkpoint(self.path, "resume")
        except CheckpointError as error:
            reason = str(error)
        else:
            saved = payload.get("inputs", {})
            changed = sorted(key for key in {*saved, *self.inputs} if saved.get(key) != self.inputs.get(key))
            if not changed:
                return payload["state"]
            named = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            reason = f"{self.shown} was saved for other inputs ({named})"
        print(f"{self.label}: {reason}; starting from step 0")
        self.clear()
        return None

    def attach(self, **stateful) -> None:
        """Save each object's state (`state_dict`) with every state from now on, and give it its
        saved state now (`load_state_dict`) if there is one to resume."""
        state = self.load()
        for name, target in stateful.items():
            if state is not None:
                target.load_state_dict(state[name])
            self.attached[name] = target

    def restore(self, total: int, **stateful) -> dict:
        """Load the saved state into each object (a module, optimizer or schedule), saying so in one
        line; return the saved values: `step` (0 when nothing was saved) and any `extra` given to
        `maybe_save`. `total` is the loop's last step, for the message."""
        state = self.load()
        if state is None:
            return {"step": 0}
        for name, target in stateful.items():
            target.load_state_dict(state[name])
        torch.set_rng_state(state["rng"])
        print(f"{self.label}: resuming from step {state['step']} of {total} ({self.shown})")
        return state

    def maybe_save(self, step: int, extra: dict | None = None, **stateful) -> None:
        """Every `every` steps, `save`."""
        if self.every and step % self.every == 0:
            self.save(step, extra, **stateful)

    def save(self, step: int, extra: dict | None = None, **stateful) -> None:
        """Save each object's state dict (the attached ones too), the RNG state and `extra` (tensors
        and plain values). Under torchrun rank 0 alone saves: the ranks hold the same state."""
        if not is_main():
            return
        state = {"step": step, "rng": torch.get_rng_state(), **(extra or {})}
        state.update({name: target.state_dict() for name, target in {**self.attached, **stateful}.items()})
        save_checkpoint(self.path, {"kind": "resume", "inputs": self.inputs, "state": state})

    def clear(self) -> None:
        if is_main():
            self.path.unlink(missing_ok=True)
