"""A concrete data-flow trace of one forward pass (and the loss) at the torch-API level.

The model runs for real on an example batch under a :class:`torch.overrides.TorchFunctionMode`
that records every torch function / tensor method it calls, with which tensors (by object
identity) go in and come out.  Unlike ``torch.fx`` symbolic tracing this follows the data flow that
actually happens (Python control flow, ``x.view(x.size(0), -1)``, in-place activations, user
``forward`` code), and it never relies on module order or names: parameters are recognised by
identity among ``module.named_parameters()``.

The result is a :class:`Graph` of :class:`Value` s (tensors; in-place ops create a new version)
and :class:`Call` s, pruned to what reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Ref:
    """A traced tensor inside a call's arguments."""

    value: int


@dataclass
class Value:
    index: int
    shape: tuple[int, ...]
    producer: int | None = None  # index of the call that made it (None: input, parameter, constant)
    param: str | None = None  # parameter name when this is a parameter (as first seen)
    role: str = "const"  # "param" | "input" | "const" | "op"
    floating: bool = True


@dataclass
class Call:
    index: int
    func: Any
    args: tuple
    kwargs: dict
    inputs: list[int] = field(default_factory=list)  # traced values among the arguments (with repeats)
    outputs: list[int] = field(default_factory=list)
    out_struct: Any = None  # the output with tensors replaced by Ref

    @property
    def name(self) -> str:
        return getattr(self.func, "__name__", None) or type(self.func).__name__

    def arg(self, pos: int, key: str, default: Any = None) -> Any:
        if len(self.args) > pos:
            return self.args[pos]
        return self.kwargs.get(key, default)


@dataclass
class Graph:
    values: list[Value]
    calls: list[Call]
    outputs: list[int]  # the terminal values (the loss, or the model's outputs)
    batch: int
    live_calls: set[int] = field(default_factory=set)
    consumers: dict[int, list[int]] = field(default_factory=dict)  # value -> live calls that read it
    params: dict[str, int] = field(default_factory=dict)  # parameter name -> its value

    def finish(self) -> Graph:
        """Keep only the calls on a path to the terminal values; index their consumers."""
        live_values = set(self.outputs)
        stack = list(self.outputs)
        while stack:
            v = self.values[stack.pop()]
            if v.producer is None or v.producer in self.live_calls:
                continue
            self.live_calls.add(v.producer)
            for i in self.calls[v.producer].inputs:
                if i not in live_values:
                    live_values.add(i)
                    stack.append(i)
        self.consumers = {}
        for c in sorted(self.live_calls):
            for i in dict.fromkeys(self.calls[c].inputs):
                self.consumers.setdefault(i, []).append(c)
        return self

    def value_of(self, obj: Any) -> int | None:
        return obj.value if isinstance(obj, Ref) else None


_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__", "__ipow__", "__setitem__"}


class _Recorder(TorchFunctionMode):
    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.values: list[Value] = []
        self.calls: list[Call] = []
        self.by_id: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive so that ids stay unique
        self.param_names = params

    def register(self, t: torch.Tensor, role: str, producer: int | None = None, param: str | None = None) -> int:
        v = Value(len(self.values), tuple(t.shape), producer, param, role, t.is_floating_point() or t.is_complex())
        self.values.append(v)
        self.by_id[id(t)] = v.index
        self.keep.append(t)
        return v.index

    def _ref(self, t: torch.Tensor, inputs: list[int]) -> Ref:
        vid = self.by_id.get(id(t))
        if vid is None:
            name = self.param_names.get(id(t))
            vid = self.register(t, "param" if name else "const", param=name)
        inputs.append(vid)
        return Ref(vid)

    def _walk(self, obj: Any, inputs: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            return self._ref(obj, inputs)
        if isinstance(obj, tuple | list):
            return tuple(self._walk(o, inputs) for o in obj)
        if isinstance(obj, dict):
            return {k: self._walk(o, inputs) for k, o in obj.items()}
        return obj

    def _outputs(self, obj: Any, call: Call) -> Any:
        if isinstance(obj, torch.Tensor):
            vid = self.register(obj, "op", producer=call.index)
            call.outputs.append(vid)
            return Ref(vid)
        if isinstance(obj, tuple | list):
            return tuple(self._outputs(o, call) for o in obj)
        return obj

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        mutated = None
        if name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__")) or kwargs.get("inplace") is True:
            if args and isinstance(args[0], torch.Tensor):
                mutated = args[0]
        if "out" in kwargs and isinstance(kwargs["out"], torch.Tensor):
            mutated = kwargs["out"]
        has_tensor_out = isinstance(out, torch.Tensor) or (
            isinstance(out, tuple | list) and any(isinstance(o, torch.Tensor) for o in out))
        if not has_tensor_out and mutated is None:
            return out
        inputs: list[int] = []
        call = Call(len(self.calls), func, (), {}, inputs)
        call.args = self._walk(tuple(args), inputs)
        call.kwargs = self._walk(dict(kwargs), inputs)
        self.calls.append(call)
        if has_tensor_out:
            call.out_struct = self._outputs(out, call)
        if mutated is not None and (not isinstance(out, torch.Tensor) or out is not mutated):
            vid = self.register(mutated, "op", producer=call.index)
            call.outputs.append(vid)
            if call.out_struct is None:
                call.out_struct = Ref(vid)
        return out


def _terminals(obj: Any, rec: _Recorder) -> list[int]:
    out: list[int] = []
    if isinstance(obj, torch.Tensor):
        vid = rec.by_id.get(id(obj))
        if vid is not None:
            out.append(vid)
    elif isinstance(obj, tuple | list):
        for o in obj:
            out += _terminals(o, rec)
    elif isinstance(obj, dict):
        for o in obj.values():
            out += _terminals(o, rec)
    return out


def trace(module: nn.Module, example: torch.Tensor, loss_fn=None, target: torch.Tensor | None = None) -> Graph:
    """Run ``module(example)`` (and ``loss_fn(output, target)``) once, recording the data flow.

    The module runs in training mode (BatchNorm with batch statistics, as flowlab evaluates it),
    without autograd, with BatchNorm running statistics and the random-number state left as they
    were.
    """
    from flowlab.problem import pure_batchnorm

    params = {id(p): n for n, p in module.named_parameters()}
    rec = _Recorder(params)
    was_training = module.training
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        module.train()
        with torch.random.fork_rng(devices=devices), torch.no_grad(), pure_batchnorm(module):
            for n, p in module.named_parameters():
                rec.register(p, "param", param=n)
            rec.register(example, "input")
            if target is not None:
                rec.register(target, "input")
            with rec:
                out = module(example)
                loss = loss_fn(out, target) if loss_fn is not None else None
    finally:
        module.train(was_training)
    terminals = _terminals(loss if loss is not None else out, rec)
    graph = Graph(rec.values, rec.calls, terminals, int(example.shape[0]))
    graph.params = {v.param: v.index for v in rec.values if v.role == "param" and v.param is not None}
    return graph.finish()
