import pytest

from stages.params import PARAMS_FILE, ParamsError, load_params, validate_params


def test_the_shipped_params_file_is_valid():
    params = load_params(PARAMS_FILE)
    assert params.synthesize.method == "dafl"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"distill": {"lr": -0.1}}, r"distill.lr: Input should be greater than 0 \(got -0.1\)"),
        ({"train_teacher": {"epochs": "many"}}, r"train_teacher.epochs: Input should be a valid integer"),
        ({"distill": {"stepz": 10}}, r"distill.stepz: unknown key"),
        ({"extra_section": {}}, r"extra_section: unknown key"),
        ({"synthesize": {"method": "magic"}}, r"synthesize.method: Input should be 'dafl'"),
        ({"synthesize": {"dafl": {"temperature": 20}}}, r"synthesize.dafl.temperature: unknown key"),
        ({"prepare": {"source": "idx"}}, r"prepare: Value error, source 'idx' needs idx_dir"),
        ({"device": "tpu"}, r"device: String should match pattern"),
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
