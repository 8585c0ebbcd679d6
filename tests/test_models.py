import pytest
import torch

from dfkd.checkpoint import CheckpointError, OutputError, atomic_path, current_umask, load_classifier, save_classifier
from dfkd.models import ArchitectureConfig, Generator, LeNet5
from dfkd.synthesis.dafl import GeneratorTransferSet
from dfkd.synthesis.methods import load_transfer_set, save_transfer_set


def test_lenet5_and_half_shapes_and_sizes():
    teacher, student = LeNet5(ArchitectureConfig()), LeNet5(ArchitectureConfig(width=0.5))
    images = torch.randn(4, 1, 32, 32)
    logits, features = teacher.forward_with_features(images)
    assert logits.shape == (4, 10) and features.shape == (4, 120)
    assert student(images).shape == (4, 10)
    assert student.features[0].out_channels == 3 and student.hidden[0].out_features == 42
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(student) < count(teacher) / 3


def test_lenet5_rejects_other_input_sizes():
    with pytest.raises(ValueError, match="32x32"):
        LeNet5(ArchitectureConfig(image_size=28))


def test_generator_output_is_batch_normalised_image():
    generator = Generator(latent_dim=16, width=8)
    images = generator(torch.randn(32, 16))
    assert images.shape == (32, 1, 32, 32)
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 0.05


def test_classifier_checkpoint_round_trip_is_weights_only(tmp_path):
    model = LeNet5(ArchitectureConfig(width=0.5))
    save_classifier(tmp_path / "m.pt", model, metadata={"note": "x"})
    payload = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled classes inside
    assert payload["kind"] == "classifier"
    restored = load_classifier(tmp_path / "m.pt")
    images = torch.randn(3, 1, 32, 32)
    assert torch.equal(restored(images), model.eval()(images))


def test_corrupted_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "teacher.pt"
    save_classifier(path, LeNet5(ArchitectureConfig()))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="teacher.pt: corrupted"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.pt")


def test_a_flipped_bit_in_the_weights_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    model = LeNet5(ArchitectureConfig())
    save_classifier(path, model)
    weights = model.classifier.weight.detach().contiguous().numpy().tobytes()
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


def test_a_folder_that_cannot_take_the_output_is_named(tmp_path):
    (tmp_path / "models").write_text("a file where the folder should be")
    with pytest.raises(OutputError, match=r"models/teacher.pt: cannot be written \(File exists\)"):
        save_classifier(tmp_path / "models" / "teacher.pt", LeNet5(ArchitectureConfig()))


def test_checkpoint_of_the_wrong_kind_is_refused(tmp_path):
    generator = GeneratorTransferSet(Generator(latent_dim=8, width=4), torch.device("cpu"))
    save_transfer_set(tmp_path / "ts.pt", "dafl", generator)
    with pytest.raises(CheckpointError, match="expected a 'classifier' checkpoint, found 'transfer_set'"):
        load_classifier(tmp_path / "ts.pt")
    restored = load_transfer_set(tmp_path / "ts.pt", torch.device("cpu"))
    assert restored.sample(5).shape == (5, 1, 32, 32)
