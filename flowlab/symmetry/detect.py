"""Automatic detection of translation / scale / rescale groups from the traced data flow.

The symmetries (Kunin et al., "Neural Mechanics", ICLR 2021, Table 1;
docs/theory.md#groups-in-real-networks):

- **translation** — the final ``Linear(in → C)`` whose logits go (only) into a softmax,
  log-softmax or cross-entropy over the class axis: each input column ``W[:, j]`` is a group (adding
  α to it adds α·x_j to every logit) and the bias vector is one more group.
- **scale** — a layer's output channel c (``W[c, ...]`` and ``b[c]``) that reaches a
  normalisation (BatchNorm in training mode, InstanceNorm: per channel; GroupNorm: per group of
  channels; LayerNorm / RMSNorm over the features: the whole layer as one group).
- **rescale** — channel c of a layer (``W_l[c, ...]``, ``b_l[c]``; or the affine ``γ_c, β_c`` of a
  normalisation) whose output reaches only the *input* of following Linear/Conv layers through
  positively homogeneous ops (ReLU, LeakyReLU, PReLU, identity, dropout, max/avg pooling,
  flatten/reshape, scalar multiplication); the outgoing set is every weight that reads channel c
  (``W_{l+1}[:, c, ...]``; after flatten the several columns of c).  The next bias is excluded.

How: every tensor of a traced forward pass carries, per example, an integer *label tensor* giving
the source channel of each element.  Shape ops are applied to the labels, pooling and reductions
must act within one channel, and a consumer layer reads off which weight columns see which
channel.  Any op not known to be positively homogeneous (tanh, GELU, sigmoid, softplus, ...),
any mixing of tensors (a residual ``add``, ``cat``, a matmul with another activation), a
parameter used more than once or through an op, a normalisation without batch statistics — ends
the search for that layer, and the layer is listed in ``skipped`` with the reason.  When unsure,
no group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flowlab.errors import FlowlabError
from flowlab.problem import ParamLayout

from .dataflow import KIND_ORDER, DataFlow, Fail, Layer, LayerSink, NormSink
from .groups import GroupBlock, Groups, Skipped, layer_name
from .trace import Graph, trace


@dataclass
class Detection:
    """What :func:`detect` found: the groups and what it skipped (with reasons)."""

    groups: Groups
    skipped: list[Skipped]
    n_calls: int = 0

    def __repr__(self) -> str:
        return f"Detection({self.groups!r}, {len(self.skipped)} skipped)"


class _Analysis(DataFlow):
    """Groups from the chains found by :class:`DataFlow`."""

    def __init__(self, graph: Graph, layout: ParamLayout):
        super().__init__(graph, layout)
        self.skipped: list[Skipped] = []
        self.blocks: list[tuple[tuple, GroupBlock]] = []

    def _incoming(self, layer: Layer) -> torch.Tensor:
        if layer.op in ("linear", "conv"):
            W = self.idx(layer.weight)
            parts = [W.reshape(W.shape[0], -1)]
        else:
            W = self.idx(layer.weight).reshape(-1)
            parts = [W.view(-1, 1)]
        if layer.bias is not None:
            parts.append(self.idx(layer.bias).reshape(-1, 1))
        return torch.cat(parts, 1)

    def _incoming_note(self, layer: Layer) -> str:
        if layer.op in ("linear", "conv"):
            return f"{layer.weight}[c]" + (f", {layer.bias}[c]" if layer.bias else "")
        return f"{layer.weight}[c]" + (f", {layer.bias}[c]" if layer.bias else "") + " (normalisation affine)"

    def _outgoing_units(self, layer: Layer) -> torch.Tensor:
        """(input units, members): the weights of ``layer`` that read each input column/channel."""
        W = self.idx(layer.weight)
        if layer.op == "linear":
            return W.t().contiguous()
        g = int(layer.call.arg(6, "groups", 1))
        n_out, Cg = W.shape[0], W.shape[1]
        K = int(math.prod(W.shape[2:]))
        return W.reshape(g, n_out // g, Cg, K).permute(0, 2, 1, 3).reshape(g * Cg, (n_out // g) * K).contiguous()

    # ------------------------------------------------------------ groups
    def rescale_and_scale(self) -> None:
        for c in sorted(self.layers):
            layer = self.layers[c]
            label = self._layer_label(layer)
            if layer.weight is None:
                why = layer.why or "its weight is not a plain parameter used once"
                if layer.op in ("linear", "conv") or layer.why:
                    self.skipped.append(Skipped(label, "scale/rescale", f"{layer.call.name}: {why}"))
                continue
            try:
                sinks = self.follow(layer.output, self._source_labels(layer))
            except Fail as exc:
                self.skipped.append(Skipped(label, "scale/rescale", f"output {exc}"))
                continue
            key = (self.layout[layer.weight].offset,)
            if all(isinstance(s, LayerSink) for s in sinks):
                self._rescale(layer, sinks, label, key)
            elif all(isinstance(s, NormSink) for s in sinks):
                self._scale(layer, sinks, label, key)
            else:
                self.skipped.append(Skipped(label, "scale/rescale", "output feeds both a layer and a normalisation"))

    def _rescale(self, layer: Layer, sinks: list[LayerSink], label: str, key: tuple) -> None:
        In = self._incoming(layer)
        C = In.shape[0]
        outs, notes = [], []
        for s in sinks:
            L = s.unit_labels
            units = self._outgoing_units(s.layer)
            if int(L.max()) >= C or int(L.min()) < 0:
                self.skipped.append(Skipped(label, "rescale", "internal: labels out of range"))
                return
            outs.append((L, units))
            per = torch.bincount(L, minlength=C)
            k = int(per.max())
            sl = self._layer_label(s.layer)
            notes.append(f"{s.layer.weight}[:, c]" + (f" ({k} columns per channel)" if k > 1 else "") + f" of {sl}")
        counts = [torch.bincount(L, minlength=C) for L, _ in outs]
        uniform = all(bool((cnt == cnt[0]).all()) for cnt in counts)
        note = f"in: {self._incoming_note(layer)}; out: " + ", ".join(notes)
        s1 = In.shape[1]
        if uniform and sum(int(cnt[0]) for cnt in counts) > 0:
            parts = [In]
            for (L, units), cnt in zip(outs, counts):
                if int(cnt[0]) == 0:
                    continue
                order = torch.argsort(L, stable=True)
                parts.append(units[order].reshape(C, -1))
            index = torch.cat(parts, 1)
            sign = torch.cat([torch.ones(s1), -torch.ones(index.shape[1] - s1)])
            block = GroupBlock("rescale", label, np.arange(C), index, sign, None, s1, note=note)
        else:
            ragged, units_kept, missing = [], [], []
            for ch in range(C):
                out = [u[L == ch].reshape(-1) for L, u in outs]
                out = torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
                if out.numel() == 0:
                    missing.append(ch)
                    continue
                idx = torch.cat([In[ch], out])
                ragged.append((idx, torch.cat([torch.ones(s1), -torch.ones(out.numel())])))
                units_kept.append(ch)
            if missing:
                self.skipped.append(Skipped(label, "rescale", f"{len(missing)} channel(s) reach no following weight",
                                            missing))
            if not ragged:
                return
            block = GroupBlock("rescale", label, np.array(units_kept), None, None, ragged, s1, note=note)
        self.blocks.append(((*key, KIND_ORDER["rescale"]), block))

    def _scale(self, layer: Layer, sinks: list[NormSink], label: str, key: tuple) -> None:
        In = self._incoming(layer)
        C = In.shape[0]
        rows = [s.rows for s in sinks]
        pure = all(bool((r.amin(1) == r.amax(1)).all()) for r in rows)
        if pure:
            comps = [np.array([ch]) for ch in range(C)]
        else:
            from scipy.sparse import coo_matrix
            from scipy.sparse.csgraph import connected_components

            a, b = [], []
            for r in rows:
                first = r[:, :1].expand_as(r)
                a.append(r.reshape(-1).numpy())
                b.append(first.reshape(-1).numpy())
            a, b = np.concatenate(a), np.concatenate(b)
            adj = coo_matrix((np.ones(len(a)), (a, b)), shape=(C, C))
            n, lab = connected_components(adj, directed=False)
            comps = [np.nonzero(lab == k)[0] for k in range(n)]
            comps.sort(key=lambda x: x[0])
        ops = sorted({s.op for s in sinks})
        eps = max(s.eps for s in sinks)
        sizes = {len(cc) for cc in comps}
        if len(comps) == 1:
            units = np.array([-1])
            what = "the whole layer"
        elif sizes == {1}:
            units = np.array([cc[0] for cc in comps])
            what = "per channel"
        else:
            units = np.arange(len(comps))
            what = "per group of channels"
        note = f"{self._incoming_note(layer)} → {'/'.join(ops)} ({what})"
        if len(sizes) == 1:
            order = torch.as_tensor(np.concatenate(comps))
            index = In[order].reshape(len(comps), -1)
            block = GroupBlock("scale", label, units, index, torch.ones(index.shape[1]), None, index.shape[1], note=note,
                               eps=eps)
        else:
            ragged = [(In[torch.as_tensor(cc)].reshape(-1), torch.ones(len(cc) * In.shape[1])) for cc in comps]
            block = GroupBlock("scale", label, units, None, None, ragged, [len(r[0]) for r in ragged], note=note, eps=eps)
        self.blocks.append(((*key, KIND_ORDER["scale"]), block))

    # -------------------------------------------------------- translation

    def translation(self) -> None:
        for c in sorted(self.layers):
            layer = self.layers[c]
            if layer.op != "linear":
                continue
            label = self._layer_label(layer)
            if self._reaches_layer(layer.output):
                continue  # a hidden layer: its logits are not a softmax's input
            if layer.weight is None:
                self.skipped.append(Skipped(label, "translation", "its weight or bias is not a plain parameter used once"))
                continue
            try:
                self._shift_sinks(layer.output)
            except Fail as exc:
                self.skipped.append(Skipped(label, "translation", str(exc)))
                continue
            W = self.idx(layer.weight)
            key = (self.layout[layer.weight].offset, KIND_ORDER["translation"])
            cols = W.t().contiguous()
            self.blocks.append((key, GroupBlock("translation", label, np.arange(cols.shape[0]), cols,
                                                torch.ones(cols.shape[1]), None, cols.shape[1],
                                                note=f"{layer.weight}[:, j] (summed over classes)")))
            if layer.bias is not None:
                b = self.idx(layer.bias).reshape(1, -1)
                self.blocks.append(((*key, 1), GroupBlock("translation", label, np.array([-1]), b, torch.ones(b.shape[1]),
                                                          None, b.shape[1], note=f"{layer.bias} (the bias vector)")))
        if not any(b.kind == "translation" for _, b in self.blocks) and not any(
                s.kind == "translation" for s in self.skipped):
            self.skipped.append(Skipped("(model)", "translation", "no Linear layer feeds a softmax / cross-entropy"))

    def run(self) -> Detection:
        self.rescale_and_scale()
        self.translation()
        in_layers = {n for la in self.layers.values() for n in (la.weight, la.bias) if n}
        for name, why in self.bad_params.items():
            if name not in in_layers and not any(la.why and name in la.why for la in self.layers.values()):
                self.skipped.append(Skipped(layer_name(name), "scale/rescale",
                                            f"parameter {name} is {why} (only Linear/Conv/normalisation weights used "
                                            "directly are analysed)"))
        self.blocks.sort(key=lambda kb: kb[0])
        skipped = list({(s.layer, s.kind, s.reason): s for s in self.skipped}.values())
        groups = Groups(self.layout, [b for _, b in self.blocks], skipped)
        return Detection(groups, skipped, len(self.g.calls))


def detect(module: nn.Module, example: torch.Tensor, loss_fn=None, target: torch.Tensor | None = None,
           layout: ParamLayout | None = None) -> Detection:
    """Find the symmetry groups of ``module`` by tracing ``module(example)`` (and
    ``loss_fn(output, target)`` when given: translation groups need to see the softmax /
    cross-entropy).  Returns a :class:`Detection` with ``groups`` (index sets into the flat θ of
    ``layout``, by default ``ParamLayout.from_module(module)``) and ``skipped``.

    Use a small batch (2–8 examples): the trace runs the model for real.
    """
    layout = layout or ParamLayout.from_module(module)
    try:
        graph = trace(module, example, loss_fn, target)
    except FlowlabError:
        raise
    except Exception as exc:  # the model itself failed on the example batch
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowlabError(f"symmetry detection: the model failed on an example batch of shape "
                           f"{tuple(example.shape)}: {first}") from exc
    return _Analysis(graph, layout).run()


def example_batch(problem, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """A few examples of the problem's data (at least 2, so that BatchNorm has a batch)."""
    k = max(1, min(n, problem.n))
    X, y = problem.X[:k], problem.y[:k]
    if k == 1:
        X, y = torch.cat([X, X]), torch.cat([y, y])
    return X, y


def detect_problem(problem, n_examples: int = 5) -> Detection:
    """:func:`detect` on a :class:`~flowlab.problem.Problem` (its module, loss and first examples)."""
    X, y = example_batch(problem, n_examples)
    return detect(problem.module, X, problem.loss_fn, y, problem.layout)
