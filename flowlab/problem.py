"""The Problem: a model, a loss and a dataset seen as functions of ONE flat parameter vector θ.

θ is laid out in ``module.named_parameters()`` order, each tensor flattened, exactly as
``torch.nn.utils.parameters_to_vector`` does; :class:`ParamLayout` is that mapping (names, offsets,
shapes) and is public: symmetry groups are index sets into it.

Evaluation runs the model itself with its parameters living as views into one flat buffer (so a
gradient is one backward pass with no gathering), in training mode (BatchNorm uses batch
statistics).  Buffers such as BatchNorm running statistics are not parameters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import Data
from .errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]
HVP_METHODS = ("auto", "forward_over_reverse", "double_backward")


@dataclass(frozen=True)
class ParamEntry:
    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


class ParamLayout:
    """Where each named parameter lives in the flat θ."""

    def __init__(self, entries: list[ParamEntry]):
        self.entries = tuple(entries)
        self.size = sum(e.numel for e in entries)
        self._by_name = {e.name: e for e in entries}
        self._sizes = [e.numel for e in entries]

    @classmethod
    def from_module(cls, module: nn.Module) -> ParamLayout:
        entries, offset = [], 0
        for name, p in module.named_parameters():
            entries.append(ParamEntry(name, offset, p.numel(), tuple(p.shape)))
            offset += p.numel()
        return cls(entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __getitem__(self, name: str) -> ParamEntry:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.entries)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of θ shaped like the parameters (differentiable)."""
        parts = theta.split(self._sizes)
        return {e.name: t.view(e.shape) for e, t in zip(self.entries, parts)}

    def flatten(self, tensors: dict[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        values = [tensors[e.name] for e in self.entries] if isinstance(tensors, dict) else list(tensors)
        return torch.cat([t.reshape(-1) for t in values])

    def name_of(self, index: int) -> str:
        for e in self.entries:
            if e.offset <= index < e.offset + e.numel:
                return e.name
        raise IndexError(index)

    def to_dict(self) -> dict:
        return {"names": self.names, "offsets": [e.offset for e in self.entries],
                "shapes": [list(e.shape) for e in self.entries], "size": self.size}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> ParamLayout:
        entries = [ParamEntry(n, o, int(torch.Size(s).numel()), tuple(s))
                   for n, o, s in zip(d["names"], d["offsets"], d["shapes"])]
        return cls(entries)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("study.device", device, "CUDA is not available here; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError("study.device", device, "allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda:") and device[5:].isdigit() and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError("study.device", device, f"this machine has {torch.cuda.device_count()} CUDA device(s): "
                          f"cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "float64": torch.float64}
    if dtype not in table:
        raise ConfigError("study.dtype", dtype, "allowed: float32, float64")
    return table[dtype]


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def pure_batchnorm(module: nn.Module, norms: list | None = None) -> Iterator[None]:
    """Inside, BatchNorm layers (in training mode) use batch statistics without updating their
    running statistics: evaluation is a pure function of θ (needed under torch.func transforms)."""
    if norms is None:
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _bn_primitive_forward(m: nn.modules.batchnorm._BatchNorm):
    """BatchNorm (batch statistics) from primitive ops: autograd through it is right at every order."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        out = (x - mean) / torch.sqrt(var + m.eps)
        if m.affine:
            out = out * m.weight.view(shape) + m.bias.view(shape)
        return out

    return forward


@contextmanager
def _primitive_batchnorm(module: nn.Module) -> Iterator[bool]:
    """Inside, BatchNorm layers in training mode compute with primitive ops (no running-statistics
    update).  torch's fused batch_norm has a correct first and second derivative but a wrong third
    (its double-backward formula is not itself differentiated correctly, torch 2.x), so third-derivative
    contractions go through this.  Yields whether any layer was replaced."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.forward = _bn_primitive_forward(m)
    try:
        yield bool(norms)
    finally:
        for m in norms:
            del m.forward


class GradGraph:
    """A gradient at θ with its autograd graph kept (see :meth:`Problem.grad_graph`)."""

    def __init__(self, problem: Problem, grads: tuple[torch.Tensor, ...], third_order_ok: bool = True):
        self.problem, self.grads = problem, grads
        #: False when the graph went through torch's fused BatchNorm (wrong third derivatives)
        self.third_order_ok = third_order_ok

    def _split(self, v: torch.Tensor) -> list[torch.Tensor]:
        return list(self.problem.layout.unflatten(v.detach()).values())

    def _flat(self, parts, like: torch.Tensor) -> torch.Tensor:
        out = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(self.problem._params, parts)]
        return torch.cat([o.reshape(-1) for o in out]).to(like.dtype)

    def _live(self) -> list[int]:
        return [i for i, g in enumerate(self.grads) if g.requires_grad]

    def hvp(self, v: torch.Tensor, retain: bool = True) -> torch.Tensor:
        """H(θ) v."""
        live = self._live()
        if not live:  # the gradient does not depend on θ
            return torch.zeros_like(v)
        vs = self._split(v)
        with torch.enable_grad():
            parts = torch.autograd.grad([self.grads[i] for i in live], self.problem._params,
                                        grad_outputs=[vs[i] for i in live], retain_graph=retain, allow_unused=True)
        return self._flat(parts, v)

    def d3(self, v: torch.Tensor, retain: bool = True) -> torch.Tensor:
        """∇_θ (vᵀ H(θ) v), v fixed."""
        if not self.third_order_ok:
            raise RuntimeError("this graph went through fused BatchNorm: build it with grad_graph(..., third_order=True)")
        live = self._live()
        if not live:
            return torch.zeros_like(v)
        vs = self._split(v)
        params = self.problem._params
        with torch.enable_grad():
            hv = torch.autograd.grad([self.grads[i] for i in live], params, grad_outputs=[vs[i] for i in live],
                                     create_graph=True, retain_graph=True, allow_unused=True)
            live2 = [i for i, h in enumerate(hv) if h is not None and h.requires_grad]
            if not live2:  # H does not depend on θ (a quadratic): ∇³L = 0
                return torch.zeros_like(v)
            parts = torch.autograd.grad([hv[i] for i in live2], params, grad_outputs=[vs[i] for i in live2],
                                        retain_graph=retain, allow_unused=True)
        return self._flat(parts, v)


def free_memory(device: torch.device) -> float:
    """Free bytes on ``device``: CUDA's free memory, else the host's available memory."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class Problem:
    """loss / grad / hvp of a model on data, as functions of one flat θ.

    Parameters
    ----------
    module: the model; it is moved to ``device``/``dtype`` and its parameters are re-seated as views
        into one flat buffer (the module keeps working as usual).
    loss_fn: ``loss(output, target) -> scalar`` averaged over the batch.
    data: the dataset (moved to the device; examples along dim 0).
    chunk_size: the full-batch functions accumulate over chunks of at most this many examples, so a
        full-batch gradient never holds the activations of the whole dataset at once.  With
        BatchNorm each chunk is normalised with its own statistics.
    hvp: ``forward_over_reverse`` (jvp of the gradient), ``double_backward``, or ``auto`` (time both on
        the first call and keep the faster).
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 data: Data, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 chunk_size: int | None = None, hvp: str = "auto"):
        if hvp not in HVP_METHODS:
            raise ConfigError("problem.hvp", hvp, f"allowed: {', '.join(HVP_METHODS)}")
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.dtype = dtype
        self.module = module.to(device=self.device, dtype=dtype).train()
        self.loss_fn = loss_fn
        self.data = data.to(self.device, dtype)
        self.X, self.y = self.data.X, self.data.y
        self.n = len(self.data)
        if chunk_size is None and self.device.type == "cuda":
            chunk_size = "auto"
        self.chunk_auto = chunk_size == "auto"
        if not self.chunk_auto:
            if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                           or chunk_size <= 0):
                raise ConfigError("data.chunk_size", chunk_size, 'expected a positive integer or "auto"')
        self.chunk_size = self.n if (chunk_size is None or self.chunk_auto) else int(chunk_size)
        self.layout = ParamLayout.from_module(self.module)
        self.dim = self.layout.size
        if self.dim == 0:
            raise ConfigError("model", type(module).__name__, "the model has no parameters")
        self._params = [p for _, p in self.module.named_parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.device, dtype)
        self._theta = flat
        self._grad = torch.zeros_like(flat)
        for p, (_name, view) in zip(self._params, self.layout.unflatten(self._theta).items()):
            p.data = view
        for p, view in zip(self._params, self.layout.unflatten(self._grad).values()):
            p.grad = view
        self.theta0 = flat.clone()
        self.hvp_method = hvp
        self.counts = {"grad": 0, "loss": 0, "hvp": 0, "d3": 0}
        #: objects derived from this problem, cached by the part that makes them under its own key
        #: (the symmetry groups, the JAX twins): they live and die with the problem
        self.derived: dict[str, Any] = {}
        self._norms = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.chunk_auto:
            self.chunk_size = self.auto_chunk_size()

    # ------------------------------------------------------------ memory
    #: the share of the free memory the full-batch functions may fill
    CHUNK_MEMORY_FRACTION = 0.5
    #: the dearest full-batch pass (HVP, third-derivative terms) ÷ a gradient pass, in memory
    CHUNK_PASS_FACTOR = 3.0

    def example_bytes(self, probe: int = 16) -> float:
        """Memory one example takes in a gradient pass (activations kept for backward).

        On CUDA it is measured (peak allocation of a pass on ``probe`` examples); elsewhere it is
        estimated from the outputs of every leaf module in a forward pass (each kept for backward),
        which is what autograd holds for the usual layers."""
        probe = max(1, min(probe, self.n))
        batch = (self.X[:probe], self.y[:probe])
        counts = dict(self.counts)
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self.loss_and_grad_(self._theta, batch)
                torch.cuda.synchronize(self.device)
                used = torch.cuda.max_memory_allocated(self.device) - base
            else:
                total = [0]

                def hook(_m, _inp, out):
                    for t in (out if isinstance(out, (tuple, list)) else (out,)):
                        if isinstance(t, torch.Tensor):
                            total[0] += t.numel() * t.element_size()

                handles = [m.register_forward_hook(hook) for m in self.module.modules() if not any(m.children())]
                try:
                    with torch.no_grad():
                        self._loss_on_module(batch)
                finally:
                    for h in handles:
                        h.remove()
                used = 2 * total[0]  # kept for backward, and the gradients flowing back
        finally:
            self.counts = counts
        return max(float(used), 1.0) / probe

    def auto_chunk_size(self, free_bytes: float | None = None) -> int:
        """Examples per chunk so that the dearest full-batch pass fills at most
        ``CHUNK_MEMORY_FRACTION`` of the free memory (``free_bytes``: measured when None — CUDA's
        free memory, or the host's available memory)."""
        if free_bytes is None:
            free_bytes = free_memory(self.device)
        per = self.example_bytes() * self.CHUNK_PASS_FACTOR
        size = int(max(1, min(self.n, (self.CHUNK_MEMORY_FRACTION * free_bytes) // per)))
        if size < self.n and self._norms:
            import warnings

            warnings.warn(f"data.chunk_size = 'auto' splits the full batch into chunks of {size} examples: "
                          "with BatchNorm every chunk is normalised with its own statistics, so full-batch values "
                          "depend on the chunk size (set data.chunk_size to fix it)", stacklevel=2)
        return size

    # ----------------------------------------------------------------- batches
    def batch(self, index: torch.Tensor | slice | None = None) -> Batch:
        if index is None:
            return self.X, self.y
        return self.X[index], self.y[index]

    def chunks(self) -> Iterator[tuple[Batch, float]]:
        """(batch, weight) pairs covering the whole dataset, weights summing to 1."""
        if self.chunk_size >= self.n:
            yield (self.X, self.y), 1.0
            return
        for start in range(0, self.n, self.chunk_size):
            stop = min(start + self.chunk_size, self.n)
            yield (self.X[start:stop], self.y[start:stop]), (stop - start) / self.n

    # ------------------------------------------------------------- evaluation
    def load(self, theta: torch.Tensor) -> None:
        """Write θ into the module's parameters (a no-op when θ is already their storage)."""
        if theta.data_ptr() != self._theta.data_ptr():
            self._theta.copy_(theta.detach())

    def _loss_on_module(self, batch: Batch, update_stats: bool = False) -> torch.Tensor:
        """The loss of the module on a batch.  BatchNorm running statistics (buffers, not used by
        training-mode losses) are updated only when ``update_stats``: by the discrete run, as in a
        torch training loop — flows, checks and HVPs leave them alone."""
        if update_stats or not self._norms:
            return self.loss_fn(self.module(batch[0]), batch[1])
        with pure_batchnorm(self.module, self._norms):
            return self.loss_fn(self.module(batch[0]), batch[1])

    def functional_output(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` as a differentiable, pure function of ``theta`` (usable under
        torch.func: BatchNorm uses batch statistics and leaves its running statistics alone)."""
        params = self.layout.unflatten(theta)
        with pure_batchnorm(self.module):
            return torch.func.functional_call(self.module, params, (x,))

    def functional_loss(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Loss as a differentiable, pure function of ``theta`` (usable under torch.func)."""
        return self.loss_fn(self.functional_output(theta, batch[0]), batch[1])

    def loss(self, theta: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        """L(θ; batch) (the whole dataset in one batch when ``batch`` is None)."""
        batch = self.batch() if batch is None else batch
        self.counts["loss"] += 1
        with torch.no_grad():
            self.load(theta)
            return self._loss_on_module(batch).detach()

    def loss_and_grad_(self, theta: torch.Tensor, batch: Batch, update_stats: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, gradient) with the gradient in an internal buffer that the next call overwrites
        (``update_stats``: let BatchNorm update its running statistics, as the discrete run does)."""
        self.counts["grad"] += 1
        with torch.no_grad():
            self.load(theta)
            self._grad.zero_()
        with torch.enable_grad():
            loss = self._loss_on_module(batch, update_stats)
            loss.backward()
        return loss.detach(), self._grad

    def loss_and_grad(self, theta: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, g = self.loss_and_grad_(theta, batch)
        return loss, g.clone()

    def grad(self, theta: torch.Tensor, batch: Batch) -> torch.Tensor:
        """∇L(θ; batch) as a new flat tensor."""
        return self.loss_and_grad(theta, batch)[1]

    def hvp(self, theta: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """H(θ; batch) v, by the method chosen at construction (``auto`` times both once)."""
        if self.hvp_method == "auto":
            self.hvp_method = self._choose_hvp(theta, v, batch)
        self.counts["hvp"] += 1
        if self.hvp_method == "forward_over_reverse":
            return self.hvp_forward_over_reverse(theta, v, batch)
        return self.hvp_double_backward(theta, v, batch)

    def hvp_forward_over_reverse(self, theta: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        grad_fn = torch.func.grad(lambda th: self.functional_loss(th, batch))
        with torch.enable_grad():
            return torch.func.jvp(grad_fn, (theta.detach(),), (v.detach(),))[1].detach()

    def hvp_double_backward(self, theta: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Double backward on the module's own parameters (no functional_call: less overhead)."""
        return self.grad_graph(theta, batch)[2].hvp(v, retain=False)

    def d3(self, theta: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """∇_θ (vᵀ H(θ; batch) v) with v held fixed: the third-derivative contraction ∇³L[v, v]
        (three reverse passes: g with its graph, Hv = ∇⟨g, v⟩ with its graph, then ∇⟨Hv, v⟩)."""
        self.counts["d3"] += 1
        return self.grad_graph(theta, batch, third_order=True)[2].d3(v, retain=False)

    def grad_graph(self, theta: torch.Tensor, batch: Batch, third_order: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, GradGraph]:
        """(loss, ∇L, graph): the gradient at θ with its autograd graph kept, so that Hessian-vector
        products and ∇³L[v, v] at the same θ reuse the forward and backward passes (as long as θ is
        not reloaded: any other evaluation of the problem invalidates the graph).  ``third_order``:
        BatchNorm layers run as primitive ops so that ``graph.d3`` is right (slower)."""
        self.load(theta)
        with torch.enable_grad(), (_primitive_batchnorm(self.module) if third_order else _nothing()):
            loss = self._loss_on_module(batch)
            grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(self._params, grads))
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
        return loss.detach(), flat, GradGraph(self, grads, third_order or not self.has_batchnorm)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.module.modules())

    def full_grad_graph(self, theta: torch.Tensor, third_order: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, GradGraph] | None:
        """:meth:`grad_graph` on the whole dataset, or None when it is evaluated in several chunks
        (keeping every chunk's graph would hold the activations of the whole dataset)."""
        if self.chunk_size < self.n:
            return None
        self.counts["grad"] += 1
        return self.grad_graph(theta, self.batch(), third_order)

    def _choose_hvp(self, theta: torch.Tensor, v: torch.Tensor, batch: Batch, reps: int = 3) -> str:
        timings = {}
        for name, fn in (("forward_over_reverse", self.hvp_forward_over_reverse), ("double_backward", self.hvp_double_backward)):
            fn(theta, v, batch)  # warm-up
            self._sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(theta, v, batch)
            self._sync()
            timings[name] = time.perf_counter() - t0
        self.hvp_timings = timings
        return min(timings, key=timings.get)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------ full-batch versions
    def full_loss(self, theta: torch.Tensor) -> torch.Tensor:
        total = None
        for batch, w in self.chunks():
            val = self.loss(theta, batch) * w
            total = val if total is None else total + val
        return total

    def full_loss_and_grad(self, theta: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-batch (loss, gradient), accumulated chunk by chunk (``out`` receives the gradient)."""
        out = torch.empty_like(self._grad) if out is None else out
        total = None
        for i, (batch, w) in enumerate(self.chunks()):
            loss, g = self.loss_and_grad_(theta, batch)
            if i == 0:
                out.copy_(g) if w == 1.0 else torch.mul(g, w, out=out)
                total = loss * w
            else:
                out.add_(g, alpha=w)
                total = total + loss * w
        return total, out

    def full_grad(self, theta: torch.Tensor) -> torch.Tensor:
        return self.full_loss_and_grad(theta)[1]

    def full_hvp(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        total = None
        for batch, w in self.chunks():
            hv = self.hvp(theta, v, batch)
            total = hv if (total is None and w == 1.0) else (hv * w if total is None else total.add_(hv, alpha=w))
        return total

    def full_d3(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Full-batch ∇_θ (vᵀ H(θ) v) (v fixed), accumulated over chunks."""
        total = None
        for batch, w in self.chunks():
            t = self.d3(theta, v, batch)
            total = t if (total is None and w == 1.0) else (t * w if total is None else total.add_(t, alpha=w))
        return total

    def __repr__(self) -> str:
        return (f"Problem({type(self.module).__name__}, {self.dim} parameters, {self.n} examples, "
                f"{str(self.dtype).replace('torch.', '')}, {self.device})")
