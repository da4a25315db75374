"""The trajectory store: one ``xarray.Dataset`` per study, streamed to ``OUT/trajectory.zarr``.

Rows are appended along ``time`` (and snapshots along ``snapshot``) in chunks by a background
thread, so memory does not grow with the number of steps and the run does not wait on the disk.
The zarr store (format 2, metadata consolidated when the run ends) opens with ``xr.open_zarr``
while the run is still going; ``export_netcdf`` writes a netCDF copy.
"""

from __future__ import annotations

import json
import math
import queue
import shutil
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import FlowlabError
from .recording import RENAMED_DIMS, Variable

STORE_NAME = "trajectory.zarr"
CHUNK_BYTES = 8 << 20


def _chunks(var: Variable, n_dynamics: int, rows: int) -> tuple[int, ...]:
    itemsize = np.dtype(var.dtype).itemsize
    if var.grows_along == "snapshot":  # one snapshot of one dynamics per chunk, long dims split
        cap = max(1, CHUNK_BYTES // itemsize)
        return tuple(1 if d in ("dynamics", "snapshot") else min(s, cap)
                     for d, s in zip(var.dims, var.full_shape(n_dynamics, 1)))
    per_row = max(1, int(np.prod(var.full_shape(n_dynamics, 1), dtype=np.int64))) * itemsize
    rows = max(1, min(rows, CHUNK_BYTES // per_row))
    return var.full_shape(n_dynamics, rows)


STATUS_WIDTH = 256


def _fixed_strings(values: Any) -> np.ndarray:
    """Strings as fixed-width unicode (zarr v2 and netCDF read them back as plain ``<U`` arrays,
    which every numpy/xarray operation handles; variable-length strings come back as StringDType)."""
    arr = np.asarray(values)
    if arr.dtype.kind in ("O", "T", "U") and (arr.size == 0 or all(isinstance(v, str) for v in arr.ravel().tolist())):
        return np.array(arr.tolist(), dtype=str)
    return arr


def skeleton(variables: Sequence[Variable], labels: Sequence[str], attrs: dict[str, Any]) -> xr.Dataset:
    """An empty Dataset (zero-length ``time`` and ``snapshot``) with every variable declared."""
    M = len(labels)
    coords: dict[str, Any] = {
        "dynamics": ("dynamics", np.array(labels, dtype=str)),
        "time": ("time", np.zeros(0, dtype=np.float64), {"long_name": "t = Σ η_k"}),
        "step": ("time", np.zeros(0, dtype=np.int64), {"long_name": "updates completed"}),
        "snapshot": ("snapshot", np.zeros(0, dtype=np.float64), {"long_name": "time of the θ snapshot"}),
        "snapshot_step": ("snapshot", np.zeros(0, dtype=np.int64)),
    }
    data_vars: dict[str, Any] = {
        "status": ("dynamics", np.array(["running"] * M, dtype=f"<U{STATUS_WIDTH}")),
        "wall_seconds": ("dynamics", np.zeros(M)),
        "n_grad_evals": ("dynamics", np.zeros(M, dtype=np.int64)),
    }
    for v in variables:
        for name, values in v.coords.items():
            coords[name] = (name, _fixed_strings(values))
        for name, (dim, values) in v.dim_coords.items():
            coords[name] = (dim, _fixed_strings(values))
        if v.grows_along is None:
            lead = (M,) if v.per_dynamics else ()
            data_vars[v.name] = (v.dims, np.full((*lead, *v.shape), np.nan, dtype=v.dtype), v.attrs)
        else:
            data_vars[v.name] = (v.dims, np.zeros(v.full_shape(M, 0), dtype=v.dtype), v.attrs)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


class TrajectoryWriter:
    """Streams rows into a zarr store from a background thread."""

    def __init__(self, path: str | Path, variables: Sequence[Variable], labels: Sequence[str],
                 attrs: dict[str, Any], chunk_rows: int = 512, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise FlowlabError(f"output {self.path} exists: pass --overwrite (or choose another --out)")
            shutil.rmtree(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FlowlabError(f"--out {self.path.parent}: cannot create the output folder "
                               f"({exc.strerror or exc})") from None
        self.labels = list(labels)
        self.variables = {v.name: v for v in variables}
        ds = skeleton(variables, labels, attrs)
        encoding = {v.name: {"chunks": _chunks(v, len(labels), chunk_rows)} for v in variables if v.grows_along}
        for name in ("time", "step", "snapshot", "snapshot_step"):
            encoding[name] = {"chunks": (max(chunk_rows, 64),)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.to_zarr(self.path, mode="w", zarr_format=2, consolidated=False, encoding=encoding)
        import zarr

        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=2)
        self.rows_written = {"time": 0, "snapshot": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="flowlab-writer", daemon=True)
        self._thread.start()

    @classmethod
    def reopen(cls, path: str | Path, variables: Sequence[Variable], labels: Sequence[str],
               rows: Mapping[str, int]) -> TrajectoryWriter:
        """The writer of an existing store, cut back to ``rows`` along ``time`` and ``snapshot``
        (a checkpoint's position: rows written after it are dropped, and written again by the
        resumed run).  Chunk and metadata files are written atomically by zarr's local store
        (temporary file, rename), so a process killed mid-write leaves every earlier row intact."""
        import zarr

        self = cls.__new__(cls)
        self.path = Path(path)
        if not (self.path / ".zgroup").is_file():
            raise FlowlabError(f"{self.path}: no trajectory store to resume (run without --resume)")
        self.labels = list(labels)
        self.variables = {v.name: v for v in variables}
        stale = self.path / ".zmetadata"  # consolidated at the interrupted run's close: rewritten at ours
        if stale.exists():
            stale.unlink()
        self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=2, use_consolidated=False)
        for dim, names in (("time", ("time", "step")), ("snapshot", ("snapshot", "snapshot_step"))):
            n = int(rows[dim])
            arrays = [(name, 0) for name in names]
            arrays += [(v.name, v.axis) for v in variables if v.grows_along == dim]
            for name, axis in arrays:
                try:
                    arr = self.group[name]
                except KeyError:
                    raise FlowlabError(f"{self.path}: variable {name!r} is missing; the store does not belong to "
                                       "this run") from None
                if arr.shape[axis] < n:
                    raise FlowlabError(f"{self.path}: {name} has {arr.shape[axis]} rows, the checkpoint "
                                       f"{n}: the store is older than the checkpoint")
                if arr.shape[axis] != n:
                    shape = list(arr.shape)
                    shape[axis] = n
                    arr.resize(tuple(shape))
        self.rows_written = {"time": int(rows["time"]), "snapshot": int(rows["snapshot"])}
        self._queue = queue.Queue(maxsize=4)
        self._error = None
        self._thread = threading.Thread(target=self._work, name="flowlab-writer", daemon=True)
        self._thread.start()
        return self

    # ---------------------------------------------------------------- thread
    def _work(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:
                    task[0](*task[1:])
            except OSError as exc:  # disk full, folder gone or unwritable: one line, in the caller's thread
                self._error = FlowlabError(
                    f"store {self.path}: cannot write ({exc.strerror or exc}); the rows up to the last checkpoint "
                    "are kept: make room and continue with flowlab run ... --resume")
            except BaseException as exc:  # kept and re-raised in the caller's thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _submit(self, *task: Any) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(task)

    def _append(self, dim: str, arrays: dict[str, np.ndarray], steps: np.ndarray, times: np.ndarray) -> None:
        step_name = "step" if dim == "time" else "snapshot_step"
        self.group[dim].append(times, axis=0)
        self.group[step_name].append(steps, axis=0)
        for name, values in arrays.items():
            self.group[name].append(values, axis=self.variables[name].axis)
        self.rows_written[dim] += len(times)

    def _set(self, arrays: dict[str, np.ndarray]) -> None:
        for name, values in arrays.items():
            if name == "status":
                values = np.array([str(v)[:STATUS_WIDTH] for v in values], dtype=f"<U{STATUS_WIDTH}")
            self.group[name][...] = values

    # ------------------------------------------------------------------ API
    def append(self, dim: str, arrays: dict[str, np.ndarray], steps: np.ndarray, times: np.ndarray) -> None:
        """Append rows along ``dim`` (``time`` or ``snapshot``): arrays in their variables' dim order."""
        if len(times):
            self._submit(self._append, dim, arrays, steps, times)

    def set(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite per-dynamics variables (status, wall_seconds, ...)."""
        self._submit(self._set, {k: np.asarray(v) for k, v in arrays.items()})

    def wait(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        import zarr

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(str(self.path), zarr_format=2)
        except OSError as exc:
            if self._error is None:
                self._error = FlowlabError(f"store {self.path}: cannot write its metadata ({exc.strerror or exc})")
        if self._error is not None:
            raise self._error


def _zarr_path(out: str | Path) -> Path:
    p = Path(out)
    if p.suffix == ".zarr":
        return p
    return p / STORE_NAME


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """Variable-length strings (numpy StringDType, from older stores) as plain ``<U`` arrays."""
    fix = {name: v for name, v in ds.variables.items() if v.dtype.kind == "T"}
    if not fix:
        return ds
    coords = {n: (v.dims, np.array(v.values.tolist(), dtype=str), v.attrs) for n, v in fix.items() if n in ds.coords}
    data = {n: (v.dims, np.array(v.values.tolist(), dtype=str), v.attrs) for n, v in fix.items() if n not in ds.coords}
    return ds.assign_coords(coords).assign(data)


def renamed_dims(ds: xr.Dataset) -> xr.Dataset:
    """A Dataset written before the dim renames (``method`` → ``dynamics``, ``group`` →
    ``symmetry_group``: xarray's ``sel(method=...)`` and ``groupby(group=...)`` swallowed them) with
    the new names; others pass unchanged."""
    rename = {old: new for old, new in RENAMED_DIMS.items() if old in ds.dims and new not in ds.dims}
    return ds.rename(rename) if rename else ds


def open_result(out: str | Path, load: bool = False) -> xr.Dataset:
    """Open a run's Dataset: ``out`` is its output folder, a ``.zarr`` store or a netCDF file.
    Stores written before the ``dynamics`` / ``symmetry_group`` renames open with the new dims."""
    p = Path(out)
    from .sweep.runner import is_sweep

    if is_sweep(p):  # a sweep folder: its points as one Dataset with the sweep's dims
        from .sweep.runner import open_sweep

        ds = open_sweep(p)
        return ds.load() if load else ds
    if p.is_file() and p.suffix in (".nc", ".nc4", ".netcdf", ".h5"):
        ds = renamed_dims(_plain_strings(xr.open_dataset(p, engine="h5netcdf")))
        return ds.load() if load else ds
    z = _zarr_path(p)
    if not z.exists():
        raise FlowlabError(f"result {out}: no {STORE_NAME} there (is it the --out folder of a run?)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = xr.open_zarr(z, consolidated=True, chunks=None)
        except (KeyError, FileNotFoundError, ValueError):
            ds = xr.open_zarr(z, consolidated=False, chunks=None)
    ds = renamed_dims(_plain_strings(ds))
    return ds.load() if load else ds


def export_netcdf(out: str | Path, path: str | Path) -> Path:
    """Write a run's Dataset to a netCDF-4 file (h5netcdf)."""
    ds = open_result(out, load=True)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    encoding = {name: {"zlib": True, "complevel": 4} for name, v in ds.data_vars.items()
                if v.dtype.kind == "f" and v.size > 0}
    ds.to_netcdf(target, engine="h5netcdf", encoding=encoding, invalid_netcdf=False)
    return target


def attrs_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=lambda o: repr(o))


def finite_or_nan(x: float) -> float:
    return x if math.isfinite(x) else math.nan
