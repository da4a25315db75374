"""Per-group quantities on the device: a few sparse (CSR) matrix–vector products over θ.

For group A (Kunin et al., "Neural Mechanics", ICLR 2021;
docs/theory.md#symmetries and docs/theory.md#exact-discrete-recursions)::

    quantity    translation ⟨θ_A, 1⟩      scale |θ_A|²        rescale |θ_A1|² − |θ_A2|²   (A1 = incoming)
    grad term   0                         |ĝ_A|²              |ĝ_A1|² − |ĝ_A2|²
    momentum    U = ⟨v_A, 1⟩              P = ⟨θ_A, v_A⟩, V = |v_A|²  (rescale: A1 part − A2 part)

With ``S_lin`` (rows of translation groups, 1 on A) and ``S_quad`` (rows of scale/rescale groups,
+1 on A/A1, −1 on A2) every one of these is ``S_lin @ x`` or ``S_quad @ (x ⊙ y)``: one sparse
matrix–vector product (a segment sum, no Python loop over groups, no host synchronisation),
or one matrix–matrix product for a batch of θs.  Sums are taken in float64 whatever the run's
dtype.
"""

from __future__ import annotations

import warnings

import torch

from .groups import Groups


class SymmetryProjector:
    """Vectorised per-group scalars of flat vectors (θ, ĝ, v) on ``device``.

    Every method takes a flat vector (m,) and returns (G,), or a batch (B, m) and returns (B, G).
    Results are float64 device tensors; nothing synchronises with the host.
    """

    def __init__(self, groups: Groups, device: torch.device | str = "cpu"):
        self.groups = groups
        self.device = torch.device(device)
        self.G, self.m = len(groups), groups.layout.size
        self._mats: dict[str, torch.Tensor | None] = {}
        self._mats["lin"] = self._matrix("lin")
        self._mats["quad"] = self._matrix("quad")
        kinds = groups.kinds
        self.is_translation = torch.as_tensor(kinds == "translation", device=self.device)
        self._scratch: dict[str, torch.Tensor] = {}

    def _matrix(self, part: str) -> torch.Tensor | None:
        if part == "quad_abs":  # |signs| of quad: the same index arrays, values 1
            q = self.matrix("quad")
            if q is None:
                return None
            return self._csr(q.crow_indices(), q.col_indices(), torch.ones_like(q.values()), q.shape)
        c = self.groups.csr(part)
        if c.nnz == 0:
            return None
        return self._csr(c.crow.to(self.device), c.col.to(self.device), c.val.to(self.device, torch.float64), c.shape)

    @staticmethod
    def _csr(crow, col, val, shape) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, val, tuple(shape), check_invariants=False)

    def matrix(self, part: str) -> torch.Tensor | None:
        """The CSR matrix ``lin``, ``quad`` (see :meth:`Groups.csr`) or ``quad_abs`` (quad's members,
        all +1) on the device."""
        if part not in self._mats:
            self._mats[part] = self._matrix(part)
        return self._mats[part]

    # --------------------------------------------------------------- core
    def _f64(self, x: torch.Tensor, slot: str) -> torch.Tensor:
        """x as float64 on the device (a view when it already is; else a reused scratch buffer)."""
        if x.dtype == torch.float64 and x.device == self.device:
            return x
        buf = self._buffer(slot, x.shape)
        buf.copy_(x)
        return buf

    def _buffer(self, slot: str, shape: torch.Size | tuple) -> torch.Tensor:
        buf = self._scratch.get(slot)
        if buf is None or buf.shape != tuple(shape):
            buf = torch.empty(tuple(shape), dtype=torch.float64, device=self.device)
            self._scratch[slot] = buf
        return buf

    def apply(self, part: str, x: torch.Tensor) -> torch.Tensor:
        """``S_part @ x`` for x (m,) → (G,) or x (B, m) → (B, G)."""
        S = self.matrix(part)
        x = self._f64(x, "apply")
        batched = x.dim() == 2
        if x.shape[-1] != self.m:
            raise ValueError(f"expected vectors of {self.m} parameters, got shape {tuple(x.shape)}")
        if S is None:
            return torch.zeros((x.shape[0], self.G) if batched else (self.G,), dtype=torch.float64, device=self.device)
        if batched:
            return (S @ x.t().contiguous()).t()
        return S @ x

    def _product(self, a: torch.Tensor, b: torch.Tensor | None, slot: str) -> torch.Tensor:
        """a ⊙ b (a ⊙ a when b is None) in float64, in a reused buffer."""
        out = self._buffer(slot, a.shape)
        if b is None:
            if a.dtype == torch.float64:
                torch.mul(a, a, out=out)
            else:
                out.copy_(a)
                out.mul_(out)
            return out
        if a.dtype == torch.float64 and b.dtype == torch.float64:
            return torch.mul(a, b, out=out)
        out.copy_(a)
        return out.mul_(b.to(torch.float64))

    # ------------------------------------------------------------- public
    def lin(self, x: torch.Tensor) -> torch.Tensor:
        """⟨x_A, 1⟩ for translation groups (0 elsewhere)."""
        return self.apply("lin", x)

    def quad(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_A1 x⊙y − Σ_A2 x⊙y for scale/rescale groups (A2 empty for scale; 0 for translation)."""
        return self.apply("quad", self._product(x, y, "quad"))

    def quantities(self, theta: torch.Tensor) -> torch.Tensor:
        """The conserved quantity per group: ⟨θ_A,1⟩ | |θ_A|² | |θ_A1|² − |θ_A2|²."""
        theta = self._f64(theta, "theta")
        return self.lin(theta) + self.quad(theta)

    def grad_terms(self, g: torch.Tensor) -> torch.Tensor:
        """The gradient term of the exact dynamics: 0 | |g_A|² | |g_A1|² − |g_A2|²."""
        return self.quad(g)

    def momentum_terms(self, theta: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(P, V, U): P = ⟨θ_A, v_A⟩ (rescale: ⟨θ_A1,v_A1⟩ − ⟨θ_A2,v_A2⟩), V = |v_A|² (rescale:
        |v_A1|² − |v_A2|²), both 0 for translation; U = ⟨v_A, 1⟩ for translation (0 elsewhere)."""
        return self.quad(theta, v), self.quad(v), self.lin(v)

    def norms_sq(self, x: torch.Tensor) -> torch.Tensor:
        """|x_A|² over all members (A, or A1 ∪ A2), every kind."""
        sq = self._product(x, None, "abs")
        return torch.where(self.is_translation, self.apply("lin", sq), self.apply("quad_abs", sq))

    def dots(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """⟨x_A, y_A⟩ with the group signs (rescale: A1 part − A2 part), every kind (translation: +)."""
        signed_t = self.apply("lin", self._product(x, y, "dots"))
        return torch.where(self.is_translation, signed_t, self.quad(x, y))

    def scales(self, theta: torch.Tensor) -> torch.Tensor:
        """The natural size of each quantity: Σ_A |θ_i| for translation (bounds |⟨θ_A,1⟩|),
        |θ_A|² (scale) and |θ_A1|² + |θ_A2|² (rescale)."""
        abs_t = self.apply("lin", torch.abs(self._f64(theta, "scales")))
        return torch.where(self.is_translation, abs_t, self.apply("quad_abs", self._product(theta, None, "abs")))
