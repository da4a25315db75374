"""Symmetry groups as index sets into the flat θ (Kunin et al., "Neural Mechanics", ICLR 2021).

A group is a set A of parameter indices with a kind:

- ``translation``: θ ↦ θ + α1_A leaves the loss unchanged; conserved under gradient flow: ⟨θ_A, 1⟩.
- ``scale``: θ_A ↦ αθ_A (α > 0); conserved: |θ_A|².
- ``rescale``: θ_A1 ↦ αθ_A1, θ_A2 ↦ θ_A2/α; conserved: |θ_A1|² − |θ_A2|² (A1 = incoming).

Every group is stored as member indices with a sign (+1 on A and A1, −1 on A2).  Groups of one
layer that share a shape are a :class:`GroupBlock` holding an ``(n_groups, size)`` index matrix, so
building the groups of a VGG-16 is a handful of tensor ops, not a Python loop over neurons.
:meth:`Groups.csr` lays all groups out as CSR matrices over θ, which is what
:class:`~flowlab.symmetry.quantities.SymmetryProjector` multiplies by (segment sums on the device).

User groups are given by parameter name and slice (:func:`parse_index_spec`), e.g.
``"fc1.weight[3, :]"``, ``"fc1.bias[3]"``, ``"fc2.weight[:, 3]"``; the letter ``i`` in a slice makes
one group per index (``"fc1.weight[i, :]"``, ``"fc1.bias[i]"``, ``"fc2.weight[:, i]"``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from flowlab.errors import ConfigError
from flowlab.problem import ParamLayout

KINDS = ("translation", "scale", "rescale")


@dataclass
class GroupBlock:
    """Groups of one kind and layer.

    Either ``index`` (n, s) with ``sign`` (s,) — every group has the same size — or ``ragged``, a
    list of per-group ``(index, sign)`` pairs.  ``n_in`` is the number of A1 members (rescale;
    for the uniform layout the first ``n_in`` columns), ``units`` the neuron/channel/column each
    group belongs to (−1 for a group that spans a whole layer or a bias vector).
    """

    kind: str
    layer: str
    units: np.ndarray
    index: torch.Tensor | None = None
    sign: torch.Tensor | None = None
    ragged: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    n_in: int | list[int] = 0
    origin: str = "detected"
    note: str = ""
    eps: float = 0.0  # the normalisation's ε for scale groups (> 0: invariance only approximate)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}")
        self.units = np.asarray(self.units, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def sizes(self) -> np.ndarray:
        if self.index is not None:
            return np.full(len(self), self.index.shape[1], dtype=np.int64)
        return np.array([len(i) for i, _ in self.ragged], dtype=np.int64)

    @property
    def in_sizes(self) -> np.ndarray:
        if isinstance(self.n_in, int):
            return np.full(len(self), self.n_in, dtype=np.int64)
        return np.asarray(self.n_in, dtype=np.int64)

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All members in group order: (indices, signs)."""
        if self.index is not None:
            return self.index.reshape(-1), self.sign.to(torch.float64).repeat(len(self))
        if not self.ragged:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return (torch.cat([i for i, _ in self.ragged]), torch.cat([s.to(torch.float64) for _, s in self.ragged]))

    def members(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index is not None:
            return self.index[j], self.sign.to(torch.float64)
        i, s = self.ragged[j]
        return i, s.to(torch.float64)

    def select(self, keep: np.ndarray) -> GroupBlock | None:
        keep = np.asarray(keep, dtype=bool)
        if keep.all():
            return self
        if not keep.any():
            return None
        idx = np.nonzero(keep)[0]
        n_in = self.n_in if isinstance(self.n_in, int) else [self.n_in[i] for i in idx]
        if self.index is not None:
            return GroupBlock(self.kind, self.layer, self.units[idx], self.index[torch.as_tensor(idx)], self.sign,
                              None, n_in, self.origin, self.note, self.eps)
        return GroupBlock(self.kind, self.layer, self.units[idx], None, None, [self.ragged[i] for i in idx], n_in,
                          self.origin, self.note, self.eps)


@dataclass
class CSR:
    """A (groups × m) sparse matrix as CSR arrays (CPU; int32 indices when they fit, float64 values)."""

    crow: torch.Tensor
    col: torch.Tensor
    val: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    def tensor(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
        import warnings

        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow.to(device), self.col.to(device),
                                           self.val.to(device=device, dtype=dtype), self.shape, check_invariants=False)


class Groups:
    """All symmetry groups of a model, in a fixed order (the Dataset's ``group`` dim).

    Attributes (numpy arrays of length G): ``kinds``, ``layers``, ``units``, ``sizes`` (|A| or
    |A1| + |A2|), ``in_sizes`` (|A1| for rescale), ``origins`` ("detected" / "user").
    """

    def __init__(self, layout: ParamLayout, blocks: Sequence[GroupBlock] = (), skipped: Sequence = ()):
        self.layout = layout
        self.blocks = [b for b in blocks if len(b)]
        self.skipped = list(skipped)
        self._offsets = np.cumsum([0] + [len(b) for b in self.blocks])

        def cat(xs: list, dt) -> np.ndarray:
            return np.concatenate(xs) if xs else np.zeros(0, dtype=dt)

        self.kinds = cat([np.full(len(b), b.kind, dtype=object) for b in self.blocks], object).astype(str)
        self.layers = cat([np.full(len(b), b.layer, dtype=object) for b in self.blocks], object).astype(str)
        self.units = cat([b.units for b in self.blocks], np.int64)
        self.sizes = cat([b.sizes for b in self.blocks], np.int64)
        self.in_sizes = cat([b.in_sizes if b.kind == "rescale" else b.sizes for b in self.blocks], np.int64)
        self.origins = cat([np.full(len(b), b.origin, dtype=object) for b in self.blocks], object).astype(str)
        self.eps = cat([np.full(len(b), b.eps) for b in self.blocks], np.float64)
        self._csr: dict[str, CSR] = {}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __repr__(self) -> str:
        counts = {k: int((self.kinds == k).sum()) for k in KINDS}
        return f"Groups({len(self)}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")"

    # ------------------------------------------------------------- members
    def _locate(self, g: int) -> tuple[GroupBlock, int]:
        if not 0 <= g < len(self):
            raise IndexError(g)
        b = int(np.searchsorted(self._offsets, g, side="right") - 1)
        return self.blocks[b], g - int(self._offsets[b])

    def members(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group g's flat-θ indices and signs (+1: A or A1, −1: A2)."""
        block, j = self._locate(g)
        return block.members(j)

    def indicator(self, g: int, m: int | None = None, signed: bool = False) -> torch.Tensor:
        """1_A as a dense float64 vector (with the signs when ``signed``)."""
        idx, sign = self.members(g)
        out = torch.zeros(m or self.layout.size, dtype=torch.float64)
        out[idx] = sign if signed else 1.0
        return out

    def block_of(self, g: int) -> GroupBlock:
        return self._locate(g)[0]

    # ----------------------------------------------------------------- CSR
    def csr(self, part: str) -> CSR:
        """CSR matrix of the groups over θ.

        ``lin``: rows of translation groups (1 on A; other rows empty), for ⟨x_A, 1⟩.
        ``quad``: rows of scale and rescale groups with signs (translation rows empty), for
        Σ_A1 x − Σ_A2 x applied to x = θ², ĝ², θ⊙v, ...
        ``abs``: every group, 1 on A ∪ A1 ∪ A2, for norms |x_A|².
        """
        if part not in self._csr:
            self._csr[part] = self._build(part)
        return self._csr[part]

    def _build(self, part: str) -> CSR:
        cols, vals, sizes = [], [], []
        for b in self.blocks:
            take = (part == "abs") or (part == "lin") == (b.kind == "translation")
            if not take:
                sizes.append(np.zeros(len(b), dtype=np.int64))
                continue
            idx, sign = b.flat()
            cols.append(idx)
            vals.append(sign.abs() if part == "abs" else sign)
            sizes.append(b.sizes)
        sz = torch.as_tensor(np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64))
        nnz = int(sz.sum())
        idx = torch.int32 if max(nnz, self.layout.size) < 2**31 - 1 else torch.int64
        crow = torch.zeros(len(sz) + 1, dtype=idx)
        crow[1:] = torch.cumsum(sz, 0)
        col = torch.cat([c.to(idx) for c in cols]) if cols else torch.zeros(0, dtype=idx)
        val = torch.cat(vals) if vals else torch.zeros(0, dtype=torch.float64)
        return CSR(crow, col, val, (len(self), self.layout.size))

    # ---------------------------------------------------------- selection
    def select(self, keep: np.ndarray) -> Groups:
        keep = np.asarray(keep, dtype=bool)
        blocks = []
        for b, lo, hi in zip(self.blocks, self._offsets[:-1], self._offsets[1:]):
            nb = b.select(keep[lo:hi])
            if nb is not None:
                blocks.append(nb)
        return Groups(self.layout, blocks, self.skipped)

    def matching(self, patterns: Iterable[str]) -> np.ndarray:
        """Mask of groups matching any pattern: ``layer`` or ``kind:layer`` (fnmatch wildcards)."""
        mask = np.zeros(len(self), dtype=bool)
        for pat in patterns:
            kind, sep, layer = pat.partition(":")
            if not sep:
                kind, layer = "*", pat
            kmask = np.array([fnmatch.fnmatchcase(k, kind) for k in self.kinds], dtype=bool)
            lmask = np.array([fnmatch.fnmatchcase(la, layer) for la in self.layers], dtype=bool)
            mask |= kmask & lmask
        return mask

    def extend(self, blocks: Sequence[GroupBlock]) -> Groups:
        return Groups(self.layout, list(self.blocks) + list(blocks), self.skipped)

    # ------------------------------------------------------------ reports
    def summary(self) -> list[dict]:
        """One row per (kind, layer): count, size range, origin, note."""
        rows: dict[tuple[str, str], dict] = {}
        for b in self.blocks:
            key = (b.kind, b.layer)
            s = b.sizes
            if key in rows:
                r = rows[key]
                r["count"] += len(b)
                r["min_size"], r["max_size"] = min(r["min_size"], int(s.min())), max(r["max_size"], int(s.max()))
                r["notes"].append(b.note)
            else:
                rows[key] = {"kind": b.kind, "layer": b.layer, "count": len(b), "min_size": int(s.min()),
                             "max_size": int(s.max()), "origin": b.origin, "notes": [b.note], "eps": b.eps}
        return list(rows.values())

    def coords(self) -> dict[str, tuple[str, np.ndarray]]:
        """The ``group`` dim's non-index coordinates (a contract): kind, layer, size, unit."""
        d = "symmetry_group"
        return {"group_kind": (d, self.kinds.astype(str)), "group_layer": (d, self.layers.astype(str)),
                "group_size": (d, self.sizes.astype(np.int64)), "group_unit": (d, self.units.astype(np.int64))}

    def projector(self, device: torch.device | str = "cpu"):
        from .quantities import SymmetryProjector

        return SymmetryProjector(self, device)


