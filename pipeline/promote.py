"""The quality gate that ends the pipeline: promote the exported student to the serving alias only if
it passes the thresholds in params.yaml (`promote`), else keep it registered, tag it with the reasons,
and leave the alias on the version that holds it.

The export stage registers every exported student with `mlflow.alias` (candidate); this step reads
metrics.json (evaluate) and reports/export/parity.json (export) and moves `promote.alias` (champion).

    python -m pipeline.promote       # after `dvc repro`; exit code 1 when the student is not promoted
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.summary import METRICS_FILE
from stages.export import ONNX_PATH, ONNX_SHA256_TAG, OUT as EXPORT_REPORTS
from stages.params import Params, PromoteParams, load_params
from stages.tracking import configure

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
    candidate = client.get_model_version_by_alias(name, params.mlflow.alias)
    failures = gate_failures(
        json.loads(metrics_file.read_text()), json.loads(parity_file.read_text()), params.promote, params.export.max_abs_diff
    )
    if candidate.tags.get(ONNX_SHA256_TAG) != hashlib.sha256(onnx_file.read_bytes()).hexdigest():
        failures.append(f"{name} v{candidate.version} @{params.mlflow.alias} is not the evaluated {onnx_file.name}")
    if not failures:
        client.set_registered_model_alias(name, alias, candidate.version)
    client.set_model_version_tag(name, candidate.version, GATE_TAG, "failed" if failures else "passed")
    client.set_model_version_tag(name, candidate.version, REASONS_TAG, "; ".join(failures) or "every check passed")
    serving = client.get_registered_model(name).aliases.get(alias)
    return Promotion(name, str(candidate.version), alias, not failures, failures, str(serving) if serving else None)


def main() -> None:
    promotion = promote(load_params())
    print(promotion.report())
    sys.exit(0 if promotion.promoted else 1)


if __name__ == "__main__":
    main()
