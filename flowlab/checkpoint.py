"""Checkpoints: a run's whole state in one file, written atomically, read without pickles.

A checkpoint is taken at a *safe point* of the lock-step engine — after update k, with every row
up to k flushed to the store — so it holds no rows in flight, only state:

- the discrete run (θ, momentum buffer, step, batch sampler's generator and epoch position; every
  replica of an ensemble), the problem's evaluation counts and the module's buffers (BatchNorm
  running statistics);
- every flow: its state, its time, its integrator session (fixed-step grid and dense-output ends;
  torchdiffeq's Runge–Kutta state — step size, FSAL stage, interpolation coefficients; diffrax's
  carried loop state; Brownian generators), its evaluation counts and status;
- every recorder's accumulators (symmetry, theory, noise split);
- the store's position: rows written along ``time`` and ``snapshot``, and the rows of the last,
  partly filled zarr chunk of every variable (the *tail*), which a resume writes back — a process
  killed while writing a chunk cannot take earlier rows with it.

Resuming (``flowlab run STUDY --resume``) rebuilds the run from its study, checks that the study is
the checkpoint's (one line naming the first differing key), truncates the store to the
checkpoint's rows, restores every object's state and continues the loop at step k + 1: on CPU in
float64 the Dataset is bitwise the uninterrupted run's (tests/test_checkpoint.py), timing
variables (``wall_seconds``, ``compile_seconds``) aside.

The file is a ``torch.save`` of plain containers (dicts, lists, strings, numbers) and tensors —
numpy arrays, JAX arrays and generator states are stored as tensors — read back with
``torch.load(weights_only=True)``: no pickled object is ever loaded.  It is written to a temporary
file, fsynced and renamed over the previous checkpoint (then the folder is fsynced), so a
checkpoint on disk is always a whole one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import first_difference
from .errors import FlowlabError

FORMAT = 1
NAME = "checkpoint.pt"

# ------------------------------------------------------------------ values


def pack(x: Any) -> Any:
    """``x`` as checkpoint-safe data: tensors (on the CPU, copied), numbers, strings, None, and
    lists / string-keyed dicts of them; tuples, numpy and JAX arrays and generators are tagged."""
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint: numpy array of dtype {x.dtype} cannot be stored")
        return {"__ndarray__": torch.from_numpy(np.array(x, copy=True))}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return {"__tuple__": [pack(v) for v in x]}
    if isinstance(x, list):
        return [pack(v) for v in x]
    if isinstance(x, Mapping):
        if not all(isinstance(k, str) for k in x):
            return {"__intdict__": [[pack(k), pack(v)] for k, v in x.items()]}
        return {k: pack(v) for k, v in x.items()}
    if isinstance(x, torch.Generator):
        return {"__torch_generator__": x.get_state()}
    if isinstance(x, np.random.Generator):
        return {"__numpy_generator__": json.dumps(x.bit_generator.state)}
    if _is_jax(x):
        a = np.asarray(x)
        return {"__jax__": torch.from_numpy(np.array(a, copy=True)), "dtype": str(a.dtype)}
    raise TypeError(f"checkpoint: cannot store a {type(x).__name__}")


#: where restored tensors without a live counterpart go (set by :func:`restoring_to`)
_DEVICE: list[torch.device] = []


class restoring_to:
    """``with restoring_to(device):`` tensors restored with no live attribute to copy the device
    from (a momentum buffer that was None at construction) go to ``device``."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __enter__(self):
        _DEVICE.append(self.device)
        return self

    def __exit__(self, *exc):
        _DEVICE.pop()


def unpack(x: Any, like: Any = None) -> Any:
    """The value :func:`pack` stored, as a new object (never written into ``like``: sessions alias
    their states); ``like`` (the attribute being restored) gives tensors their device and
    generators are set in place (they are shared, e.g. one Brownian generator by every session)."""
    if isinstance(x, torch.Tensor):
        if isinstance(like, torch.Tensor):
            return x.to(like.device)
        return x.to(_DEVICE[-1]) if _DEVICE else x
    if isinstance(x, list):
        likes = like if isinstance(like, list) and len(like) == len(x) else [None] * len(x)
        return [unpack(v, w) for v, w in zip(x, likes)]
    if isinstance(x, dict):
        if "__ndarray__" in x:
            return x["__ndarray__"].numpy().copy()
        if "__tuple__" in x:
            items = x["__tuple__"]
            likes = like if isinstance(like, tuple) and len(like) == len(items) else (None,) * len(items)
            return tuple(unpack(v, w) for v, w in zip(items, likes))
        if "__intdict__" in x:
            return {unpack(k): unpack(v) for k, v in x["__intdict__"]}
        if "__torch_generator__" in x:
            g = like if isinstance(like, torch.Generator) else torch.Generator()
            g.set_state(x["__torch_generator__"])
            return g
        if "__numpy_generator__" in x:
            g = like if isinstance(like, np.random.Generator) else np.random.default_rng()
            g.bit_generator.state = json.loads(x["__numpy_generator__"])
            return g
        if "__jax__" in x:
            import jax.numpy as jnp

            return jnp.asarray(x["__jax__"].numpy(), dtype=x["dtype"])
        likes = like if isinstance(like, Mapping) else {}
        return {k: unpack(v, likes.get(k)) for k, v in x.items()}
    return x