# ------------------------------------------------------------------ user groups

_SPEC = re.compile(r"^\s*([\w.]+)\s*(?:\[(.*)\])?\s*$")


def _parse_item(text: str, field_name: str, spec: str) -> slice | int | str | type(Ellipsis):
    t = text.strip()
    if t == "i":
        return "i"
    if t == "...":
        return Ellipsis
    if ":" in t:
        parts = t.split(":")
        if len(parts) > 3:
            raise ConfigError(field_name, spec, "a slice is start:stop[:step]")
        try:
            nums = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ConfigError(field_name, spec, f"cannot read slice {t!r}; use integers, ':', '...' or i") from None
        return slice(*nums)
    try:
        return int(t)
    except ValueError:
        raise ConfigError(field_name, spec, f"cannot read index {t!r}; use integers, slices a:b, '...' or i") from None


def parse_index_spec(spec: str, layout: ParamLayout, field_name: str = "symmetry.groups") -> tuple[torch.Tensor, int | None]:
    """``"name[idx, ...]"`` → flat θ indices.

    Returns ``(index, axis)``: with the placeholder ``i`` in the slice, ``index`` is (n, k) — one row
    per value of i along ``axis`` — otherwise (1, k) and axis None.
    """
    if not isinstance(spec, str):
        raise ConfigError(field_name, spec, "expected a string such as \"fc1.weight[3, :]\"")
    m = _SPEC.match(spec)
    if not m:
        raise ConfigError(field_name, spec, "expected a parameter name with an optional [index], e.g. \"fc1.weight[:, 3]\"")
    name, inner = m.group(1), m.group(2)
    if name not in layout:
        raise ConfigError(field_name, spec, f"no parameter {name!r}; parameters: {', '.join(layout.names)}")
    e = layout[name]
    full = torch.arange(e.offset, e.offset + e.numel, dtype=torch.long).view(e.shape)
    if inner is None or not inner.strip():
        return full.reshape(1, -1), None
    items = [_parse_item(t, field_name, spec) for t in inner.split(",")]
    if sum(1 for it in items if it == "i") > 1:
        raise ConfigError(field_name, spec, "use the placeholder i at most once")
    n_real = sum(1 for it in items if it is not Ellipsis)
    if n_real > len(e.shape):
        raise ConfigError(field_name, spec, f"too many indices for {name} of shape {tuple(e.shape)}")
    if "i" in items:
        pos = items.index("i")
        if Ellipsis in items and items.index(Ellipsis) < pos:
            raise ConfigError(field_name, spec, "put i before '...'")
        moved = full.movedim(pos, 0)
        rest = tuple(items[:pos] + items[pos + 1:])
        try:
            rows = [moved[j][rest].reshape(-1) for j in range(moved.shape[0])]
        except IndexError as exc:
            raise ConfigError(field_name, spec, f"index out of range for {name} of shape {tuple(e.shape)} ({exc})") from None
        return torch.stack(rows), pos
    try:
        sel = full[tuple(items)]
    except IndexError as exc:
        raise ConfigError(field_name, spec, f"index out of range for {name} of shape {tuple(e.shape)} ({exc})") from None
    return sel.reshape(1, -1), None


