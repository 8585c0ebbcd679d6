"""Data-free knowledge amalgamation (DFKA, Ye et al., CVPR 2020): several teachers, each for its own
classes, into one compact multi-branch student (the TargetNet, dfkd/models.py), without their data.

1. A DAFL generator is trained against all the teachers as fixed discriminators: DAFL's one-hot,
   activation and information-entropy losses per teacher, averaged, plus the information entropy
   of the combined prediction over the union of labels, so the images cover every teacher's classes
   in balance.
   Not in the paper: "conflict images" join them (`synthesize_conflicts`), each optimised from noise
   until every teacher takes it for one of its own classes. Real digits of one teacher's classes
   often look like another's to that other teacher (a 9 is a 4 to the 0-4 teacher); the generator
   makes few such images, and without them the student cannot learn which teacher to believe.
2. Group-stack training of the TargetNet on those images, starting from the teachers' own weights
   (`start_from_teachers`): its trunk block by block (each block,
   on top of the blocks already trained, reproduces every teacher's features at that depth through
   a 1x1 adapter per teacher that is dropped afterwards; the phase starts with the adapters fitted
   by least squares, `fit_adapters`), then its heads on the teachers' outputs,
   then everything end to end. The ablation trains the same network end to end only.

The teachers' outputs are combined over the union of their labels with `LabelUnion`: a softmax over
all their logits side by side, each teacher's logits first lowered by its offset (`teacher_offsets`,
measured on the conflict images) so that no teacher outbids the others by the arbitrary level of its
logits. The baseline it is compared with, `naive_combination`, lets the more confident teacher decide.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfkd.augment import random_affine
from dfkd.checkpoint import ResumeState
from dfkd.distill import draw_pool
from dfkd.inputs import InputSpec
from dfkd.losses import information_entropy_loss, kd_loss
from dfkd.models import LabelUnion, TargetNet
from dfkd.runtime import autocast, check_finite, grad_scaler, on_device
from dfkd.synthesis import FixedImages, TransferSet
from dfkd.synthesis.dafl import (
    DAFLConfig,
    GeneratorTransferSet,
    dafl_losses,
    layers_to_match,
    train_generator,
    weighted_total,
)
from dfkd.synthesis.zskd import initial_pixels, optimise_images, total_variation
from dfkd.teacher import Teacher

ADAPTER_FIT_IMAGES = 2048  # transfer-set images the adapters are fitted on at the start of each block phase
GROUP_STACK = "group-stack training"  # who needs the teachers' blocks, for the error of a teacher without


class AmalgamationError(ValueError):
    """Teachers that cannot be amalgamated together; the message names the teacher and the problem."""


def check_teachers(specs: dict[str, InputSpec], classes: dict[str, list[int]]) -> None:
    """Every teacher must take the same input (shape and normalisation) and have one output per
    class it is declared with; `specs` are their inputs by name."""
    names = list(specs)
    first = specs[names[0]]
    for name, spec in specs.items():
        if (spec.shape, spec.mean, spec.std) != (first.shape, first.mean, first.std):
            raise AmalgamationError(
                f"teacher '{name}' takes {'x'.join(map(str, spec.shape))} inputs normalised by mean {list(spec.mean)}, "
                f"std {list(spec.std)} but teacher '{names[0]}' takes {'x'.join(map(str, first.shape))} by mean "
                f"{list(first.mean)}, std {list(first.std)}: amalgamated teachers must share one input"
            )
        if spec.num_classes != len(classes[name]):
            raise AmalgamationError(
                f"teacher '{name}' has {spec.num_classes} outputs but is declared with "
                f"{len(classes[name])} classes {classes[name]}"
            )


def naive_combination(logits: list[torch.Tensor], groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The baseline: the teacher with the highest top-class probability decides; returns global labels."""
    confidence, local = zip(*(F.softmax(z, dim=1).max(dim=1) for z in logits))
    winner = torch.stack(confidence, dim=1).argmax(dim=1)
    lookup = [torch.tensor(group)[index] for group, index in zip(groups, local)]  # each teacher's global label
    return torch.stack(lookup, dim=1).gather(1, winner.unsqueeze(1)).squeeze(1)


class GeneratorConfig(DAFLConfig):
    # DAFL's terms are averaged over the teachers (the batch-norm term over those with batch norm);
    # this one balances the combined prediction over the union of labels, so no teacher's classes are
    # left out of the generated set.
    union_entropy_weight: float = Field(5.0, ge=0)


