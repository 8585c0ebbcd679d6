"""Throughput of the training stages on the device at hand, for a person with a GPU: images per
second of teacher training, of two synthesis methods (DAFL, a generator; DeepInversion, images
optimised directly) and of distillation, and the share of the device's peak each reaches.

The setting is DAFL's CIFAR-10 one (ResNet-34 teacher, ResNet-18 student, 3x32x32, 10 classes) on
random weights and random images: throughput does not depend on what the weights have learnt.
Each stage runs through the library's own loop (dfkd/), so mixed precision, channels-last and
batches on the device are what the pipeline uses; `--compile` measures them as `compile: true` in
params.yaml runs them (teacher training and distillation under torch.compile; synthesis as it is).
The peak is measured, not taken from a datasheet: a large matmul in the loops' precision (bf16 on
CUDA where supported, else fp16; fp32 on the CPU). Achieved FLOP/s count a forward pass as the
model's FLOPs per image, a backward pass as twice that where it computes weight gradients, and as
once that where it only reaches the images (through the frozen teacher).
Prints the table and writes it to BENCHMARKS.md with the device and the date. Not part of the tests.

    python benchmarks/gpu.py                   # on CUDA when there is a GPU
    python benchmarks/gpu.py --compile --steps 50
"""

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: the table is the output

import torch  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from benchmarks.report import machine, write_section  # noqa: E402
from dfkd.classifier import freeze  # noqa: E402
from dfkd.distill import DistillConfig, distill  # noqa: E402
from dfkd.evaluation import flops_per_image  # noqa: E402
from dfkd.inputs import InputSpec  # noqa: E402
from dfkd.models import Generator  # noqa: E402
from dfkd.runtime import amp_dtype, resolve_device  # noqa: E402
from dfkd.synthesis import GaussianNoise, dafl, deepinversion  # noqa: E402
from dfkd.teacher import Teacher  # noqa: E402
from dfkd.train import TeacherTrainConfig, train_classifier  # noqa: E402
from dfkd.zoo import ModelConfig, build_model  # noqa: E402

SPEC = InputSpec(channels=3, size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261),
                 class_names=tuple(f"class {i}" for i in range(10)))
SHAPE = (SPEC.channels, SPEC.size, SPEC.size)


def synchronised(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work) -> float:
    synchronised(device)
    start = time.perf_counter()
    work()
    synchronised(device)
    return time.perf_counter() - start


def peak_flops(device: torch.device) -> tuple[float, str]:
    """FLOP/s of a large matmul in the training loops' precision: the ceiling they are measured against."""
    dtype = amp_dtype() if device.type == "cuda" else torch.float32
    side = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    repeats = 20 if device.type == "cuda" else 3
    seconds = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * side**3 * repeats / seconds, str(dtype).removeprefix("torch.")


def model(name: str, device: torch.device) -> torch.nn.Module:
    return build_model(ModelConfig(architecture=name), SPEC.channels, SPEC.size, len(SPEC.class_names)).to(device)


def measure(device: torch.device, batch: int, steps: int, compiled: bool) -> list[dict]:
    """Each stage twice, a short run to warm up (kernels chosen, graphs compiled), then the timed one."""
    teacher_flops, student_flops = (
        flops_per_image(build_model(ModelConfig(architecture=name), SPEC.channels, SPEC.size, 10), SHAPE)
        for name in ("resnet34", "resnet18")
    )
    generator_flops = flops_per_image(Generator(latent_dim=100, image_size=SPEC.size, channels=SPEC.channels, width=128), (100,))
    results = []

    def teacher_training(run_steps: int) -> None:
        images = torch.randn(batch * run_steps, *SHAPE)
        labels = torch.randint(0, 10, (batch * run_steps,))
        config = TeacherTrainConfig(epochs=1, batch_size=batch)
        train_classifier(model("resnet34", device), images, labels, images[:batch], labels[:batch], config, device,
                         compiled=compiled)

    results.append(run_stage(device, "teacher training (ResNet-34)", teacher_training, batch, steps, 3 * teacher_flops))

    teacher = Teacher(freeze(model("resnet34", device)), SPEC)

    def dafl_synthesis(run_steps: int) -> None:
        config = dafl.DAFLConfig(steps=run_steps, batch_size=batch, generator_width=128)
        dafl.synthesize(teacher, config, device)

    # A generator step: the generator forward and backward, the teacher forward and backward to the images.
    results.append(run_stage(device, "DAFL synthesis (generator 128)", dafl_synthesis, batch, steps,
                             3 * generator_flops + 2 * teacher_flops))

    def deepinversion_synthesis(run_steps: int) -> None:
        config = deepinversion.DeepInversionConfig(images=batch, batch_size=batch, steps=run_steps)
        deepinversion.synthesize(teacher, config, device)

    results.append(run_stage(device, "DeepInversion synthesis", deepinversion_synthesis, batch, steps, 2 * teacher_flops))

    def distillation(run_steps: int) -> None:
        config = DistillConfig(steps=run_steps, batch_size=batch)
        distill(model("resnet18", device), teacher.model, GaussianNoise(SHAPE), config, device, compiled=compiled)

    results.append(run_stage(device, "distillation (ResNet-18 student)", distillation, batch, steps,
                             teacher_flops + 3 * student_flops))
    return results


def run_stage(device: torch.device, name: str, work, batch: int, steps: int, flops_per_sample: int) -> dict:
    work(2)
    seconds = timed(device, lambda: work(steps))
    images_per_second = batch * steps / seconds
    print(f"  {name}: {images_per_second:,.0f} images/s", flush=True)
    return {"stage": name, "images_per_second": images_per_second, "flops_per_second": images_per_second * flops_per_sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is a GPU), cuda or cpu")
    parser.add_argument("--batch", type=int, default=256, help="images per step (DAFL's CIFAR batch: 256)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    parser.add_argument("--compile", action="store_true", help="teacher training and distillation under torch.compile")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    peak, precision = peak_flops(device)
    results = measure(device, args.batch, args.steps, args.compile)
    lines = [
        f"{date.today().isoformat()}, {name}, torch {torch.__version__}{', torch.compile' if args.compile else ''}; "
        f"CIFAR-10 setting, batch {args.batch}, {args.steps} timed steps a stage; measured peak "
        f"{peak / 1e12:.1f} TFLOP/s ({precision} matmul).",
        "",
        "| stage | images/s | TFLOP/s | share of the measured peak |",
        "|---|---:|---:|---:|",
    ]
    for result in results:
        lines.append(f"| {result['stage']} | {result['images_per_second']:,.0f} | "
                     f"{result['flops_per_second'] / 1e12:.2f} | {result['flops_per_second'] / peak:.1%} |")
    table = "\n".join(lines)
    print("\n" + table)
    section = "gpu_compiled" if args.compile else "gpu"
    write_section(section, f"## Training throughput on {device.type.upper()}{' (torch.compile)' if args.compile else ''}\n\n{table}")


if __name__ == "__main__":
    main()
