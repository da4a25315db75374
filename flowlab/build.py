"""From a validated :class:`Study` to the objects a run needs (model, data, loss, Problem)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import Study
from .data import Data, as_data, check_finite
from .errors import ConfigError
from .problem import Problem, resolve_device, resolve_dtype
from .registry import call_with_options
from .schedules import build_schedule
from .seeds import seeded_globals


@dataclass
class Built:
    study: Study
    problem: Problem
    lrs: np.ndarray

    @property
    def times(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.lrs)])


def build_data(study: Study, input_shape: tuple[int, ...] | None = None) -> Data:
    fn = study.registry("datasets").resolve(study.data.name, "data.name")
    injected = {"input_shape": input_shape} if input_shape is not None else {}
    with seeded_globals(study.study.seed):  # a builder that draws from the global generators
        obj = call_with_options(fn, study.data.options, "data", **injected)
    data = as_data(obj, "data.name", study.data.name)
    data.name = study.data.name
    check_finite(data, "data.name", study.data.name)
    return data


def build_model(study: Study, data: Data) -> nn.Module:
    fn = study.registry("models").resolve(study.model.name, "model.name")
    # built as a user would (default dtype, after torch.manual_seed(study.seed)), then cast:
    # `net().double()` gives the same θ0; the global generators are put back afterwards
    with seeded_globals(study.study.seed):
        module = call_with_options(fn, study.model.options, "model", input_shape=data.input_shape,
                                   num_outputs=data.num_outputs)
    if not isinstance(module, nn.Module):
        raise ConfigError("model.name", study.model.name, f"returned {type(module).__name__}, not a torch.nn.Module")
    return module


def check_fit(module: nn.Module, data: Data, loss_name: str, loss_fn) -> None:
    """Run one small batch through the model and the loss; turn a shape clash into one line."""
    X, y = data.X[:2], data.y[:2]
    try:
        with torch.no_grad():
            out = module.train()(X)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("data", data.name, f"examples of shape {tuple(data.input_shape)} do not fit the model: {first}") from None
    if loss_name == "cross_entropy":
        if data.num_classes is None:
            raise ConfigError("loss.name", loss_name, f"needs class labels, but dataset {data.name!r} has real-valued targets")
        if out.ndim != 2:
            raise ConfigError("model", tuple(out.shape[1:]), "cross_entropy needs outputs of shape (batch, classes)")
        if data.num_classes > out.shape[1]:
            raise ConfigError("data", data.name, f"has {data.num_classes} classes but the model has {out.shape[1]} outputs")
    elif loss_name == "mse":
        per = math.prod(out.shape[1:])
        want = data.num_classes if data.num_classes is not None else math.prod(data.y.shape[1:]) if data.y.ndim > 1 else 1
        if per != want:
            raise ConfigError("data", data.name, f"targets have {want} values per example but the model has {per} outputs")
    try:
        with torch.no_grad():
            value = loss_fn(out, y)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("loss.name", loss_name, f"fails on this model's output: {first}") from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ConfigError("loss.name", loss_name, "must return a scalar (the mean over the batch)")


def build(study: Study) -> Built:
    """Build the Problem (model on data with the loss) and the learning-rate sequence of a study."""
    device = resolve_device(study.study.device)
    # float32 on CUDA: TF32 only when the study asks (torch's matmul default is off, cuDNN's on)
    torch.backends.cuda.matmul.allow_tf32 = bool(study.study.tf32)
    torch.backends.cudnn.allow_tf32 = bool(study.study.tf32)
    dtype = resolve_dtype(study.study.dtype)
    # quadratic-style models carry their own input size; data may be inferred from the model
    data = build_data(study, input_shape=_model_dim(study))
    module = build_model(study, data)
    loss_fn = study.registry("losses").resolve(study.loss.name, "loss.name")
    module = module.to(dtype)
    data_t = data.to("cpu", dtype)
    check_fit(module, data_t, study.loss.name, loss_fn)
    opt = study.optimizer
    if isinstance(opt.batch_size, int) and opt.batch_size > len(data):
        raise ConfigError("optimizer.batch_size", opt.batch_size, f"larger than the dataset ({len(data)} examples)")
    problem = Problem(module, loss_fn, data, dtype=dtype, device=device, chunk_size=study.data.chunk_size,
                      hvp=study.loss.hvp)
    lrs = build_schedule(opt.schedule.name, opt.lr, dict(opt.schedule.options), opt.steps, study.registry("schedules"))
    return Built(study, problem, lrs)


def _model_dim(study: Study) -> tuple[int, ...] | None:
    if study.model.name == "quadratic" and study.data.name == "points":
        A = study.model.options.get("A")
        return (len(A),) if A is not None else (2,)
    return None