def generator_losses(
    teachers: list[Teacher], union: LabelUnion, images: torch.Tensor, matched_layers: list[list[str]] | None = None
) -> dict[str, torch.Tensor]:
    """DAFL's terms for each teacher (with the batch-norm term over teacher i's `matched_layers[i]`),
    each averaged over the teachers that have it, and the information entropy of the combined
    prediction over the union of labels (unweighted)."""
    layers = matched_layers or [[] for _ in teachers]
    logits, terms = zip(*(dafl_losses(teacher, images, names) for teacher, names in zip(teachers, layers)))
    names = dict.fromkeys(name for term in terms for name in term)
    losses = {name: torch.stack([term[name] for term in terms if name in term]).mean() for name in names}
    losses["union_entropy"] = information_entropy_loss(union(list(logits)))
    return losses


def synthesize(
    teachers: list[Teacher],
    groups: tuple[tuple[int, ...], ...],
    config: GeneratorConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> GeneratorTransferSet:
    """Train one DAFL generator against all `teachers` (frozen, eval mode; teacher i predicts `groups[i]`)."""
    teachers = [on_device(teacher, device) for teacher in teachers]
    union = LabelUnion(groups).to(device)
    layers = [layers_to_match(teacher, config) for teacher in teachers]

    def generator_loss(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses = generator_losses(teachers, union, images, layers)
        return weighted_total(losses, config) + config.union_entropy_weight * losses["union_entropy"], losses

    return train_generator(generator_loss, teachers[0].spec.shape, config, device, on_step, resume)


class ConflictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    images: int = Field(2500, gt=0)
    batch_size: int = Field(1000, gt=0)  # optimised together
    steps: int = Field(200, gt=0)  # Adam steps per batch
    lr: float = Field(0.01, gt=0)  # Adam, on pixel intensities in [0, 1]
    total_variation_weight: float = Field(0.5, ge=0)  # smoothness prior, as for ZSKD's impressions


def synthesize_conflicts(
    teachers: list[Teacher],
    config: ConflictConfig,
    device: torch.device,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> FixedImages:
    """Images that every teacher takes for one of its own classes, each teacher's class drawn at
    random per image: optimised from noise (frozen teachers, eval mode), a batch at a time; a killed
    run resumes after its last finished batch. Which teacher is right is left to the teachers'
    outputs on them, as on any transfer image."""
    teachers = [on_device(teacher, device) for teacher in teachers]
    spec = teachers[0].spec
    # Drawn before any resume: the same seed gives the same classes, so a resumed run keeps them.
    wanted = [torch.randint(teacher.spec.num_classes, (config.images,)).to(device) for teacher in teachers]

    def batch_loss(pixels: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = spec.normalise(pixels)
        disagreement = sum(F.cross_entropy(teacher(inputs), classes[rows]) for teacher, classes in zip(teachers, wanted))
        return disagreement + config.total_variation_weight * total_variation(pixels).mean(), disagreement / len(teachers)

    images = optimise_images(batch_loss, lambda count: initial_pixels("normal", count, spec, device), spec, config.images,
                             config.batch_size, config.steps, config.lr, "conflict images", on_step, resume)
    return FixedImages(images)


def teacher_offsets(logits: list[torch.Tensor]) -> list[float]:
    """Each teacher's mean log-partition (log-sum-exp of its `logits`) on images that every teacher
    claims as its own (the conflict images), to subtract from its logits before the label union.

    A softmax does not change when one constant is added to all of a classifier's logits, so the
    levels of separately trained teachers' logits are arbitrary against one another; the union
    compares them directly and would favour whichever teacher happens to sit highest. Lowered by
    these offsets, the teachers stand level where they all claim an image."""
    return [torch.logsumexp(teacher_logits, dim=1).mean().item() for teacher_logits in logits]


def offset_logits(logits: list[torch.Tensor], offsets: list[float]) -> list[torch.Tensor]:
    return [teacher_logits - offset for teacher_logits, offset in zip(logits, offsets)]


class StudentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Group-stack schedule: each trunk block, then the heads, then end to end. The ablation trains
    # end to end for the same total number of steps. The block-wise phases are short because the
    # student starts from the teachers' weights: 300 steps a phase led it further from them than
    # the end-to-end phase brought it back (validation split; BENCHMARKS.md).
    block_steps: int = Field(100, gt=0)
    head_steps: int = Field(100, gt=0)
    end_to_end_steps: int = Field(2300, gt=0)
    batch_size: int = Field(256, gt=1)
    lr: float = Field(5e-3, gt=0)  # Adam, cosine decay to zero within each phase
    temperature: float = Field(4.0, gt=0)
    pool_size: int = Field(49152, ge=0)  # generated images drawn once and reused; 0: fresh every step
    augment_shift: float = Field(2.0, ge=0)  # random shift, pixels; the teachers see the shifted image
    # The trunk starts as the first teacher's conv layers and head i as teacher i's classifier, rather
    # than at random: weights learnt on real images generalise to them better than any learnt on
    # synthetic ones. Needs teachers of the TargetNet's own LeNet-5 width.
    start_from_teachers: bool = True

    def phases(self, group_stack: bool, blocks: int) -> list[tuple[str, int]]:
        if not group_stack:
            return [("end_to_end", blocks * self.block_steps + self.head_steps + self.end_to_end_steps)]
        return [(f"block{b + 1}", self.block_steps) for b in range(blocks)] + [
            ("heads", self.head_steps),
            ("end_to_end", self.end_to_end_steps),
        ]


def copy_teacher_weights(student: TargetNet, teachers: list[Teacher]) -> None:
    """The trunk from the first teacher's conv layers, head i from teacher i's fully connected ones
    (LeNet-5 teachers: the TargetNet is a LeNet-5 trunk with LeNet-5 heads)."""
    convs = [layer for layer in teachers[0].model.modules() if isinstance(layer, nn.Conv2d)]
    linears = [[layer for layer in teacher.model.modules() if isinstance(layer, nn.Linear)] for teacher in teachers]
    if len(convs) != len(student.blocks) or any(len(layers) != 2 for layers in linears):
        raise AmalgamationError(
            "cannot start the student from the teachers: that needs LeNet-5 teachers (3 conv and 2 linear layers); "
            "turn start_from_teachers off"
        )
    pairs = [(block[0], conv) for block, conv in zip(student.blocks, convs)]
    for head, (hidden, classifier) in zip(student.heads, linears):
        pairs += [(head[0], hidden), (head[2], classifier)]
    for mine, theirs in pairs:
        if mine.weight.shape != theirs.weight.shape:
            raise AmalgamationError(
                f"cannot start the student from the teachers: a layer of {tuple(mine.weight.shape)} against the "
                f"teacher's {tuple(theirs.weight.shape)}; use teachers of the student's width or turn start_from_teachers off"
            )
        mine.load_state_dict(theirs.state_dict())


def feature_adapters(student: TargetNet, teachers: list[Teacher]) -> nn.ModuleList:
    """adapters[b][t] maps the student's block b output to teacher t's at the same depth: a 1x1
    convolution for conv maps, a linear layer for flat features. Training scaffolding, not kept."""
    config = student.config
    probe = torch.zeros(2, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        student_blocks = student.cpu().forward_all(probe)[0]
        teacher_blocks = [teacher.to(torch.device("cpu")).forward_blocks(probe, GROUP_STACK)[1] for teacher in teachers]
    for teacher, blocks in zip(teachers, teacher_blocks):
        if [tuple(block.shape[2:]) for block in blocks] != [tuple(block.shape[2:]) for block in student_blocks]:
            raise AmalgamationError(
                "group-stack training needs teachers whose blocks match the TargetNet's (LeNet-5) in number and "
                f"resolution: {[tuple(block.shape[1:]) for block in student_blocks]} against a teacher's "
                f"{[tuple(block.shape[1:]) for block in blocks]}; amalgamate LeNet-5 teachers"
            )
    adapters = nn.ModuleList()
    for b, mine in enumerate(student_blocks):
        layer = nn.Conv2d if mine.ndim == 4 else nn.Linear
        kwargs = {"kernel_size": 1} if mine.ndim == 4 else {}
        adapters.append(nn.ModuleList(layer(mine.shape[1], blocks[b].shape[1], **kwargs) for blocks in teacher_blocks))
    return adapters


@torch.no_grad()
def fit_adapters(adapters: nn.ModuleList, student_block: torch.Tensor, teacher_blocks: list[torch.Tensor]) -> None:
    """Set each adapter to the ridge least-squares map from the student's block output to its teacher's.

    A block phase then starts from the best adapters for the block as it is: random ones would first
    push a block that starts as a teacher's away from what it knows."""
    def rows(features: torch.Tensor) -> torch.Tensor:  # a row per pixel of a conv map, per image if flat
        return features.movedim(1, -1).reshape(-1, features.shape[1])

    inputs = rows(student_block)
    inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)  # the bias
    ridge = 1e-3 * len(inputs) * torch.eye(inputs.shape[1], device=inputs.device)
    gram = inputs.T @ inputs + ridge
    for adapter, target in zip(adapters, teacher_blocks):
        solution = torch.linalg.solve(gram, inputs.T @ rows(target))
        adapter.weight.copy_(solution[:-1].T.reshape(adapter.weight.shape))
        adapter.bias.copy_(solution[-1])


def feature_loss(student_block: torch.Tensor, adapters: nn.ModuleList, teacher_blocks: list[torch.Tensor]) -> torch.Tensor:
    """Mean over teachers of the adapted student features' squared error, relative to the teacher's
    feature energy, so every teacher and every depth weighs the same."""
    errors = [
        F.mse_loss(adapter(student_block), target) / target.pow(2).mean().clamp_min(1e-8)
        for adapter, target in zip(adapters, teacher_blocks)
    ]
    return torch.stack(errors).mean()


def output_loss(
    head_logits: list[torch.Tensor], union_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
    teacher_union_logits: torch.Tensor, temperature: float,
) -> torch.Tensor:
    """KD of each head from its teacher, plus KD of the combined prediction from the teachers' union
    (which also sets the heads' logits against one another)."""
    per_head = torch.stack([kd_loss(mine, theirs, temperature) for mine, theirs in zip(head_logits, teacher_logits)])
    return per_head.mean() + kd_loss(union_logits, teacher_union_logits, temperature)


def amalgamate(
    student: TargetNet,
    teachers: list[Teacher],
    transfer_set: TransferSet,
    offsets: list[float],
    config: StudentConfig,
    device: torch.device,
    group_stack: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumeState | None = None,
) -> TargetNet:
    """Train `student` from `teachers` (teacher i for head i, its logits lowered by `offsets[i]` in
    their union) on transfer-set images alone; return it.

    The student of the last step is the result: no real data is there to pick another.
    """
    if len(offsets) != len(teachers):
        raise AmalgamationError(f"{len(offsets)} logit offsets for {len(teachers)} teachers: one per teacher")
    if config.start_from_teachers:
        copy_teacher_weights(student, teachers)
    adapters = feature_adapters(student, teachers).to(device)
    teachers = [on_device(teacher, device) for teacher in teachers]
    student = on_device(student, device)
    union = student.union
    if config.pool_size:
        transfer_set = draw_pool(transfer_set, config.pool_size, config.batch_size)
    phases = config.phases(group_stack, len(student.blocks))
    total_steps = sum(steps for _, steps in phases)

    saved = resume.restore(total_steps, student=student, adapters=adapters) if resume else {"step": 0}
    progress = tqdm(total=total_steps, initial=saved["step"], desc="group-stack" if group_stack else "end to end")
    phase_start = 0
    for index, (phase, steps) in enumerate(phases):  # block phases learn features, the others outputs
        phase_end = phase_start + steps
        if saved["step"] >= phase_end:
            phase_start = phase_end
            continue
        if phase.startswith("block"):
            depth = int(phase.removeprefix("block")) - 1
            trained = [*student.blocks[depth].parameters(), *adapters[depth].parameters()]
        elif phase == "heads":
            trained = list(student.heads.parameters())
        else:
            trained = list(student.parameters())
        trainable = {id(parameter) for parameter in trained}
        for parameter in [*student.parameters(), *adapters.parameters()]:
            parameter.requires_grad_(id(parameter) in trainable)  # the stack below a block stays fixed
        optimizer = torch.optim.Adam(trained, lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        scaler = grad_scaler(device)
        if saved.get("phase") == phase:
            optimizer.load_state_dict(saved["optimizer"])
            schedule.load_state_dict(saved["schedule"])
            scaler.load_state_dict(saved["scaler"])
        elif phase.startswith("block"):
            with torch.no_grad():
                images = random_affine(transfer_set.sample(ADAPTER_FIT_IMAGES).to(device), config.augment_shift)
                student_block = student.forward_all(images)[0][depth]
                teacher_blocks = [teacher.forward_blocks(images, GROUP_STACK)[1][depth] for teacher in teachers]
            fit_adapters(adapters[depth], student_block, teacher_blocks)

        student.train()
        for step in range(max(saved["step"], phase_start) + 1, phase_end + 1):
            images = random_affine(transfer_set.sample(config.batch_size).to(device), config.augment_shift)
            with autocast(device):
                with torch.no_grad():
                    teacher_logits, teacher_blocks = zip(
                        *(teacher.forward_blocks(images, GROUP_STACK) for teacher in teachers)
                    )
                    teacher_union_logits = union(offset_logits(list(teacher_logits), offsets))
                student_blocks, head_logits, union_logits = student.forward_all(images)
                if phase.startswith("block"):
                    teacher_features = [blocks[depth] for blocks in teacher_blocks]
                    loss = feature_loss(student_blocks[depth], adapters[depth], teacher_features)
                else:
                    loss = output_loss(
                        head_logits, union_logits, list(teacher_logits), teacher_union_logits, config.temperature
                    )
            check_finite(f"amalgamation {phase}", step, loss=loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            progress.update()

            if on_step:
                agreement = union_logits.argmax(1) == teacher_union_logits.argmax(1)
                on_step(step, {"loss": loss.item(), "union_agreement": agreement.float().mean().item(),
                               "phase": float(index)})
            if resume:
                resume.maybe_save(step, extra={"phase": phase}, student=student, adapters=adapters,
                                  optimizer=optimizer, schedule=schedule, scaler=scaler)
        phase_start = phase_end
    progress.close()
    return student.requires_grad_(True).eval()