@dataclass(frozen=True)
class GroupSpec:
    """One ``[[symmetry.groups]]`` entry."""

    kind: str
    layer: str = ""
    params: tuple[str, ...] = ()
    incoming: tuple[str, ...] = ()
    outgoing: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d: dict = {"kind": self.kind}
        if self.layer:
            d["layer"] = self.layer
        for k in ("params", "incoming", "outgoing"):
            if getattr(self, k):
                d[k] = list(getattr(self, k))
        return d


def _resolve(specs: Sequence[str], layout: ParamLayout, field_name: str) -> tuple[torch.Tensor, int | None]:
    """Concatenate several specs; all expanding ones (with i) must agree on the number of groups."""
    parts, n = [], None
    for s in specs:
        idx, axis = parse_index_spec(s, layout, field_name)
        parts.append((idx, axis))
        if axis is not None:
            if n is not None and idx.shape[0] != n:
                raise ConfigError(field_name, s, f"i runs over {idx.shape[0]} values here but over {n} in another entry")
            n = idx.shape[0]
    n = n or 1
    rows = [idx.expand(n, -1) if axis is None else idx for idx, axis in parts]
    return torch.cat(rows, 1), (None if n == 1 and all(a is None for _, a in parts) else n)


def build_user_blocks(specs: Sequence[GroupSpec], layout: ParamLayout) -> list[GroupBlock]:
    """Turn ``[[symmetry.groups]]`` entries into group blocks (validated against the layout)."""
    blocks = []
    for k, spec in enumerate(specs):
        field_name = f"symmetry.groups.{k}"
        if spec.kind == "rescale":
            if not spec.incoming or not spec.outgoing or spec.params:
                raise ConfigError(field_name, spec.to_dict(), "a rescale group needs incoming = [...] and outgoing = [...] (not params)")
            a1, n1 = _resolve(spec.incoming, layout, field_name + ".incoming")
            a2, n2 = _resolve(spec.outgoing, layout, field_name + ".outgoing")
            if a1.shape[0] != a2.shape[0]:
                if a1.shape[0] == 1:
                    a1 = a1.expand(a2.shape[0], -1)
                elif a2.shape[0] == 1:
                    a2 = a2.expand(a1.shape[0], -1)
                else:
                    raise ConfigError(field_name, spec.to_dict(), f"i runs over {a1.shape[0]} incoming but {a2.shape[0]} outgoing values")
            index = torch.cat([a1, a2], 1)
            sign = torch.cat([torch.ones(a1.shape[1]), -torch.ones(a2.shape[1])])
            n_in = a1.shape[1]
        else:
            if not spec.params or spec.incoming or spec.outgoing:
                raise ConfigError(field_name, spec.to_dict(), f"a {spec.kind} group needs params = [...] (not incoming/outgoing)")
            index, _ = _resolve(spec.params, layout, field_name + ".params")
            sign = torch.ones(index.shape[1])
            n_in = index.shape[1]
        for row in index:
            if row.unique().numel() != row.numel():
                raise ConfigError(field_name, spec.to_dict(), "an index appears twice in one group (overlapping slices)")
        if index.shape[1] == 0:
            raise ConfigError(field_name, spec.to_dict(), "the group is empty")
        layer = spec.layer or _layer_name(layout.name_of(int(index[0, 0])))
        units = np.arange(index.shape[0]) if index.shape[0] > 1 else np.array([-1])
        blocks.append(GroupBlock(spec.kind, layer, units, index.contiguous(), sign, None, n_in, "user",
                                 note="given in [[symmetry.groups]]"))
    return blocks


def _layer_name(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def layer_name(param: str) -> str:
    """The module name of a parameter ("features.0.weight" → "features.0")."""
    return _layer_name(param)


@dataclass
class Skipped:
    """A layer (or unit) that got no group of a kind, and why."""

    layer: str
    kind: str
    reason: str
    units: list[int] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.kind:<11} {self.layer}: {self.reason}"
