from typing import get_args

import pytest
from pydantic import BaseModel
from ruamel.yaml import YAML

from conftest import PROJECT
from dfkd.readers import READERS
from dfkd.synthesis.methods import METHODS
from pipeline.flow import overridden, preset_overrides
from stages.params import PARAMS_FILE, Params, ParamsError, SynthesizeParams, load_params, validate_params


def test_the_shipped_params_file_is_valid():
    params = load_params(PARAMS_FILE)
    assert params.synthesize.method == "dafl"


def test_params_yaml_spells_out_every_key_with_the_schema_default():
    """One recipe: deleting a key from params.yaml must not change what runs."""
    raw = YAML(typ="safe").load(PARAMS_FILE.read_text())

    def missing(model: BaseModel, written: dict, prefix: str = "") -> list[str]:
        keys = []
        for name, value in model:
            if name not in written:
                keys.append(prefix + name)
            elif isinstance(value, BaseModel):
                keys += missing(value, written[name], f"{prefix}{name}.")
        return keys

    assert missing(Params(), raw) == []
    assert load_params(PARAMS_FILE) == Params()


def test_every_method_has_its_options_and_its_distillation_recipe():
    params = load_params(PARAMS_FILE)
    assert set(get_args(SynthesizeParams.model_fields["method"].annotation)) == set(METHODS)
    for method in METHODS:
        assert getattr(params.synthesize, method) and getattr(params.distill, method)


def test_the_method_selects_the_distillation_recipe_with_the_shared_optimiser():
    params = validate_params({
        "synthesize": {"method": "zskd"},
        "distill": {
            "lr": 0.01,
            "dafl": {"steps": 77, "temperature": 4.0},
            "zskd": {"steps": 88, "temperature": 20.0, "augment_rotation": 15},
        },
    })
    zskd, dafl = params.distill.config("zskd"), params.distill.config("dafl")
    assert (zskd.temperature, zskd.augment_rotation, zskd.steps, zskd.lr) == (20.0, 15, 88, 0.01)
    assert (dafl.temperature, dafl.augment_rotation, dafl.steps, dafl.lr) == (4.0, 0, 77, 0.01)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"distill": {"lr": -0.1}}, r"distill.lr: Input should be greater than 0 \(got -0.1\)"),
        ({"train_teacher": {"epochs": "many"}}, r"train_teacher.epochs: Input should be a valid integer"),
        ({"distill": {"stepz": 10}}, r"distill.stepz: unknown key"),
        ({"extra_section": {}}, r"extra_section: unknown key"),
        ({"synthesize": {"method": "magic"}}, r"synthesize.method: Input should be 'dafl', 'zskd', 'deepinversion', 'dfad' or 'fast_dfkd' \(got 'magic'\)"),
        (
            {"synthesize": {"method": "deepinversion"}},
            r"synthesize.method deepinversion matches the teacher's batch-norm statistics, and teacher.architecture "
            r"lenet5 has no batch norm \(with batch norm: resnet8, resnet18",
        ),
        (
            {"synthesize": {"method": "fast_dfkd"}},
            r"synthesize.method fast_dfkd matches the teacher's batch-norm statistics, and teacher.architecture lenet5",
        ),
        (
            {"synthesize": {"dafl": {"temperature": 20}}},
            r"synthesize.dafl.temperature: unknown key: 'temperature' is a zskd option, not a dafl one "
            r"\(set synthesize.zskd.temperature\)",
        ),
        (
            {"synthesize": {"zskd": {"generator_width": 8}}},
            r"synthesize.zskd.generator_width: unknown key: 'generator_width' is a dafl/dfad/fast_dfkd option, not a "
            r"zskd one \(set synthesize.dafl.generator_width or synthesize.dfad.generator_width or "
            r"synthesize.fast_dfkd.generator_width\)",
        ),
        ({"synthesize": {"impressions": 10}}, r"synthesize.impressions: unknown key: 'impressions' is a zskd option"),
        ({"synthesize": {"zskd": {"scales": [1.0, -0.1]}}}, r"synthesize.zskd.scales.1: Input should be greater than 0"),
        (
            {"distill": {"temperature": 4}},
            r"distill.temperature: unknown key: 'temperature' is set per synthesis method "
            r"\(distill.dafl.temperature, distill.zskd.temperature, distill.deepinversion.temperature, "
            r"distill.dfad.temperature and distill.fast_dfkd.temperature\)",
        ),
        ({"distill": {"zskd": {"lr": 0.1}}}, r"distill.zskd.lr: unknown key: 'lr' is shared by every synthesis"),
        ({"distill": {"steps": 10}}, r"distill.steps: unknown key: 'steps' is set per synthesis method \(distill.dafl.steps, distill.zskd.steps,"),
        ({"distill": {"zskd": {"augment_scale": 1.5}}}, r"distill.zskd.augment_scale: Input should be less than 1"),
        ({"prepare": {"data_dir": ""}}, r"prepare.data_dir: String should have at least 1 character"),
        ({"device": "tpu"}, r"device: String should match pattern"),
        ({"train_teacher": {"epochs": True}}, r"train_teacher.epochs: Input should be a valid integer \(got True\)"),
        ({"train_teacher": {"epochs": "3"}}, r"train_teacher.epochs: Input should be a valid integer \(got '3'\)"),
        ({"seed": True}, r"seed: Input should be a valid integer \(got True\)"),
        ({"distill": {"lr": "1e-3"}}, r"distill.lr: Input should be a valid number \(got '1e-3'\)"),
        ({"export": {"parity_samples": 10}}, r"export.parity_samples: Input should be greater than or equal to 256"),
    ],
)
def test_invalid_params_name_the_key_and_the_problem(raw, expected):
    with pytest.raises(ParamsError, match=expected):
        validate_params(raw)


