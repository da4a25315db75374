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


#: variables every flowlab result has (the skeleton's and the core recorders')
REQUIRED = ("status", "wall_seconds", "n_grad_evals", "loss", "distance", "step")
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".h5")


def open_result(out: str | Path, load: bool = False) -> xr.Dataset:
    """Open a run's Dataset: ``out`` is its output folder, a ``.zarr`` store or a netCDF file.
    Stores written before the ``dynamics`` / ``symmetry_group`` renames open with the new dims.

    A store that is not a flowlab result, or is damaged, raises a one-line :class:`FlowlabError`.  A
    store of a run still going, or killed, opens with the rows it has (every status ``running``); one
    killed between the writes of one chunk's arrays opens cut to the rows every array has (said in
    its ``store_repaired`` attribute).  Nothing is unpickled: a store whose arrays need a pickle codec
    is refused."""
    p = Path(out)
    from .sweep.runner import is_sweep

    if is_sweep(p):  # a sweep folder: its points as one Dataset with the sweep's dims
        from .sweep.runner import open_sweep

        ds = open_sweep(p)
        return _load(ds, out) if load else ds
    if p.is_file():
        if p.suffix not in NETCDF_SUFFIXES:
            raise FlowlabError(f"result {out}: a file that is not a netCDF export ({', '.join(NETCDF_SUFFIXES)}); "
                               f"give a run's output folder, its {STORE_NAME} or a netCDF file")
        try:
            ds = xr.open_dataset(p, engine="h5netcdf")
        except Exception as exc:  # noqa: BLE001 - h5py/h5netcdf raise OSError, ValueError, KeyError...
            raise FlowlabError(f"result {out}: not a readable netCDF file ({_why(exc)})") from None
    else:
        z = _zarr_path(p)
        if not z.exists():
            raise FlowlabError(f"result {out}: no {STORE_NAME} there (is it the --out folder of a run?)")
        if not z.is_dir():
            raise FlowlabError(f"result {out}: {z} is a file, not a zarr store (a folder)")
        ds = _open_zarr(z, out)
    ds = renamed_dims(_plain_strings(ds))
    missing = [v for v in REQUIRED if v not in ds.variables] + ([] if "dynamics" in ds.dims else ["dim dynamics"])
    if missing:
        raise FlowlabError(f"result {out}: not a flowlab result, or a damaged one: it lacks {', '.join(missing)}")
    return _load(ds, out) if load else ds


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _load(ds: xr.Dataset, out: str | Path) -> xr.Dataset:
    """``ds`` loaded into memory, variable by variable, so a damaged one is named."""
    for name, var in ds.variables.items():
        try:
            var.load()
        except Exception as exc:  # noqa: BLE001 - a codec's or the file system's error on a damaged chunk
            raise FlowlabError(f"result {out}: the variable {name!r} cannot be read; the store is damaged "
                               f"({_why(exc)})") from None
    return ds


def _array_metadata(z: Path, out: str | Path) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """Every array's ``.zarray`` and dims, read from the store's files (not the consolidated copy,
    which a killed run never wrote); refuses pickle codecs."""
    arrays: dict[str, tuple[dict, tuple[str, ...]]] = {}
    for meta in sorted(z.glob("*/.zarray")):
        name = meta.parent.name
        try:
            info = json.loads(meta.read_text())
            attrs_file = meta.parent / ".zattrs"
            attrs = json.loads(attrs_file.read_text()) if attrs_file.exists() else {}
            dims = tuple(attrs.get("_ARRAY_DIMENSIONS", ()))
            shape = tuple(int(n) for n in info["shape"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FlowlabError(f"result {out}: the metadata of {name!r} cannot be read; the store is damaged "
                               f"({_why(exc)})") from None
        codecs = [c for c in [info.get("compressor"), *(info.get("filters") or [])] if isinstance(c, dict)]
        if any(str(c.get("id", "")).lower() == "pickle" for c in codecs):  # (vlen-utf8 strings are fine)
            raise FlowlabError(f"result {out}: the array {name!r} holds Python objects (a pickle codec); flowlab "
                               "never unpickles a file it is handed")
        if len(dims) != len(shape):
            raise FlowlabError(f"result {out}: the array {name!r} has shape {shape} but dims {dims}; the store is damaged")
        arrays[name] = (info, dims)
    if not arrays:
        raise FlowlabError(f"result {out}: {z} holds no arrays (not a zarr store, or an empty one)")
    return arrays


def _open_zarr(z: Path, out: str | Path) -> xr.Dataset:
    arrays = _array_metadata(z, out)
    lengths: dict[str, set[int]] = {}
    for info, dims in arrays.values():
        for d, n in zip(dims, info["shape"]):
            lengths.setdefault(d, set()).add(int(n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if any(len(ns) > 1 for ns in lengths.values()):  # killed between two arrays' appends of one chunk
            return _open_cut(z, arrays, {d: min(ns) for d, ns in lengths.items()}, out)
        try:
            if _consolidated_is_current(z, arrays):
                try:
                    return xr.open_zarr(z, consolidated=True, chunks=None)
                except Exception:  # noqa: BLE001 - a damaged consolidated copy: read every array's own metadata
                    pass
            return xr.open_zarr(z, consolidated=False, chunks=None)
        except Exception as exc:  # noqa: BLE001
            raise FlowlabError(f"result {out}: {z} is not a readable zarr store ({_why(exc)})") from None


def _consolidated_is_current(z: Path, arrays: dict) -> bool:
    """The store's consolidated metadata exists and gives every array the shape its own metadata
    gives (not so after rows were appended to a consolidated store, e.g. a resumed run)."""
    try:
        meta = json.loads((z / ".zmetadata").read_text())["metadata"]
        return all(meta[f"{name}/.zarray"]["shape"] == info["shape"] for name, (info, _) in arrays.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _open_cut(z: Path, arrays: dict, length: dict[str, int], out: str | Path) -> xr.Dataset:
    """The store's arrays cut to the rows every one of them has, lazily (dask), decoded as xarray
    would (coordinates from their ``coordinates`` attributes)."""
    import dask.array as da
    import zarr

    try:
        group = zarr.open_group(str(z), mode="r", zarr_format=2)
        variables = {}
        for name, (_, dims) in arrays.items():
            arr = group[name]
            attrs = {k: v for k, v in arr.attrs.items() if k != "_ARRAY_DIMENSIONS"}
            data = da.from_zarr(arr)[tuple(slice(0, length[d]) for d in dims)]
            variables[name] = xr.Variable(dims, data, attrs)
        ds = xr.decode_cf(xr.Dataset(variables, attrs=dict(group.attrs)))
    except Exception as exc:  # noqa: BLE001
        raise FlowlabError(f"result {out}: {z} is not a readable zarr store ({_why(exc)})") from None
    cut = {d: n for d, n in length.items() if len({int(i["shape"][dims.index(d)]) for i, dims in arrays.values()
                                                   if d in dims}) > 1}
    ds.attrs["store_repaired"] = ("the run stopped between the writes of one chunk's arrays: shown cut to the rows "
                                  "every array has (" + ", ".join(f"{d}: {n}" for d, n in cut.items()) + ")")
    return ds


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
