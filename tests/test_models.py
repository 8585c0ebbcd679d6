"""The networks, classifier checkpoints (zoo, and the user's own: a state dict or a torch.export
program), the teacher's hooks, and the safe checkpoint files under them."""

import pytest
import torch
from torch import nn

from dfkd.checkpoint import CheckpointError, OutputError, atomic_path, current_umask, save_checkpoint
from dfkd.classifier import (
    EXPORTED,
    Classifier,
    build_classifier,
    check_classifier,
    freeze,
    load_classifier,
    load_user_classifier,
    save_classifier,
)
from dfkd.inputs import InputSpec
from dfkd.models import Generator
from dfkd.synthesis.dafl import GeneratorTransferSet
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set
from dfkd.teacher import Teacher, TeacherError
from dfkd.zoo import ModelConfig, build_model
from dfkd.zoo.lenet import LeNet5

MNIST = InputSpec(channels=1, size=32, mean=(0.1307,), std=(0.3081,), class_names=tuple("0123456789"), resize="pad")
CPU = torch.device("cpu")


def lenet(width: float = 1.0) -> Classifier:
    return build_classifier("lenet5", {"width": width}, MNIST)


def test_lenet5_and_half_shapes_and_sizes():
    teacher = LeNet5(channels=1, image_size=32, num_classes=10, width=1.0)
    student = build_model(ModelConfig(architecture="lenet5", options={"width": 0.5}), 1, 32, 10)
    images = torch.randn(4, 1, 32, 32)
    logits, features = Teacher(teacher, MNIST).forward_with_features(images)
    assert logits.shape == (4, 10) and features.shape == (4, 120)
    assert student(images).shape == (4, 10)
    assert student.features[0].out_channels == 3 and student.hidden[0].out_features == 42
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(student) < count(teacher) / 3
    half = build_model(ModelConfig(architecture="lenet5_half"), 1, 32, 10)
    assert {k: v.shape for k, v in half.state_dict().items()} == {k: v.shape for k, v in student.state_dict().items()}
    assert {key.split(".")[0] for key in teacher.state_dict()} == {"features", "hidden", "classifier"}


def test_lenet5_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="32x32"):
        LeNet5(channels=1, image_size=28, num_classes=10, width=1.0)


def test_generator_output_is_batch_normalised_image():
    generator = Generator(latent_dim=16, width=8)
    images = generator(torch.randn(32, 16))
    assert images.shape == (32, 1, 32, 32)
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 0.05


# --- the teacher's hooks ---------------------------------------------------------------------


def test_lenet_features_are_the_120_conv_features():
    torch.manual_seed(0)
    model = lenet().model.eval()
    images = torch.randn(5, 1, 32, 32)
    logits, features = Teacher(model, MNIST).forward_with_features(images)
    with torch.no_grad():
        assert torch.equal(features, model.features(images)) and features.shape == (5, 120)
        assert torch.equal(logits, model(images))


def test_resnet_features_are_the_pooled_input_of_its_classifier():
    torch.manual_seed(0)
    spec = InputSpec(channels=3, size=16, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=tuple("abcdef"))
    model = build_classifier("resnet8", {}, spec).model.eval()
    teacher = Teacher(model, spec)
    images = torch.randn(4, 3, 16, 16)
    logits, features = teacher.forward_with_features(images)
    with torch.no_grad():
        pooled = model.stages(model.stem(images)).mean(dim=(2, 3))  # global average pooling, by hand
    assert features.shape == (4, 64) and torch.allclose(features, pooled, atol=1e-6)
    assert torch.allclose(logits, features @ model.classifier.weight.T + model.classifier.bias, atol=1e-5)
    assert teacher.classifier_name("test") == "classifier"
    assert torch.equal(teacher.class_weights("test"), model.classifier.weight)
    blocks = teacher.forward_blocks(images, "test")[1]
    assert [tuple(block.shape) for block in blocks] == [(4, 16, 16, 16), (4, 32, 8, 8), (4, 64, 4, 4)]
    assert not model.classifier._forward_pre_hooks and not model.stages[0]._forward_hooks  # hooks removed


