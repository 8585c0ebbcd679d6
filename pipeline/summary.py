"""The one-screen summary of a pipeline run, from metrics.json: teacher, floor, DAFL, ceiling."""

import json

from stages.params import ROOT

METRICS_FILE = ROOT / "metrics.json"

ROWS = [
    ("teacher", "teacher (LeNet-5, real data)"),
    ("baseline_noise", "floor: student on Gaussian noise"),
    ("student", "student on synthetic data"),
    ("baseline_real", "ceiling: student on real train data"),
]


def load_metrics() -> dict:
    return json.loads(METRICS_FILE.read_text())


def summary_table(metrics: dict) -> str:
    """Markdown, so the same text reads well in a terminal and as a Prefect artifact."""
    lines = [
        f"### Data-free distillation, seed {metrics['seed']}, {metrics['test_size']} real test images",
        "",
        "| model | test accuracy | gap to teacher | agreement with teacher | parameters | FLOPs/image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in ROWS:
        row = metrics[key]
        gap = f"{row['gap_to_teacher'] * 100:.2f} pt" if "gap_to_teacher" in row else ""
        agreement = f"{row['teacher_agreement']:.2%}" if "teacher_agreement" in row else ""
        lines.append(
            f"| {label} | {row['accuracy']:.2%} | {gap} | {agreement} | {row['parameters']:,} | {row['flops']:,} |"
        )
    student = metrics["student"]
    lines += [
        "",
        f"- synthetic-data student: {metrics['student_above_noise'] * 100:+.2f} pt above the noise floor; "
        f"ONNX accuracy {student['onnx_accuracy']:.2%}, {student['onnx_bytes']:,} bytes",
        f"- ONNX latency (p50): batch 1 {student['onnx_latency_batch1_p50_ms']:.3f} ms, "
        f"batch 256 {student['onnx_latency_batch256_p50_ms']:.2f} ms",
    ]
    if "stage_seconds" in metrics:
        seconds = metrics["stage_seconds"]
        lines.append(
            f"- wall time: synthesis {seconds['synthesize']:.0f} s, distillation {seconds['distill']:.0f} s, "
            f"whole pipeline {sum(seconds.values()):.0f} s"
        )
    if "promotion" in metrics:
        lines.append(metrics["promotion"])
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary_table(load_metrics()))
