"""The quality gate that ends the pipeline: promote the exported student to the serving alias only if
it passes the thresholds in params.yaml (`promote`), else keep it registered, tag it with the reasons,
and leave the alias on the version that holds it.

The export stage registers every exported student with `mlflow.alias` (candidate) and tags it with
the sha256 of its ONNX file; this step reads metrics.json (evaluate) and reports/export/parity.json
(export), and gates the registered version of the ONNX file on disk, found by that hash: when DVC
restores a student from its run-cache instead of running the export (`dvc exp run -S
synthesize.method=zskd`, then back to `dafl`), the file on disk is an earlier version, and
`candidate` is moved back to it before the gate.

    python -m pipeline.promote       # after `dvc repro`; exit code 1: not promoted, 2: nothing to gate
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from pipeline.summary import METRICS_FILE
from stages.export import ONNX_PATH, ONNX_SHA256_TAG, OUT as EXPORT_REPORTS
from stages.params import Params, ParamsError, PromoteParams, load_params
from stages.tracking import TrackingError, configure

GATE_TAG = "dfkd.gate"
REASONS_TAG = "dfkd.gate_reasons"


def gate_failures(metrics: dict, parity: dict, thresholds: PromoteParams, max_abs_diff: float) -> list[str]:
    """Why the student may not be served (empty: it passes). The served model is the ONNX file,
    so its accuracy on the real test split is what is held to the thresholds."""
    accuracy = metrics["student"]["onnx_accuracy"]
    gap = metrics["teacher"]["accuracy"] - accuracy
    failures = []
    if accuracy < thresholds.min_accuracy:
        failures.append(f"ONNX student accuracy {accuracy:.2%} is below promote.min_accuracy {thresholds.min_accuracy:.2%}")
    if gap > thresholds.max_gap_to_teacher:
        failures.append(
            f"gap to the teacher {gap * 100:.2f} pt is above promote.max_gap_to_teacher "
            f"{thresholds.max_gap_to_teacher * 100:.2f} pt"
        )
    if parity["max_abs_diff"] > max_abs_diff or parity["argmax_mismatches"]:
        failures.append(
            f"ONNX parity: max |logit difference| {parity['max_abs_diff']:.3g} (export.max_abs_diff {max_abs_diff:g}), "
            f"{parity['argmax_mismatches']} argmax mismatches"
        )
    return failures


class PromotionError(RuntimeError):
    """Nothing that can be gated (no reports, or no registered version of the ONNX file); the message says
    what to run. Distinct from a student that was gated and not promoted."""


@dataclass(frozen=True)
class Promotion:
    model: str
    version: str  # the version this run evaluated
    alias: str
    promoted: bool
    failures: list[str]
    serving_version: str | None  # the version holding the alias after this step

    def report(self) -> str:
        """Markdown lines for the summary (terminal and Prefect artifact)."""
        if self.promoted:
            return f"- promotion: {self.model} v{self.version} passed the gate and is now @{self.alias}"
        holder = f"stays on v{self.serving_version}" if self.serving_version else "is on no version yet"
        lines = [f"- promotion: {self.model} v{self.version} NOT promoted; @{self.alias} {holder}. Failed checks:"]
        return "\n".join(lines + [f"  - {failure}" for failure in self.failures])


def existing(path: Path) -> Path:
    if not path.is_file():
        raise PromotionError(f"{path}: does not exist; run the pipeline (`dvc repro`) before the gate")
    return path


def registered_version(client: MlflowClient, name: str, onnx_file: Path) -> ModelVersion:
    """The newest version of `name` whose ONNX file is byte for byte `onnx_file`."""
    digest = hashlib.sha256(existing(onnx_file).read_bytes()).hexdigest()
    versions = client.search_model_versions(f"name = '{name}' and tags.`{ONNX_SHA256_TAG}` = '{digest}'")
    if not versions:
        raise PromotionError(
            f"{onnx_file}: no version of '{name}' in {mlflow.get_tracking_uri()} is this file (none is tagged with "
            "its sha256): DVC restored it without running the export; `dvc repro --force export` registers it"
        )
    return max(versions, key=lambda version: int(version.version))


def promote(
    params: Params,
    metrics_file: Path = METRICS_FILE,
    parity_file: Path = EXPORT_REPORTS / "parity.json",
    onnx_file: Path = ONNX_PATH,
) -> Promotion:
    """Run the gate on the evaluation and export reports and move (or not) the alias in the registry."""
    configure(params.mlflow.experiment)
    client = MlflowClient()
    name, alias = params.mlflow.registered_model, params.promote.alias
    candidate = registered_version(client, name, onnx_file)
    metrics, parity = (json.loads(existing(path).read_text()) for path in (metrics_file, parity_file))
    failures = gate_failures(metrics, parity, params.promote, params.export.max_abs_diff)
    client.set_registered_model_alias(name, params.mlflow.alias, candidate.version)
    if not failures:
        client.set_registered_model_alias(name, alias, candidate.version)
    client.set_model_version_tag(name, candidate.version, GATE_TAG, "failed" if failures else "passed")
    client.set_model_version_tag(name, candidate.version, REASONS_TAG, "; ".join(failures) or "every check passed")
    serving = client.get_registered_model(name).aliases.get(alias)
    return Promotion(name, str(candidate.version), alias, not failures, failures, str(serving) if serving else None)


def main() -> None:
    try:
        promotion = promote(load_params())
    except (ParamsError, PromotionError, TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(promotion.report())
    sys.exit(0 if promotion.promoted else 1)


if __name__ == "__main__":
    main()