def test_a_teacher_without_blocks_or_final_linear_layer_says_what_is_missing():
    plain = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(1024, 10)), MNIST)
    with pytest.raises(TeacherError, match="group-stack training needs the teacher's blocks"):
        plain.forward_blocks(torch.randn(2, 1, 32, 32), "group-stack training")
    convolutional = Teacher(nn.Sequential(nn.Conv2d(1, 10, 32), nn.Flatten()), MNIST)
    with pytest.raises(TeacherError, match=r"DAFL's activation loss needs the teacher's final linear layer \(a weight of "
                       r"10 rows, one per class\); found none, the last layer is '1' \(Flatten\)"):
        convolutional.forward_with_features(torch.randn(2, 1, 32, 32))


def test_freeze_stops_gradients_and_keeps_eval_mode():
    model = freeze(lenet().model.train())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


# --- classifier checkpoints ------------------------------------------------------------------


def test_classifier_checkpoint_round_trip_is_weights_only(tmp_path):
    classifier = lenet(0.5)
    save_classifier(tmp_path / "m.pt", classifier, metadata={"note": "x"})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled classes inside
    assert payload["kind"] == "classifier" and payload["metadata"] == {"note": "x"}
    restored = load_classifier(tmp_path / "m.pt")
    assert restored.spec == MNIST and restored.architecture == "lenet5" and restored.options == {"width": 0.5}
    assert not restored.model.training
    images = torch.randn(3, 1, 32, 32)
    assert torch.equal(restored.model(images), classifier.model.eval()(images))


def test_corrupted_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "teacher.pt"
    save_classifier(path, lenet())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="teacher.pt: corrupted"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    classifier = lenet()
    save_classifier(path, classifier)
    weights = classifier.model.classifier.weight.detach().contiguous().numpy().tobytes()
    data = bytearray(path.read_bytes())
    where = data.find(weights)  # torch.save stores tensor bytes uncompressed
    assert where > 0
    data[where + 100] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="teacher.pt: its contents do not match the checksum saved with them"):
        load_classifier(path)


def test_atomic_writes_keep_the_mode_of_the_file_they_replace_and_the_umask_for_new_ones(tmp_path):
    with atomic_path(tmp_path / "new.txt") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    (tmp_path / "kept.txt").write_text("old")
    (tmp_path / "kept.txt").chmod(0o640)
    with atomic_path(tmp_path / "kept.txt") as tmp:
        tmp.write_text("replaced")
    assert (tmp_path / "kept.txt").stat().st_mode & 0o777 == 0o640


def test_one_payload_saved_twice_gives_the_same_bytes(tmp_path):
    # DVC's run-cache and remote key outputs by their hash: equal weights must be equal files.
    classifier = lenet()
    save_classifier(tmp_path / "first.pt", classifier)
    save_classifier(tmp_path / "second.pt", classifier)
    assert (tmp_path / "first.pt").read_bytes() == (tmp_path / "second.pt").read_bytes()


def test_a_folder_that_cannot_take_the_output_is_named(tmp_path):
    (tmp_path / "models").write_text("a file where the folder should be")
    with pytest.raises(OutputError, match=r"models/teacher.pt: cannot be written \(File exists\)"):
        save_classifier(tmp_path / "models" / "teacher.pt", lenet())


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    generator = GeneratorTransferSet(Generator(latent_dim=8, width=4), CPU)
    save_transfer_set(tmp_path / "ts.pt", "dafl", generator, MNIST)
    with pytest.raises(CheckpointError, match="expected a 'classifier' checkpoint, found 'transfer_set'"):
        load_classifier(tmp_path / "ts.pt")
    restored = load_transfer_set(tmp_path / "ts.pt", CPU, MNIST)
    assert restored.sample(5).shape == (5, 1, 32, 32)


def test_a_transfer_set_for_another_input_is_refused(tmp_path):
    save_transfer_set(tmp_path / "ts.pt", "dafl", GeneratorTransferSet(Generator(latent_dim=8, width=4), CPU), MNIST)
    other = MNIST.model_copy(update={"class_names": tuple("abcdefghij")})
    with pytest.raises(CheckpointError, match="ts.pt: made for a teacher of another input .*rerun synthesize"):
        load_transfer_set(tmp_path / "ts.pt", CPU, other)


