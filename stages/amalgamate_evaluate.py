"""Stage amalgamate_evaluate: the amalgamation side by side on the real test split (all classes).

Writes amalgamation/metrics.json (for `dvc metrics show`): each teacher on its own classes; the naive
combination of the teachers (the more confident one decides) and their label union (the combined
prediction the student learns, the teachers' logits lowered by their offsets; also without them);
the group-stack student (PyTorch and ONNX) and its end-to-end ablation; the single 10-class teacher
of the main pipeline (the reference, trained on all the data); sizes, FLOPs and the student's margin
over the naive combination. Plus the student's confusion matrix.
"""


import mlflow
import numpy as np
import torch

from dfkd.amalgamation import naive_combination, offset_logits
from dfkd.classifier import load_classifier
from dfkd.evaluation import confusion_matrix, file_size, flops_per_image, onnx_latency_ms, parameter_count
from dfkd.export import onnx_logits, onnx_session
from dfkd.models import LabelUnion
from dfkd.train import predict
from stages.amalgamate_conflicts import load_conflicts
from stages.amalgamate_export import ONNX_PATH
from stages.amalgamate_student import TRAININGS
from stages.amalgamate_teachers import TEACHERS, load_teachers
from stages.common import MODELS, REPORTS, data_spec, load_model_input, run, setup
from stages.evaluate import write_confusion_reports, write_json
from stages.params import ROOT, load_params
from stages.tracking import stage_run

OUT = REPORTS / "amalgamation" / "evaluate"
METRICS = ROOT / "amalgamation" / "metrics.json"
REFERENCE = MODELS / "teacher.pt"  # the main pipeline's teacher: one LeNet-5 on all the classes


def size(model: torch.nn.Module, input_shape: tuple[int, ...]) -> dict:
    return {"parameters": parameter_count(model), "flops": flops_per_image(model, input_shape)}


def main() -> None:
    params = load_params()
    device = setup(params)
    teachers = load_teachers(params)
    students = {training: load_classifier(path).model for training, (_, path) in TRAININGS.items()}
    reference = load_classifier(REFERENCE).model
    session = onnx_session(ONNX_PATH)
    images, labels = load_model_input("test", data_spec(params.teacher.image_size))
    input_shape = tuple(images.shape[1:])
    groups = students["group_stack"].config.groups

    with stage_run("amalgamate_evaluate", {"seed": params.seed}, params.mlflow.experiment):
        accuracy = lambda predicted: float((predicted == labels).float().mean())  # noqa: E731
        teacher_logits = [predict(teacher.model, images, device) for teacher in teachers.values()]
        metrics: dict = {"seed": params.seed, "test_size": len(labels), "teachers": {}}
        for (name, teacher), group, logits in zip(teachers.items(), groups, teacher_logits):
            metrics["teachers"][name] = {
                "classes": list(group),
                "own_class_accuracy": accuracy_on_own(logits, group, labels),
                "own_class_images": int(torch.isin(labels, torch.tensor(group)).sum()),
                **size(teacher.model, input_shape),
                "checkpoint_bytes": file_size(TEACHERS / f"{name}.pt"),
            }
        naive = naive_combination(teacher_logits, groups)
        together = {key: sum(t[key] for t in metrics["teachers"].values()) for key in ("parameters", "flops")}
        metrics["naive_combination"] = {"accuracy": accuracy(naive), **together}
        union, offsets = LabelUnion(groups), load_conflicts(list(teachers))[1]
        metrics["teachers_label_union"] = {"accuracy": accuracy(union(offset_logits(teacher_logits, offsets)).argmax(1)),
                                           "offsets": dict(zip(teachers, offsets)), **together}
        metrics["teachers_raw_label_union"] = {"accuracy": accuracy(union(teacher_logits).argmax(1)), **together}

        for training, student in students.items():
            with torch.no_grad():
                _, head_logits, union_logits = student.to(device).eval().forward_all(images.to(device))
            predicted = union_logits.argmax(1).cpu()
            key = "student" if training == "group_stack" else f"student_{training}"
            metrics[key] = {
                "accuracy": accuracy(predicted),
                "agreement_with_naive": float((predicted == naive).float().mean()),
                **size(student, input_shape),
                "checkpoint_bytes": file_size(TRAININGS[training][1]),
                "head_own_class_accuracy": {
                    name: accuracy_on_own(head.cpu(), group, labels)
                    for name, head, group in zip(teachers, head_logits, groups)
                },
            }
        student = metrics["student"]
        onnx_predicted = torch.from_numpy(onnx_logits(session, images).argmax(1))
        student["onnx_accuracy"] = accuracy(onnx_predicted)
        student["onnx_bytes"] = file_size(ONNX_PATH)
        for batch in (1, 256):
            student[f"onnx_latency_batch{batch}_p50_ms"] = onnx_latency_ms(session, input_shape, batch, params.evaluate.latency_repeats)["p50_ms"]
        metrics["reference"] = {"accuracy": accuracy(predict(reference, images, device).argmax(1)), **size(reference, input_shape)}
        metrics["student_above_naive"] = student["accuracy"] - metrics["naive_combination"]["accuracy"]
        metrics["student_above_end_to_end"] = student["accuracy"] - metrics["student_end_to_end"]["accuracy"]
        metrics["student_parameter_ratio"] = student["parameters"] / together["parameters"]

        predicted = predict(students["group_stack"], images, device).argmax(1).numpy()
        matrix = confusion_matrix(predicted, labels.numpy(), students["group_stack"].config.num_classes)
        write_json(METRICS, metrics)
        per_class = write_confusion_reports(OUT, labels.numpy(), predicted, matrix, "Amalgamated student on the real test split")

        headline = headline_metrics(metrics)
        mlflow.log_metrics({**headline, "student_onnx_accuracy": student["onnx_accuracy"],
                            "student_parameters": student["parameters"], "teachers_parameters": together["parameters"],
                            **{f"student_class_{k}_accuracy": v for k, v in enumerate(per_class) if not np.isnan(v)}})
        mlflow.log_artifact(str(METRICS))
        mlflow.log_artifacts(str(OUT), "reports")
        parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
        client = mlflow.tracking.MlflowClient()
        for name, value in headline.items():
            client.log_metric(parent, name, value)
        print("amalgamate_evaluate: " + ", ".join(f"{k} {v:.4f}" for k, v in headline.items()))


def headline_metrics(metrics: dict) -> dict[str, float]:
    """The figures that put amalgamation runs side by side, logged on the parent run too."""
    return {
        "amalgamation_naive_accuracy": metrics["naive_combination"]["accuracy"],
        "amalgamation_student_accuracy": metrics["student"]["accuracy"],
        "amalgamation_end_to_end_accuracy": metrics["student_end_to_end"]["accuracy"],
        "amalgamation_reference_accuracy": metrics["reference"]["accuracy"],
    }


def accuracy_on_own(logits: torch.Tensor, group: tuple[int, ...], labels: torch.Tensor) -> float:
    """A head (or teacher) on the test images of its own classes only."""
    own = torch.isin(labels, torch.tensor(group))
    return float((torch.tensor(group)[logits[own].argmax(1)] == labels[own]).float().mean())


if __name__ == "__main__":
    run(main)
