import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]


def small_study(**sections) -> dict:
    """A tiny study mapping (float64, CPU) that tests modify."""
    base = {
        "study": {"name": "t", "seed": 0, "dtype": "float64", "device": "cpu"},
        "model": {"name": "mlp", "widths": [16], "activation": "tanh"},
        "data": {"name": "digits", "n": 200},
        "optimizer": {"lr": 0.1, "steps": 20, "batch_size": 32},
        "record": {"every": 1, "projections": 4},
    }
    for key, value in sections.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict) and "name" not in value:
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def small_toml(name: str = "t", steps: int = 5) -> str:
    """The TOML of a tiny study (tanh MLP on 100 digits, minibatches of 20) that tests extend."""
    return textwrap.dedent(f"""
        [study]
        name = "{name}"
        dtype = "float64"
        device = "cpu"
        [model]
        name = "mlp"
        widths = [8]
        activation = "tanh"
        [data]
        name = "digits"
        n = 100
        [optimizer]
        lr = 0.1
        steps = {steps}
        batch_size = 20
    """)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user package on sys.path with a model function and data functions."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        def net(width=16, in_features=64, classes=10):
            return nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, classes))

        def blobs(n=120, dim=5, classes=3):
            g = torch.Generator().manual_seed(1)
            X = torch.randn(n, dim, generator=g)
            y = torch.randint(0, classes, (n,), generator=g)
            return X, y

        class Pairs(torch.utils.data.Dataset):
            def __init__(self, n):
                self.X = torch.linspace(-1, 1, n).reshape(n, 1)
            def __len__(self):
                return len(self.X)
            def __getitem__(self, i):
                return self.X[i], 2.0 * self.X[i]

        def pairs(n=30):
            return Pairs(n)

        def half_mse(output, target):
            return 0.5 * ((output - target) ** 2).mean()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]
    return "userpkg"
