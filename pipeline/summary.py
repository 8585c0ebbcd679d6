"""The one-screen summary of a pipeline run, from metrics.json: teacher, floor, DAFL, ceiling; and of
an amalgamation run, from amalgamation/metrics.json: teachers, their naive combination, the students."""

import json

from stages.params import ROOT

METRICS_FILE = ROOT / "metrics.json"
AMALGAMATION_METRICS_FILE = ROOT / "amalgamation" / "metrics.json"

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
    lines += reused_line(metrics)
    if "promotion" in metrics:
        lines.append(metrics["promotion"])
    return "\n".join(lines)


def reused_line(metrics: dict) -> list[str]:
    """Which stages DVC did not run (up to date, or restored from its run-cache), if any."""
    reused = metrics.get("reused_stages")
    return [f"- reused by DVC, not run: {', '.join(reused)}"] if reused else []


def load_amalgamation_metrics() -> dict:
    return json.loads(AMALGAMATION_METRICS_FILE.read_text())


def amalgamation_table(metrics: dict) -> str:
    """Markdown: every teacher on its own classes, then everything on all the classes."""
    teachers = metrics["teachers"]
    naive = metrics["naive_combination"]
    lines = [
        f"### Data-free amalgamation of {len(teachers)} teachers, seed {metrics['seed']}, "
        f"{metrics['test_size']} real test images",
        "",
        "| model | classes | test accuracy | vs naive combination | parameters | FLOPs/image |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, row in teachers.items():
        lines.append(f"| teacher '{name}' (own classes only) | {row['classes']} | {row['own_class_accuracy']:.2%} | "
                     f"| {row['parameters']:,} | {row['flops']:,} |")
    rows = [
        ("naive_combination", "naive combination (the more confident teacher decides)"),
        ("student_end_to_end", "ablation: student trained end to end only"),
        ("student", "student, group-stack training"),
        ("reference", "reference: one teacher trained on all the data"),
    ]
    for key, label in rows:
        row = metrics[key]
        versus = f"{(row['accuracy'] - naive['accuracy']) * 100:+.2f} pt" if key != "naive_combination" else ""
        lines.append(f"| {label} | all | {row['accuracy']:.2%} | {versus} | {row['parameters']:,} | {row['flops']:,} |")
    student = metrics["student"]
    lines += [
        "",
        f"- the student has {student['parameters']:,} parameters, {metrics['student_parameter_ratio']:.0%} of the "
        f"teachers' {naive['parameters']:,} together; ONNX accuracy {student['onnx_accuracy']:.2%}",
    ]
    if "stage_seconds" in metrics:
        lines.append(f"- wall time: whole amalgamation pipeline {sum(metrics['stage_seconds'].values()):.0f} s")
    return "\n".join(lines + reused_line(metrics))


if __name__ == "__main__":
    print(summary_table(load_metrics()))
