"""The evaluation classifier, the Fashion-MNIST reader, and the embedded model's shipped assets."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from tide.errors import TideError
from tide.eval import CLASS_NAMES, EvalClassifier, load_classifier, load_fashion_mnist
from tide.models import load_backbone
from tide.models.loading import EMBEDDED



def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_classifier_shapes_and_predictions_in_range():
    torch.manual_seed(0)
    clf = EvalClassifier(class_names=CLASS_NAMES).eval()
    images = torch.rand(6, 1, 28, 28)
    assert clf(images).shape == (6, 10)
    assert clf.features(images).shape == (6, 128)
    pred = clf.predict(images, batch_size=4)
    assert pred.shape == (6,) and pred.dtype == torch.long and ((pred >= 0) & (pred < 10)).all()
    assert clf.embed(images, batch_size=4).shape == (6, 128)


def test_classifier_rejects_wrong_channel_count():
    with pytest.raises(TideError, match="takes"):
        EvalClassifier()(torch.rand(2, 3, 28, 28))


def test_classifier_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    clf = EvalClassifier(mean=0.3, std=0.4, class_names=CLASS_NAMES, info={"test_accuracy": 0.5})
    clf.train()
    clf(torch.rand(32, 1, 28, 28))  # move BatchNorm running statistics off their defaults
    clf.eval()
    clf.save(tmp_path / "clf")
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "model.safetensors"]
    loaded = EvalClassifier.load(tmp_path / "clf")
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), clf(images))
    assert loaded.info == {"test_accuracy": 0.5} and loaded.class_names == CLASS_NAMES
    assert not loaded.training


def test_classifier_load_of_a_non_classifier_directory_is_a_clear_error(tmp_path):
    with pytest.raises(TideError, match="config.json"):
        EvalClassifier.load(tmp_path)


def test_load_classifier_without_a_classifier_entry_is_a_clear_error(tiny_dit):
    with pytest.raises(TideError, match="ships no evaluation classifier"):
        load_classifier(tiny_dit)


def test_load_classifier_resolves_the_path_relative_to_the_backbone(tiny_dit, tmp_path):
    EvalClassifier().save(tmp_path / "classifier")
    tiny_dit.meta.update(classifier="classifier", path=str(tmp_path))
    assert isinstance(load_classifier(tiny_dit), EvalClassifier)


def test_fashion_mnist_reader_parses_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    labels = np.array([0, 9, 4])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    got_x, got_y = load_fashion_mnist("test", tmp_path)
    assert got_x.dtype == np.uint8 and got_x.shape == (3, 28, 28)
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)


def test_fashion_mnist_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(TideError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(TideError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def test_fashion_mnist_test_split_from_the_debian_package():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10


def test_embedded_classifier_is_accurate_on_real_test_images():
    backbone = load_backbone("fmnist-dit")
    clf = load_classifier(backbone)
    x, y = load_fashion_mnist("test")
    images = torch.from_numpy(x[:2000]).float().div(255).unsqueeze(1)
    acc = (clf.predict(images) == torch.from_numpy(y[:2000]).long()).float().mean().item()
    assert acc > 0.9


def test_embedded_assets_have_the_documented_layout():
    root = EMBEDDED["fmnist-dit"]
    index = json.loads((root / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    meta = json.loads((root / "tide.json").read_text())
    assert meta["class_names"] == CLASS_NAMES and meta["classifier"] == "classifier"
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(root.rglob("*.bin")) and not list(root.rglob("*.pt")) and not list(root.rglob("*.pkl"))
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False
    assert scheduler["beta_schedule"] == meta["training"]["beta_schedule"]
    backbone = load_backbone("fmnist-dit")
    assert backbone.num_classes == 10 and backbone.num_tokens == 49 and backbone.dtype == torch.float32
