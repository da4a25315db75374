"""studies/tiny_imagenet_vgg16.toml (the paper's VGG-16 ± BN on Tiny ImageNet, a sweep over λ) at toy
size on the CPU: a generated image folder with Tiny ImageNet's layout, `flowlab run --check` on its
train and val splits, then the study's own [sweep] (2 × 4 points, 2 SGD steps each) on an in-process
dask cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import flowlab
from flowlab.cli import main
from flowlab.config import load_study

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "tiny_imagenet_vgg16.toml"
WNIDS = ["n01443537", "n01629819", "n01641577"]
TOY = ["model.width=0.0625", "model.classifier=[16, 16]", "optimizer.steps=2", "optimizer.batch_size=4",
       "record.every=1", 'study.device="cpu"']


def tiny_imagenet(root: Path, per_class: int = 4, val: int = 6) -> Path:
    """root/train/<wnid>/images/<wnid>_<i>.JPEG (+ <wnid>_boxes.txt), root/val/images/val_<i>.JPEG with
    root/val/val_annotations.txt, root/wnids.txt: the layout of tiny-imagenet-200.zip, 64×64 RGB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for w in WNIDS:
        d = root / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n"
                                                                   for i in range(per_class)))
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i in range(val):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[i % len(WNIDS)]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_imagenet(tmp_path_factory.mktemp("tin") / "tiny-imagenet-200")


def test_the_study_is_the_papers_setting():
    study = load_study(STUDY, ["data.root=/nowhere"])
    assert study.model.name == "vgg16" and study.data.name == "image_folder"
    assert study.data.options["split"] == "train" and study.data.options["size"] == 64
    assert study.optimizer.lr == 0.1 and study.optimizer.batch_size == 256 and study.optimizer.momentum == 0
    sweep = dict(study.section("sweep").axes)
    assert sweep == {"model.batchnorm": (True, False), "optimizer.weight_decay": (0.0, 1e-4, 5e-4, 1e-3)}


@pytest.mark.parametrize("split, n", [("train", 12), ("val", 6)])
def test_check_on_a_folder_of_the_same_layout(folder, tmp_path, capsys, split, n):
    rc = main(["run", str(STUDY), "--check", "--out", str(tmp_path / "one"), "--set", f"data.root={folder}",
               "--set", f"data.split={split}", *[a for s in TOY for a in ("--set", s)]])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"{n} examples" in text and "2 steps" in text


def test_a_missing_root_is_one_line(tmp_path, capsys):
    rc = main(["run", str(STUDY), "--check", "--out", str(tmp_path / "x"), "--set", f"data.root={tmp_path / 'no'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "data.root" in err and len(err.splitlines()) == 1


def test_the_sweep_runs_tiny(folder, tmp_path):
    from distributed import Client, LocalCluster

    from flowlab.sweep.runner import run_sweep

    study = load_study(STUDY, [f"data.root={folder}", *TOY])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        ds = run_sweep(study, tmp_path / "sweep", client=client, log=lambda m: None)
    assert ds.sweep_status.dims == ("batchnorm", "weight_decay")
    assert (ds.sweep_status.values == "ok").all(), ds.sweep_status.values
    assert list(ds.weight_decay.values) == [0.0, 1e-4, 5e-4, 1e-3]
    assert {"quantity", "theory", "grad_term_acc"} <= set(ds.data_vars)
    kinds = {bn: set(ds.group_kind.sel(batchnorm=bn).values.ravel()) - {"", "nan"} for bn in (True, False)}
    assert "scale" in kinds[True] and "scale" not in kinds[False], kinds  # BatchNorm's scale groups
    assert {"translation", "rescale"} <= kinds[False], kinds
    # the exact discrete law holds on every group of every point to float32 round-off
    q = ds.quantity.sel(dynamics="sgd").load()
    pred = ds.theory.sel(variant="exact_discrete").load()
    scale = np.maximum(np.abs(q.isel(time=0)), 1e-3)
    err = float((np.abs(pred - q) / scale).max())
    assert np.isfinite(err) and err < 1e-4, err
    # a point of the sweep is that study run alone (no dask)
    one = flowlab.run(load_study(STUDY, [f"data.root={folder}", *TOY, "model.batchnorm=false",
                                         "optimizer.weight_decay=5e-4"]), tmp_path / "alone")
    np.testing.assert_array_equal(ds.loss.sel(batchnorm=False, weight_decay=5e-4).values, one.loss.values)