def _is_jax(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("jax") or mod.startswith("jaxlib")


def attrs_state(obj: Any, names: Iterable[str]) -> dict:
    """{name: pack(obj.name)}; an attribute with its own ``state_dict`` is asked for it."""
    out = {}
    for n in names:
        v = getattr(obj, n)
        out[n] = {"__state__": v.state_dict()} if hasattr(v, "state_dict") and hasattr(v, "load_state_dict") \
            else pack(v)
    return out


def load_attrs(obj: Any, state: Mapping[str, Any]) -> None:
    """The inverse of :func:`attrs_state` (tensors restored in place where they can be)."""
    for n, v in state.items():
        if isinstance(v, dict) and "__state__" in v:
            getattr(obj, n).load_state_dict(v["__state__"])
        else:
            setattr(obj, n, unpack(v, getattr(obj, n, None)))


# ------------------------------------------------------------------ files


def write(path: str | Path, payload: dict) -> None:
    """``payload`` to ``path`` atomically: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise FlowlabError(f"checkpoint {path}: cannot write ({exc.strerror or exc}); the previous checkpoint "
                           "is kept") from None


def read(path: str | Path) -> dict:
    """A checkpoint file's payload (one line on a missing, truncated or foreign file)."""
    path = Path(path)
    if not path.is_file():
        raise FlowlabError(f"checkpoint {path}: not found (nothing to resume: run without --resume)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or not a checkpoint: one line
        raise FlowlabError(f"checkpoint {path}: unreadable ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else 'corrupt'})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FlowlabError(f"checkpoint {path}: not a flowlab checkpoint of format {FORMAT}")
    return payload


# ------------------------------------------------------------------ the [checkpoint] section


def _every(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else \
        "expected an integer >= 0 (updates between checkpoints; 0: not by steps)"


def _seconds(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and v == v and v != float("inf")
    return None if ok else "expected a number of seconds >= 0 (0: not by time)"


def _enabled(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


class CheckpointSection:
    """``[checkpoint]``: ``every`` (updates, 0: not by steps), ``seconds`` (wall seconds, 0: not by
    time; default 300), ``enabled`` (default true).  A checkpoint is due when either has passed
    since the last one; a run that ends well removes its checkpoint."""

    KEYS = ("enabled", "every", "seconds")

    def __init__(self, enabled: bool = True, every: int = 0, seconds: float = 300.0):
        self.enabled, self.every, self.seconds = enabled, every, float(seconds)

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "every": self.every, "seconds": self.seconds}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckpointSection) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        return f"CheckpointSection({self.to_dict()})"


def parse_checkpoint(raw: Any) -> CheckpointSection:
    from .config import pop_checked
    from .errors import ConfigError

    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("checkpoint", raw, "expected a table ([checkpoint])")
    raw = dict(raw)
    kwargs = pop_checked(raw, {"enabled": _enabled, "every": _every, "seconds": _seconds}, "checkpoint")
    if raw:
        key = next(iter(raw))
        raise ConfigError(f"checkpoint.{key}", raw[key], f"unknown key; allowed: {', '.join(CheckpointSection.KEYS)}")
    return CheckpointSection(**kwargs)


def checkpoint_section(study: Any) -> CheckpointSection:
    sec = study.sections.get("checkpoint") if hasattr(study, "sections") else None
    return sec if isinstance(sec, CheckpointSection) else CheckpointSection()


# ------------------------------------------------------------------ taking and restoring

#: study sections a resumed run may change (they do not touch the numbers)
MAY_DIFFER = ("checkpoint",)


class Checkpointer:
    """Takes a run's checkpoints (at the engine's safe points) and restores them.

    ``objects``: the run's ``discrete`` run (or None), its ``followers`` and ``recorders`` (in the
    run's order), its ``problem`` and ``writer``."""

    def __init__(self, path: str | Path, section: CheckpointSection, study: dict, *, discrete: Any,
                 followers: list, recorders: list, problem: Any, writer: Any):
        import time

        self.path = Path(path)
        self.section = section
        self.enabled = bool(section.enabled)
        self.study = study
        self.discrete, self.followers, self.recorders = discrete, list(followers), list(recorders)
        self.problem, self.writer = problem, writer
        self.last_step = 0
        self.last_time = time.monotonic()
        self.saved = 0  # checkpoints written by this process

    def due(self, k_next: int) -> bool:
        import time

        if not self.enabled:
            return False
        sec = self.section
        if sec.every and k_next - self.last_step >= sec.every:
            return True
        return bool(sec.seconds) and time.monotonic() - self.last_time >= sec.seconds

    def payload(self, engine: Any, k_next: int, ri: int, si: int) -> dict:
        self.writer.wait()  # the rows flushed so far are on disk: their count is the store position
        module = self.problem.module
        return {
            "format": FORMAT,
            "study": self.study,
            "next_step": int(k_next), "ri": int(ri), "si": int(si),
            "engine": {"status": engine.status, "wall_seconds": float(engine.wall_seconds),
                       "replica_stops": pack({int(r): list(v) for r, v in getattr(engine, "replica_stops", {}).items()})},
            "globals": global_generators(self.problem.device),
            "discrete": self.discrete.state_dict() if self.discrete is not None else None,
            "followers": [f.state_dict() for f in self.followers],
            "recorders": [{"type": type(r).__name__, "state": r.state_dict()} for r in self.recorders],
            "problem": {"counts": dict(self.problem.counts), "hvp_method": self.problem.hvp_method,
                        "buffers": {name: pack(b) for name, b in module.named_buffers()}},
            "store": {k: int(v) for k, v in self.writer.rows_written.items()},
        }

    def save(self, engine: Any, k_next: int, ri: int, si: int) -> None:
        import time

        write(self.path, self.payload(engine, k_next, ri, si))
        self.last_step, self.last_time = k_next, time.monotonic()
        self.saved += 1

    def restore(self, engine: Any, payload: dict) -> tuple[int, int, int]:
        """Put ``payload``'s state into the run's objects; (next step, ri, si) to run from."""
        device = self.problem.device
        prob = payload["problem"]
        # the problem's chosen HVP path first: a flow's restoring may evaluate (the central flow's cache)
        self.problem.hvp_method = prob.get("hvp_method", self.problem.hvp_method)
        with restoring_to(device):
            if self.discrete is not None:
                self.discrete.load_state_dict(payload["discrete"])
            if len(payload["followers"]) != len(self.followers):
                raise FlowlabError(f"checkpoint {self.path}: {len(payload['followers'])} flows saved, this run has "
                                   f"{len(self.followers)}")
            for f, st in zip(self.followers, payload["followers"]):
                f.load_state_dict(st)
            # recorders are matched by type and occurrence: a recorder without state (a user's, a
            # test's) may come or go; one whose saved state finds no counterpart is an error
            saved: dict[tuple[str, int], dict] = {}
            for entry in payload["recorders"]:
                key = (entry["type"], sum(1 for k in saved if k[0] == entry["type"]))
                saved[key] = entry["state"]
            seen: dict[str, int] = {}
            for r in self.recorders:
                name = type(r).__name__
                key = (name, seen.get(name, 0))
                seen[name] = key[1] + 1
                if key in saved:
                    r.load_state_dict(saved.pop(key))
            lost = [k[0] for k, v in saved.items() if v]
            if lost:
                raise FlowlabError(f"checkpoint {self.path}: this run has no {', '.join(lost)} to restore (another "
                                   "flowlab version or other parts)")
            self.problem.counts.clear()
            self.problem.counts.update({k: int(v) for k, v in prob["counts"].items()})
            buffers = dict(self.problem.module.named_buffers())
            with torch.no_grad():
                for name, value in prob["buffers"].items():
                    if name in buffers:
                        buffers[name].copy_(unpack(value))
        engine.status = payload["engine"]["status"]
        engine.wall_seconds = float(payload["engine"]["wall_seconds"])
        if hasattr(engine, "replica_stops"):
            engine.replica_stops = {int(r): tuple(v) for r, v in unpack(payload["engine"]["replica_stops"]).items()}
        self.last_step = int(payload["next_step"])
        return int(payload["next_step"]), int(payload["ri"]), int(payload["si"])

    def restore_globals(self, payload: dict) -> None:
        """Torch's, numpy's and Python's global generators as the checkpoint found them (call inside
        the run's :func:`flowlab.seeds.seeded_globals`, which puts the caller's back afterwards)."""
        set_global_generators(payload["globals"], self.problem.device)

    def remove(self) -> None:
        """A finished run's checkpoint is of no further use."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass


def global_generators(device: torch.device) -> dict:
    """The states of torch's (CPU, and CUDA's on a CUDA run), numpy's and Python's global generators."""
    import random

    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "numpy": pack(tuple(np_state)),
           "python": json.dumps(random.getstate())}
    if torch.device(device).type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    return out


def set_global_generators(state: dict, device: torch.device) -> None:
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(unpack(state["numpy"]))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))


def check_study(path: Path, payload: dict, study: dict) -> None:
    """One line naming the first key where ``study`` differs from the checkpoint's."""
    a = {k: v for k, v in payload["study"].items() if k not in MAY_DIFFER}
    b = {k: v for k, v in study.items() if k not in MAY_DIFFER}
    diff = first_difference(a, b)
    if diff is not None:
        key, saved, given = diff
        raise FlowlabError(f"checkpoint {path}: the study differs from the checkpoint's at {key} "
                           f"(checkpoint: {saved!r}, study: {given!r}); resume with the same study, or run afresh "
                           "with --overwrite")