def test_params_file_errors_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="params file does not exist"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("distill: [unclosed")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(broken)


def teachers(**classes) -> dict:
    return {"amalgamate": {"teachers": {name: {"classes": labels} for name, labels in classes.items()}}}


@pytest.mark.parametrize(
    "raw, expected",
    [
        (teachers(all=list(range(10))), r"amalgamate: Value error, teachers: amalgamation needs at least two teachers, got 1 \('all'\)$"),
        (teachers(), r"needs at least two teachers, got 0 \(none\)"),
        (
            teachers(low=[0, 1, 2, 3, 4, 5], high=[5, 6, 7, 8, 9]),
            r"teachers 'low' and 'high' both predict class 5, which shared_classes does not declare",
        ),
        (teachers(low=[0, 1, 2], high=[3, 4, 3]), r"teacher 'high' lists a class twice: \[3, 4, 3\]"),
        (teachers(low=[0, 1], high=[3, 4]), r"the teachers' classes must cover 0..4; no teacher predicts \[2\]"),
        (
            {"amalgamate": {**teachers(low=[0, 1], high=[2, 3])["amalgamate"], "shared_classes": [1]}},
            r"shared_classes declares class 1, but 1 teacher\(s\) predict it",
        ),
        (teachers(**{"low one": [0], "high": [1]}), r"amalgamate.teachers.low one.\[key\]: String should match pattern"),
        (teachers(low=[], high=[0]), r"amalgamate.teachers.low.classes: List should have at least 1 item"),
        (
            {"amalgamate": {"teachers": {"a": {"classes": [0], "checkpoint": "/tmp/a.pt"}, "b": {"classes": [1]}}}},
            r"amalgamate.teachers.a.checkpoint: String should match pattern",
        ),
        ({"amalgamate": {"student": {"block_steps": 0}}}, r"amalgamate.student.block_steps: Input should be greater than 0"),
        (
            {"amalgamate": {"student": {"width": 0.5}}},
            r"amalgamate.student: Value error, width 0.5 cannot start from the teachers' weights .*start_from_teachers: false",
        ),
    ],
)
def test_invalid_amalgamation_params_name_the_teacher_and_the_problem(raw, expected):
    with pytest.raises(ParamsError, match=expected):
        validate_params(raw)


def test_declared_overlaps_are_accepted():
    raw = teachers(low=[0, 1, 2, 3, 4, 5], high=[5, 6, 7, 8, 9])
    raw["amalgamate"]["shared_classes"] = [5]
    assert validate_params(raw).amalgamate.shared_classes == [5]


@pytest.mark.parametrize("preset", sorted(path.stem for path in (PROJECT / "presets").glob("*.yaml")))
def test_every_preset_is_valid_params(preset):
    overrides = preset_overrides(preset)
    assert overrides, "a preset sets something"
    validate_params(YAML(typ="safe").load(overridden(overrides)))


def test_an_unknown_preset_lists_those_that_exist():
    with pytest.raises(ParamsError, match=r"--preset cifar: no such preset \(the presets: dafl_cifar10, dafl_cifar100, fashion_mnist\)"):
        preset_overrides("cifar")


def test_the_data_sources_are_the_readers():
    assert set(get_args(Params.model_fields["prepare"].annotation.model_fields["source"].annotation)) == set(READERS)


def test_an_unknown_architecture_or_option_is_named_with_what_the_zoo_has():
    with pytest.raises(ParamsError, match=r"teacher: Value error, unknown architecture 'resnet50' \(the zoo has: lenet5, "):
        validate_params({"teacher": {"architecture": "resnet50"}})
    with pytest.raises(ParamsError, match=r"distill.student: Value error, lenet5_half has no option width \(its options: none\)"):
        validate_params({"distill": {"student": {"architecture": "lenet5_half", "options": {"width": 0.5}}}})