def test_a_transfer_set_without_an_input_description_is_a_checkpoint_error(tmp_path):
    save_checkpoint(tmp_path / "old.pt", {"kind": "transfer_set", "method": "dafl", "metadata": {}})  # no "input"
    with pytest.raises(CheckpointError, match="old.pt"):
        load_transfer_set(tmp_path / "old.pt", CPU, MNIST)


# --- the user's own teacher: a state dict ----------------------------------------------------


def test_a_zoo_state_dict_loads_alone_or_under_state_dict(tmp_path):
    classifier = lenet()
    images = torch.randn(3, 1, 32, 32)
    expected = classifier.model.eval()(images)
    torch.save(classifier.model.state_dict(), tmp_path / "alone.pt")
    torch.save({"state_dict": classifier.model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pt")
    for name in ("alone.pt", "wrapped.pt"):
        loaded = load_user_classifier(tmp_path / name, "lenet5", {"width": 1.0}, MNIST)
        assert loaded.architecture == "lenet5" and loaded.spec == MNIST and not loaded.model.training
        assert torch.equal(loaded.model(images), expected), name
    # A package checkpoint carries its own description and architecture: the declared ones are not used.
    save_classifier(tmp_path / "package.pt", lenet(0.5))
    package = load_user_classifier(tmp_path / "package.pt", "resnet8", {}, None)
    assert package.architecture == "lenet5" and package.options == {"width": 0.5}


def test_a_state_dict_with_wrong_or_missing_keys_lists_them(tmp_path):
    weights = lenet().model.state_dict()
    renamed = {("fc.weight" if key == "classifier.weight" else key): value for key, value in weights.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match=r"renamed.pt \(lenet5\): the weights do not fit the architecture; "
                       r"missing keys: classifier.weight; unexpected keys: fc.weight$"):
        load_user_classifier(tmp_path / "renamed.pt", "lenet5", {}, MNIST)
    torch.save({key: value for key, value in weights.items() if not key.startswith("hidden")}, tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: hidden.0.bias, hidden.0.weight$"):
        load_user_classifier(tmp_path / "short.pt", "lenet5", {}, MNIST)
    torch.save(lenet(0.5).model.state_dict(), tmp_path / "half.pt")
    with pytest.raises(CheckpointError, match=r"other shapes: features.0.weight \(3, 1, 5, 5\) \(expected \(6, 1, 5, 5\)\)"):
        load_user_classifier(tmp_path / "half.pt", "lenet5", {}, MNIST)


def test_files_that_are_not_a_teacher_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pt: the teacher checkpoint does not exist"):
        load_user_classifier(tmp_path / "nowhere.pt", "lenet5", {}, MNIST)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list.pt: not a teacher: expected a state dict \(names -> tensors\), found list"):
        load_user_classifier(tmp_path / "list.pt", "lenet5", {}, MNIST)
    torch.save(lenet().model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare.pt: a state dict does not say what the teacher takes; declare teacher.input"):
        load_user_classifier(tmp_path / "bare.pt", "lenet5", {}, None)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt: not a state dict or checkpoint"):
        load_user_classifier(tmp_path / "junk.pt", "lenet5", {}, MNIST)
    (tmp_path / "junk.pt2").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt2: not a torch.export program"):
        load_user_classifier(tmp_path / "junk.pt2", EXPORTED, {}, MNIST)
    with pytest.raises(CheckpointError, match="junk.pt2: a torch.export file does not say what it takes"):
        load_user_classifier(tmp_path / "junk.pt2", EXPORTED, {}, None)


# --- the user's own teacher: a torch.export program ------------------------------------------


class SmallNet(nn.Module):
    """A network of the user's design, known to the package only through its exported program."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 15 * 15, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


def export_program(network: nn.Module, path, dynamic_batch: bool = True):
    example = torch.zeros(2 if dynamic_batch else 1, 1, 32, 32)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    torch.export.save(torch.export.export(network, (example,), dynamic_shapes=shapes), path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    network = SmallNet().eval()
    return network, export_program(network, tmp_path_factory.mktemp("pt2") / "x.pt2")


def test_an_exported_program_gives_the_networks_logits_and_its_hooks_work(exported):
    network, path = exported
    classifier = load_user_classifier(path, EXPORTED, {}, MNIST)
    assert classifier.architecture == EXPORTED and classifier.program == path.read_bytes()
    check_classifier(classifier, str(path))
    images = torch.randn(5, 1, 32, 32)
    teacher = Teacher(classifier.model, MNIST)
    with torch.no_grad():
        expected = network(images)
        assert torch.allclose(teacher(images), expected, atol=1e-6)
        logits, features = teacher.forward_with_features(images)
        assert torch.allclose(logits, expected, atol=1e-6)
        assert features.shape == (5, 900) and torch.allclose(features, network.body(images), atol=1e-6)
    assert teacher.classifier_name("ZSKD") == "head"
    assert torch.equal(teacher.class_weights("ZSKD"), network.head.weight)
    with pytest.raises(TeacherError, match="needs the teacher's blocks"):
        teacher.forward_blocks(images, "group-stack training")


def test_an_exported_classifier_round_trips_through_a_package_checkpoint(exported, tmp_path):
    network, path = exported
    save_classifier(tmp_path / "teacher.pt", load_user_classifier(path, EXPORTED, {}, MNIST), {"source": "x.pt2"})
    payload = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert payload["architecture"] == EXPORTED and "state_dict" not in payload
    restored = load_classifier(tmp_path / "teacher.pt")
    assert restored.architecture == EXPORTED and restored.spec == MNIST and restored.program == path.read_bytes()
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(restored.model(images), network(images), atol=1e-6)


def test_check_classifier_refuses_a_declared_shape_the_program_rejects(exported):
    _, path = exported
    small = MNIST.model_copy(update={"size": 16})
    with pytest.raises(CheckpointError, match=r"x.pt2: the classifier rejects inputs of the declared shape \(2, 1, 16, 16\)") as error:
        check_classifier(load_user_classifier(path, EXPORTED, {}, small), str(path))
    assert "dynamic batch" not in str(error.value), "the batch is not what it rejects"
    colour = InputSpec(channels=3, size=32, mean=(0.5,) * 3, std=(0.25,) * 3, class_names=MNIST.class_names)
    with pytest.raises(CheckpointError, match=r"x.pt2: the classifier rejects inputs of the declared shape \(2, 3, 32, 32\)"):
        check_classifier(load_user_classifier(path, EXPORTED, {}, colour), str(path))


def test_check_classifier_asks_for_a_dynamic_batch_dimension(tmp_path):
    path = export_program(SmallNet().eval(), tmp_path / "static.pt2", dynamic_batch=False)
    with pytest.raises(CheckpointError, match=r"static.pt2: the classifier rejects inputs of the declared shape "
                       r"\(2, 1, 32, 32\) \(export it with a dynamic batch dimension\)"):
        check_classifier(load_user_classifier(path, EXPORTED, {}, MNIST), str(path))


def test_check_classifier_refuses_a_program_that_does_not_answer_batch_by_classes(tmp_path):
    path = export_program(SmallNet(classes=5).eval(), tmp_path / "five.pt2")
    with pytest.raises(CheckpointError, match=r"five.pt2: on a batch of 2 the classifier answers \(2, 5\), not "
                       r"\(batch, classes\) = \(2, 10\) for the 10 declared classes"):
        check_classifier(load_user_classifier(path, EXPORTED, {}, MNIST), str(path))


def test_check_classifier_accepts_a_zoo_model_of_its_spec_and_refuses_a_wrong_one():
    check_classifier(lenet(), "lenet5")
    wrong = Classifier(build_model(ModelConfig(architecture="lenet5"), 1, 32, 5), MNIST, "lenet5")
    with pytest.raises(CheckpointError, match=r"lenet5: on a batch of 2 the classifier answers \(2, 5\)"):
        check_classifier(wrong, "lenet5")
