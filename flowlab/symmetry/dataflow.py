"""Following a layer's channels through the traced data flow (the machinery of :mod:`.detect`).

Every tensor downstream of a layer carries, per example, an integer *label tensor*: the layer's
channel each element comes from.  :meth:`DataFlow.follow` pushes the labels through positively
homogeneous ops (ReLU, LeakyReLU, PReLU, dropout, pooling within a channel, reshape / flatten /
permute that keep the batch dim, reductions within a channel, scalar multiplication) and stops
at *sinks* — the input of a Linear/Conv (which weight columns read which channel) or a
normalisation (which channels are normalised together).  Anything else ends the search with a
reason (:class:`Fail`): an op that is not positively homogeneous, a mixing op (``add``, ``cat``,
``matmul`` with another activation), a normalisation without batch statistics, the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowlab.problem import ParamLayout

from .groups import layer_name
from .trace import Call, Graph, Ref

# ----------------------------------------------------------------- op tables (by function name)
_LAYER = {"linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv"}
_NORM = {"batch_norm", "instance_norm", "layer_norm", "group_norm", "rms_norm"}
_HOMOG = {
    "relu", "relu_", "leaky_relu", "leaky_relu_", "prelu", "_prelu_kernel", "rrelu", "rrelu_", "abs", "abs_",
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "feature_dropout_",
    "neg", "__neg__", "negative", "contiguous", "clone", "to", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "type_as",
}
_SCALAR = {"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "__truediv__", "__itruediv__",
           "true_divide", "divide"}
_DIVIDES = {"div", "div_", "__truediv__", "__itruediv__", "true_divide", "divide"}
_CLAMP = {"clamp", "clamp_", "clamp_min", "clamp_min_", "clip", "clip_"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze", "squeeze_",
            "unsqueeze_"}
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
         "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
         "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
         "lp_pool1d", "lp_pool2d", "lp_pool3d"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "nansum", "nanmean"}
_SOFTMAX = {"softmax", "log_softmax", "_softmax", "_log_softmax"}
_IDENTITY_LIKE = {"contiguous", "clone", "to", "float", "double", "half", "bfloat16", "cpu", "cuda", "type_as"}
_NOT_HOMOG = {"tanh", "sigmoid", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "hardtanh", "relu6",
              "hardswish", "hardsigmoid", "logsigmoid", "softsign", "tanhshrink", "exp", "log", "sin", "cos", "sqrt",
              "pow", "__pow__", "square", "glu", "alpha_dropout", "feature_alpha_dropout", "threshold", "hardshrink",
              "softshrink", "erf"}
_MIXING = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_", "cat", "concat",
           "concatenate", "stack", "matmul", "__matmul__", "mm", "bmm", "einsum", "addmm", "baddbmm"}

KIND_ORDER = {"scale": 0, "rescale": 1, "translation": 2}


def _pyscalar(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass
class Layer:
    """A traced Linear/Conv/normalisation call whose weight (and bias) are plain parameters used
    nowhere else."""

    call: Call
    op: str  # linear | conv | batch_norm | instance_norm | layer_norm | group_norm | rms_norm
    weight: str | None
    bias: str | None
    input: int | None  # value index of the input
    output: int
    eps: float = 0.0
    name: str = ""  # for reports: the module of its weight (or bias) parameter
    why: str = ""  # why its parameters are not usable (shared, computed, ...)


@dataclass
class LayerSink:
    layer: Layer
    unit_labels: torch.Tensor  # (units,) source channel read by each input column / channel


@dataclass
class NormSink:
    call: Call
    op: str
    rows: torch.Tensor  # (normalisation units, elements): source channel of each element
    eps: float


class Fail(Exception):
    """A chain search ends: the message says why."""

    pass



class DataFlow:
    """The traced graph with its recognised layers; label propagation along it."""

    def __init__(self, graph: Graph, layout: ParamLayout):
        self.g = graph
        self.layout = layout
        self.N = graph.batch
        self.layers: dict[int, Layer] = {}  # call index -> layer (recognised, clean parameters)
        self.bad_params: dict[str, str] = {}
        self._find_layers()

    # ------------------------------------------------------------- helpers
    def shape(self, v: int) -> tuple[int, ...]:
        return self.g.values[v].shape

    def idx(self, name: str) -> torch.Tensor:
        e = self.layout[name]
        return torch.arange(e.offset, e.offset + e.numel, dtype=torch.long).view(e.shape)

    @staticmethod
    def _ref(x) -> int | None:
        return x.value if isinstance(x, Ref) else None

    def _op(self, call: Call) -> str:
        name = call.name
        if name in _LAYER:
            return _LAYER[name]
        return name

    def _norm_args(self, call: Call) -> dict:
        """Input, weight, bias, batch-statistics flag, eps for the normalisation ops (F.* and torch.*
        signatures differ for batch_norm / instance_norm)."""
        import torch.nn.functional as F

        name = call.name
        if name == "batch_norm":
            if call.func is F.batch_norm:
                w, b, stats = call.arg(3, "weight"), call.arg(4, "bias"), call.arg(5, "training", False)
            else:
                w, b, stats = call.arg(1, "weight"), call.arg(2, "bias"), call.arg(5, "training", False)
            eps = call.arg(7, "eps", 1e-5)
        elif name == "instance_norm":
            if call.func is F.instance_norm:
                w, b, stats = call.arg(3, "weight"), call.arg(4, "bias"), call.arg(5, "use_input_stats", True)
            else:
                w, b, stats = call.arg(1, "weight"), call.arg(2, "bias"), call.arg(5, "use_input_stats", True)
            eps = call.arg(7, "eps", 1e-5)
        elif name in ("layer_norm", "group_norm"):
            w, b, stats, eps = call.arg(2, "weight"), call.arg(3, "bias"), True, call.arg(4, "eps", 1e-5)
        else:  # rms_norm
            w, b, stats, eps = call.arg(2, "weight"), None, True, call.arg(3, "eps", None)
            if eps is None:
                eps = float(torch.finfo(torch.float32).eps)
        return {"input": call.arg(0, "input"), "weight": w, "bias": b, "stats": bool(stats), "eps": float(eps)}

    def _param_of(self, ref, call: Call) -> tuple[str | None, str | None]:
        """(parameter name, problem) for a weight/bias argument: the name when it is a parameter
        used only by this call, once."""
        v = self._ref(ref)
        if v is None:
            return None, None
        val = self.g.values[v]
        if val.role != "param" or val.param is None:
            return None, "is computed by an op, not a parameter"
        users = self.g.consumers.get(v, [])
        if users != [call.index] or call.inputs.count(v) != 1:
            others = sorted({self.g.calls[u].name for u in users})
            return val.param, f"parameter {val.param} is used by {len(users)} calls ({', '.join(others)}): shared"
        return val.param, None

    def _find_layers(self) -> None:
        for c in sorted(self.g.live_calls):
            call = self.g.calls[c]
            op = self._op(call)
            if op in ("linear", "conv"):
                inp, w, b, eps = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias"), 0.0
            elif op in _NORM:
                a = self._norm_args(call)
                inp, w, b, eps = a["input"], a["weight"], a["bias"], a["eps"]
            else:
                for v in call.inputs:  # a parameter used by any other op
                    val = self.g.values[v]
                    if val.role == "param" and val.param is not None:
                        self.bad_params.setdefault(val.param, f"used by {call.name}")
                continue
            wname, wprob = self._param_of(w, call)
            bname, bprob = self._param_of(b, call)
            for name, prob in ((wname, wprob), (bname, bprob)):
                if name is not None and prob is not None:
                    self.bad_params.setdefault(name, prob)
            if not call.outputs:
                continue
            ok_w = wname is not None and wprob is None
            ok_b = b is None or (bname is not None and bprob is None)
            label = layer_name(wname or bname) if (wname or bname) else f"{call.name}#{call.index}"
            self.layers[c] = Layer(call, op, wname if ok_w else None, bname if ok_b and b is not None else None,
                                    self._ref(inp), call.outputs[0], eps, label)
            if not ok_w and w is not None:
                self.layers[c].weight = None
            if not ok_b:
                self.layers[c].bias = None
                self.layers[c].weight = None if b is not None else self.layers[c].weight
            self.layers[c].why = wprob or bprob or ("its weight is not a parameter" if w is not None and not ok_w else "")
        for name, why in self.bad_params.items():
            for layer in self.layers.values():
                if layer.weight == name or layer.bias == name:
                    layer.weight = None
                    layer.bias = None
                    layer.why = why if why.startswith("parameter") else f"parameter {name} is {why}"

    def _layer_label(self, layer: Layer) -> str:
        return layer.name

    # ------------------------------------------------------------ labels
    def _source_labels(self, layer: Layer) -> torch.Tensor:
        shape = self.shape(layer.output)[1:]
        if layer.op == "linear":
            C = shape[-1]
            return torch.arange(C).expand(shape).contiguous()
        if layer.op in ("conv", "batch_norm", "instance_norm", "group_norm"):
            C = shape[0]
            return torch.arange(C).view(C, *([1] * (len(shape) - 1))).expand(shape).contiguous()
        # layer_norm / rms_norm: one label per element of normalized_shape
        ns = tuple(self.g.values[self.g.params[layer.weight]].shape)
        return torch.arange(math.prod(ns)).view(ns).expand(shape).contiguous()

    @staticmethod
    def _channel_constant(lab: torch.Tensor, what: str) -> torch.Tensor:
        if lab.dim() < 1:
            raise Fail(f"{what} on a tensor without a channel axis")
        rows = lab.reshape(lab.shape[0], -1)
        if not bool((rows == rows[:, :1]).all()):
            raise Fail(f"{what} mixes neurons of the layer (labels not constant per channel)")
        return rows[:, 0]

    def _structural(self, call: Call, v: int, lab: torch.Tensor, out: int) -> torch.Tensor:
        """Apply a reshape/permute op to the per-example labels (checking it keeps the batch dim)."""
        in_shape, out_shape = self.shape(v), self.shape(out)
        N = self.N
        if in_shape[0] != N or out_shape[0] != N:
            raise Fail(f"{call.name} changes the batch dimension")
        full = lab.unsqueeze(0).expand(in_shape).contiguous()
        batch = torch.arange(N).view(N, *([1] * (len(in_shape) - 1))).expand(in_shape).contiguous()
        if call.name in _RESHAPE:
            lab_out, b_out = full.reshape(out_shape), batch.reshape(out_shape)
        else:
            rest = call.args[1:]
            if any(isinstance(a, Ref) for a in rest) or any(isinstance(a, Ref) for a in call.kwargs.values()):
                raise Fail(f"{call.name} with tensor arguments")
            fn = getattr(torch.Tensor, call.name)
            lab_out, b_out = fn(full, *rest, **call.kwargs), fn(batch, *rest, **call.kwargs)
        if tuple(lab_out.shape) != out_shape:
            raise Fail(f"{call.name}: cannot follow its shape change")
        expect = torch.arange(N).view(N, *([1] * (len(out_shape) - 1)))
        if not bool((b_out == expect).all()):
            raise Fail(f"{call.name} moves or mixes the batch dimension")
        return lab_out[0].contiguous()

    # ------------------------------------------------------- one chain step
    def _step(self, call: Call, v: int, lab: torch.Tensor):
        """Follow value v (labels ``lab``) through ``call``: returns ('pass', out, lab) or a sink."""
        name, op = call.name, self._op(call)
        first = self._ref(call.args[0]) if call.args else self._ref(call.kwargs.get("input"))
        if call.index in self.layers:
            layer = self.layers[call.index]
            if layer.input != v:
                raise Fail(f"is used as a weight/bias by {name}")
            if op in ("linear", "conv"):
                if layer.weight is None:
                    raise Fail(f"goes to {self._layer_label(layer)} ({name}) whose weight is not a plain parameter")
                W = self.g.values[self.g.params[layer.weight]].shape
                if op == "linear":
                    if lab.dim() < 1 or lab.shape[-1] != W[1]:
                        raise Fail(f"{name}: unexpected input shape")
                    rows = lab.reshape(-1, W[1])
                    if not bool((rows == rows[:1]).all()):
                        raise Fail(f"the columns of {self._layer_label(layer)} mix neurons")
                    return LayerSink(layer, rows[0].clone())
                units = self._channel_constant(lab, f"{name} input")
                return LayerSink(layer, units.clone())
            return self._norm_sink(call, lab)
        if op in _NORM:  # a normalisation whose parameters are not plain (or absent): still a sink
            if first != v:
                raise Fail(f"is used as a weight/bias by {name}")
            return self._norm_sink(call, lab)
        if first != v or call.inputs.count(v) != 1:
            raise Fail(f"goes to {name} together with another tensor (mixing)")
        if not call.outputs:
            raise Fail(f"goes to {name}, which returns no tensor")
        out = call.outputs[0]
        others = [i for i in call.inputs if i != v and self.g.values[i].role != "param"]
        if name in _HOMOG:
            if others and name not in ("to", "type_as"):
                raise Fail(f"goes to {name} together with another tensor")
            return ("pass", out, lab)
        if name in _SCALAR:
            other = call.args[1] if len(call.args) > 1 else call.kwargs.get("other")
            if not _pyscalar(other) or (name in _DIVIDES and other == 0):
                raise Fail(f"goes to {name} with a tensor (only multiplication by a constant number is homogeneous)")
            return ("pass", out, lab)
        if name in _CLAMP:
            lo = call.arg(1, "min")
            hi = call.arg(2, "max")
            if name.startswith("clamp_min"):
                hi = None
            if not (_pyscalar(lo) and lo == 0 and hi is None):
                raise Fail(f"goes to {name}(min={lo}, max={hi}), which is not positively homogeneous")
            return ("pass", out, lab)
        if name in _RESHAPE or name in _PERMUTE:
            return ("pass", out, self._structural(call, v, lab, out))
        if name in _POOL:
            d = int(name.split("pool")[1][0])
            if len(self.shape(v)) != d + 2:
                raise Fail(f"{name} on an input without batch and channel axes")
            chan = self._channel_constant(lab, name)
            oshape = self.shape(out)[1:]
            return ("pass", out, chan.view(-1, *([1] * d)).expand(oshape).contiguous())
        if name in _REDUCE:
            dim = call.arg(1, "dim")
            if dim is None or isinstance(dim, Ref):
                raise Fail(f"goes to {name} over all elements (including the batch)")
            keep = bool(call.arg(2, "keepdim", False))
            nd = len(self.shape(v))
            dims = [d % nd for d in (dim if isinstance(dim, tuple | list) else (dim,))]
            if 0 in dims:
                raise Fail(f"goes to {name} over the batch dimension")
            ld = [d - 1 for d in dims]
            hi, lo = lab.amax(ld, keepdim=True), lab.amin(ld, keepdim=True)
            if not bool((hi == lo).all()):
                raise Fail(f"goes to {name} across neurons (mixing)")
            return ("pass", out, lab.amax(ld, keepdim=keep).contiguous())
        if name == "pad":
            pad = call.arg(1, "pad")
            mode = call.arg(2, "mode", "constant")
            value = call.arg(3, "value", None)
            nd = len(self.shape(v))
            if mode == "constant" and value not in (None, 0, 0.0):
                raise Fail(f"pad with the constant {value} is not homogeneous")
            if len(pad) // 2 > nd - 2:
                raise Fail("pad over the channel axis")
            chan = self._channel_constant(lab, "pad")
            oshape = self.shape(out)[1:]
            return ("pass", out, chan.view(-1, *([1] * (len(oshape) - 1))).expand(oshape).contiguous())
        if name in _NOT_HOMOG:
            raise Fail(f"goes to {name}, which is not positively homogeneous")
        if name in _MIXING:
            other = call.args[1] if len(call.args) > 1 else None
            if _pyscalar(other):
                raise Fail(f"goes to {name} with the constant {other} (an offset breaks homogeneity)")
            raise Fail(f"goes to {name} with another tensor (a residual/skip connection or mixing)")
        if name in _SOFTMAX or name in ("cross_entropy", "nll_loss", "mse_loss"):
            raise Fail(f"goes to {name} (no following layer)")
        raise Fail(f"goes to {name}, which flowlab does not analyse")

    def _norm_sink(self, call: Call, lab: torch.Tensor) -> NormSink:
        name = call.name
        a = self._norm_args(call)
        if not a["stats"]:
            raise Fail(f"goes to {name} without batch statistics (eval mode: an affine map, not a normalisation)")
        if name in ("batch_norm", "instance_norm"):
            rows = lab.reshape(lab.shape[0], -1) if lab.dim() else lab.reshape(1, 1)
        elif name == "group_norm":
            G = int(call.arg(1, "num_groups"))
            rows = lab.reshape(G, -1)
        else:
            ns = call.arg(1, "normalized_shape")
            ns = (ns,) if isinstance(ns, int) else tuple(ns)
            rows = lab.reshape(-1, math.prod(ns))
        return NormSink(call, name, rows, a["eps"])

    # -------------------------------------------------------- chain search
    def follow(self, start: int, lab: torch.Tensor) -> list:
        sinks, queue, seen = [], [(start, lab)], set()
        while queue:
            v, lab = queue.pop()
            if v in seen:
                raise Fail("reaches the same tensor twice (mixing)")
            seen.add(v)
            if v in self.g.outputs:
                raise Fail("reaches the loss / output (no following layer)")
            users = self.g.consumers.get(v, [])
            if not users:
                raise Fail("is not used")
            for c in users:
                r = self._step(self.g.calls[c], v, lab)
                if isinstance(r, tuple):
                    queue.append((r[1], r[2]))
                else:
                    sinks.append(r)
        return sinks


    def _reaches_layer(self, start: int) -> bool:
        stack, seen = [start], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for c in self.g.consumers.get(v, []):
                call = self.g.calls[c]
                if c in self.layers or call.name in _NORM or call.name in _LAYER:
                    return True
                stack.extend(call.outputs)
        return False

    def _shift_sinks(self, z: int) -> None:
        """Raise unless every use of the logits z is (through constant scalings and no-op reshapes)
        a softmax / log-softmax over the last axis or a cross-entropy on (batch, classes)."""
        queue, seen = [z], set()
        while queue:
            v = queue.pop()
            if v in seen:
                raise Fail("the logits are used twice")
            seen.add(v)
            if v in self.g.outputs:
                raise Fail("the logits are the model's output with no softmax / cross-entropy loss")
            users = self.g.consumers.get(v, [])
            if not users:
                raise Fail("the logits are not used")
            for c in users:
                call = self.g.calls[c]
                name = call.name
                first = self._ref(call.args[0]) if call.args else self._ref(call.kwargs.get("input"))
                if first != v or call.inputs.count(v) != 1:
                    raise Fail(f"the logits go to {name} together with another tensor")
                nd = len(self.shape(v))
                if name in _SOFTMAX:
                    dim = call.arg(1, "dim")
                    if dim is None:
                        dim = 0 if nd in (0, 1, 3) else 1  # torch's implicit softmax dim
                    if dim % nd != nd - 1:
                        raise Fail(f"{name} over dim {dim}, not the class axis")
                    continue
                if name == "cross_entropy":
                    if nd != 2:
                        raise Fail("cross_entropy on logits that are not (batch, classes)")
                    continue
                if not call.outputs:
                    raise Fail(f"the logits go to {name}")
                out = call.outputs[0]
                if name in _IDENTITY_LIKE or (name in _SCALAR and _pyscalar(call.args[1] if len(call.args) > 1 else None)):
                    queue.append(out)
                elif name in _RESHAPE and self.shape(out) == self.shape(v):
                    queue.append(out)
                elif name == "mse_loss" or name in ("sub", "__sub__", "__rsub__"):
                    raise Fail(f"the logits go to {name} (a squared-error loss has no translation symmetry)")
                else:
                    raise Fail(f"the logits go to {name}, not to a softmax / log-softmax / cross-entropy")
