"""Running a sweep on dask.distributed, and reading it back as one Dataset.

``flowlab sweep STUDY.toml [--out DIR]`` submits every point of the study's ``[sweep]`` as one task
to a dask.distributed cluster: an embedded ``LocalCluster`` sized to the machine (worker processes
with one thread each) by default, or an existing scheduler (``--scheduler tcp://HOST:PORT`` or
``--scheduler-file F``).  Each point is a whole ``flowlab run`` writing its own store under
``DIR/points/<id>/``; a point that finishes writes ``point.json`` last (its status: ``ok``, or
``failed: <error>``), so a point without it is unfinished.  A killed worker's task is rescheduled by
dask on another worker (dask's own retries); it continues from the point's last checkpoint
(``[checkpoint]``, :mod:`flowlab.checkpoint`) if it took one, else from an empty folder.
``--resume`` runs only the points that are missing, unfinished or failed: a finished point is never
recomputed, and an unfinished one continues from its checkpoint.

``DIR/sweep.json`` holds the study, the axes and the points; :func:`open_sweep` (and
``flowlab.open_result(DIR)``) presents the points as ONE lazy Dataset with the sweep's dims, points
of different lengths or flows aligned with NaN (said in the ``sweep_alignment`` attribute), and
``sweep_status`` (sweep dims) for every point.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..config import first_difference
from ..errors import ConfigError, FlowlabError
from .config import point_study

SWEEP_FILE = "sweep.json"
POINT_FILE = "point.json"


def run_point(study_json: str, source: str | None, out: str) -> dict[str, Any]:
    """One sweep point (a dask task): run the study into ``out`` unless it finished before."""
    import torch

    from ..checkpoint import NAME as CHECKPOINT
    from ..config import parse_study
    from ..runner import Run

    torch.set_num_threads(1)
    out_p = Path(out)
    done = _read_point(out_p)
    if done is not None and done.get("status") == "ok":
        return done
    # an unfinished point (its worker killed, the sweep interrupted) continues from its checkpoint
    resume = done is None and (out_p / CHECKPOINT).is_file()
    if out_p.exists() and not resume:
        shutil.rmtree(out_p)
    t0 = time.perf_counter()
    try:
        study = parse_study(json.loads(study_json), source)
        try:
            Run(study, out_p, overwrite=not resume, resume=resume).execute().close()
        except FlowlabError:
            if not resume:
                raise
            shutil.rmtree(out_p, ignore_errors=True)  # a checkpoint that cannot be resumed: run afresh
            Run(study, out_p, overwrite=True).execute().close()
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - a failed point is a result, not the end of the sweep
        status = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    info = {"status": status, "seconds": time.perf_counter() - t0, "worker": os.getpid()}
    out_p.mkdir(parents=True, exist_ok=True)
    tmp = out_p / (POINT_FILE + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, out_p / POINT_FILE)
    return info


def _read_point(folder: Path) -> dict | None:
    try:
        info = json.loads((folder / POINT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _manifest(study: Any) -> dict[str, Any]:
    sweep = study.section("sweep")
    names = sweep.dim_names()
    points = []
    for i, (index, setting) in enumerate(sweep.points()):
        points.append({"id": f"p{i:04d}", "index": list(index), "setting": setting})
    return {"study": study.to_dict(), "axes": sweep.to_dict(), "names": names,
            "dims": [names[g[0]] for g in sweep.groups()], "points": points}


def _client(scheduler: str | None, scheduler_file: str | None, workers: int | None, log):
    from distributed import Client, LocalCluster

    if scheduler or scheduler_file:
        what = scheduler or scheduler_file
        try:
            if scheduler_file:
                if not Path(scheduler_file).is_file():
                    raise ConfigError("--scheduler-file", scheduler_file, "no such file")
                return Client(scheduler_file=scheduler_file, timeout="5s"), None
            return Client(scheduler, timeout="5s"), None
        except ConfigError:
            raise
        except (OSError, TimeoutError, ValueError) as exc:
            raise ConfigError("--scheduler" if scheduler else "--scheduler-file", what,
                              f"cannot reach a dask scheduler there within 5 s ({type(exc).__name__})") from None
    n = workers or max(1, os.cpu_count() or 1)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def run_sweep(study: Any, out: str | Path, *, scheduler: str | None = None, scheduler_file: str | None = None,
              workers: int | None = None, resume: bool = False, overwrite: bool = False,
              log=None, client: Any = None) -> xr.Dataset:
    """Run every point of ``study``'s ``[sweep]`` (module docstring); return :func:`open_sweep`.
    ``client``: an existing ``distributed.Client`` to submit to (left open)."""
    log = log or (lambda m: print(m, file=sys.stderr))
    if study.section("sweep") is None:
        raise ConfigError("sweep", None, "the study has no [sweep] section (axes over study keys)")
    manifest = _manifest(study)
    studies = {p["id"]: point_study(study, p["setting"]) for p in manifest["points"]}  # every point checked first
    out = Path(out)
    existing = out / SWEEP_FILE
    if existing.exists():
        old = json.loads(existing.read_text())
        if old.get("study") != manifest["study"]:
            if not overwrite:
                key, was, now = first_difference(old.get("study", {}), manifest["study"])
                raise ConfigError("--out", str(out), f"this sweep folder belongs to another study (first difference: "
                                  f"{key}: {was!r} vs {now!r}); choose another --out, or --overwrite")
            shutil.rmtree(out)
        elif not (resume or overwrite):
            raise ConfigError("--out", str(out), "a sweep of this study is there: --resume runs its missing and "
                              "failed points, --overwrite starts again")
        elif overwrite:
            shutil.rmtree(out)
    todo = [p for p in manifest["points"] if (_read_point(out / "points" / p["id"]) or {}).get("status") != "ok"]
    given = client
    cluster = None
    if todo and client is None:  # connect first: an unreachable scheduler is one line, and nothing is written
        client, cluster = _client(scheduler, scheduler_file, workers, log)
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
        (out / SWEEP_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
        log(f"sweep {study.name}: {len(manifest['points'])} points, {len(todo)} to run, dims "
            f"{', '.join(manifest['dims'])}")
        if client is not None and todo:
            log(f"dask dashboard: {client.dashboard_link}")
            _submit_and_wait(client, todo, studies, study.source, out, log)
    finally:
        if client is not None and given is None:
            client.close()
        if cluster is not None:
            cluster.close()
    return open_sweep(out)


def _submit_and_wait(client, todo, studies, source, out: Path, log) -> None:
    from distributed import as_completed

    futures = {client.submit(run_point, studies[p["id"]].to_json(), source, str(out / "points" / p["id"]),
                             key=f"flowlab-point-{out.resolve()}-{p['id']}", pure=False, retries=2): p["id"]
               for p in todo}
    total, done, failed = len(futures), 0, 0
    t0 = time.perf_counter()
    every = 0.0 if sys.stderr.isatty() else 10.0
    last = -math.inf
    for fut in as_completed(futures):
        pid = futures[fut]
        try:
            info = fut.result()
        except Exception as exc:  # noqa: BLE001 - e.g. a worker killed more often than dask retries
            info = {"status": f"failed: {type(exc).__name__}: {exc}"}
            (out / "points" / pid).mkdir(parents=True, exist_ok=True)
            (out / "points" / pid / POINT_FILE).write_text(json.dumps(info))
        done += 1
        failed += info["status"] != "ok"
        elapsed = time.perf_counter() - t0
        if time.perf_counter() - last >= every or done == total:
            eta = elapsed / done * (total - done)
            running = sum(1 for f in futures if f.status == "pending") if done < total else 0
            log(f"points done {done}/{total} (failed {failed}, waiting or running {running}), "
                f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s")
            last = time.perf_counter()
        if info["status"] != "ok":
            log(f"  {pid}: {info['status']}")


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def open_sweep(folder: str | Path) -> xr.Dataset:
    """The points of a sweep folder as one lazy (dask-backed) Dataset with the sweep's dims.

    Points are aligned by record position: ``time`` and ``snapshot`` become plain dims whose
    coordinates (t = Σ η, and ``step``) vary with the sweep's dims (points with different η record
    at different t); shorter points and points without some dynamics are padded with NaN (said in
    ``sweep_alignment``); points not finished (missing, failed) are NaN throughout, and
    ``sweep_status`` (sweep dims) says which."""
    from ..store import open_result

    folder = Path(folder)
    try:
        manifest = json.loads((folder / SWEEP_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FlowlabError(f"sweep {folder}: cannot read {SWEEP_FILE} ({type(exc).__name__})") from None
    try:
        names, dims = manifest["names"], manifest["dims"]
        axes = {k: v for k, v in manifest["axes"].items() if k != "zip"}
        groups = [[k for k in axes if names[k] == d or _group_of(manifest, k) == d] for d in dims]
        shape = [len(axes[g[0]]) for g in groups]
        status = np.full(shape, "missing", dtype=object)
        where = [(str(p["id"]), tuple(int(i) for i in p["index"])) for p in manifest["points"]]
        for pid, idx in where:
            if len(idx) != len(shape) or any(not 0 <= i < n for i, n in zip(idx, shape)):
                raise IndexError(f"point {pid} has index {list(idx)} outside the sweep's shape {shape}")
        if not all(isinstance(pid, str) and pid and "/" not in pid and pid not in (".", "..") for pid, _ in where):
            raise ValueError("a point id that is not a folder name")
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise FlowlabError(f"sweep {folder}: {SWEEP_FILE} is not a sweep manifest, or a damaged one "
                           f"({type(exc).__name__}: {exc})") from None
    points: dict[tuple, xr.Dataset] = {}
    for pid, idx in where:
        info = _read_point(folder / "points" / pid)
        if info is not None:
            status[idx] = str(info.get("status", "damaged: point.json without a status"))
        if info is not None and info.get("status") == "ok":
            try:
                ds = open_result(folder / "points" / pid)
            except FlowlabError as exc:  # the other points are still reported
                status[idx] = f"damaged: {str(exc)[:200]}"
                continue
            ds = ds.drop_indexes([d for d in ("time", "snapshot") if d in ds.indexes])
            points[idx] = ds.assign({n: ds[n].chunk() for n in ds.data_vars if ds[n].dtype.kind not in "USO"})
    if not points:
        raise FlowlabError(f"sweep {folder}: no point has finished yet (statuses: "
                           f"{', '.join(sorted(set(status.ravel().tolist())))})")
    indexed = {d for ds in points.values() for d in ds.indexes}
    all_dims = list(dict.fromkeys(d for ds in points.values() for d in ds.dims))
    sizes = {d: max(ds.sizes.get(d, 0) for ds in points.values()) for d in all_dims if d not in indexed}
    unions = {d: list(dict.fromkeys(x for ds in points.values() if d in ds.indexes for x in ds[d].values.tolist()))
              for d in all_dims if d in indexed}
    notes = []
    if any(ds.sizes.get("time", 0) != sizes.get("time", 0) for ds in points.values()):
        notes.append("points differ in length: shorter ones padded with NaN along time")
    if any(ds.dynamics.values.tolist() != unions.get("dynamics") for ds in points.values()):
        notes.append("points differ in their dynamics: aligned on the union with NaN")
    if any(ds.sizes.get(d, 0) != sizes[d] for ds in points.values() for d in sizes if d not in ("time", "snapshot")):
        notes.append("points differ in shape (" + ", ".join(d for d in sizes if d not in ("time", "snapshot")) + "): padded with NaN")
    template = None
    for idx, ds in points.items():
        pad = {d: (0, sizes[d] - ds.sizes[d]) for d in sizes if d in ds.dims and ds.sizes[d] < sizes[d]}
        if pad:
            ds = ds.pad(pad)
        for d, values in unions.items():
            if d in ds.dims and ds[d].values.tolist() != values:
                ds = ds.reindex({d: values})
        points[idx] = _plain_strings(ds)
        template = template if template is not None else ds
    blank = _blank(template)

    def nest(prefix: tuple, level: int):
        if level == len(dims):
            return points.get(prefix, blank)
        return [nest(prefix + (i,), level + 1) for i in range(shape[level])]

    combined = xr.combine_nested(nest((), 0), concat_dim=dims, coords="different", compat="equals", data_vars="all",
                                 combine_attrs="drop_conflicts", join="outer")
    coords: dict[str, Any] = {}
    for d, g in zip(dims, groups):
        coords[d] = (d, _labels(axes[g[0]]))
        for k in g[1:]:
            coords[names[k]] = (d, _labels(axes[k]))
    combined = combined.assign_coords(coords).transpose(*dims, ...)
    combined["sweep_status"] = (tuple(dims), status.astype(str))
    combined.attrs.update({"sweep": json.dumps(manifest["axes"]), "sweep_dims": json.dumps(names),
                           "sweep_alignment": "; ".join(notes) or "every point has the same length and dynamics"})
    return combined


def _labels(values: list) -> list:
    """Axis coordinate values: list values (e.g. model.widths) as their JSON text."""
    return [json.dumps(v) if isinstance(v, list) else v for v in values]


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """String variables that padding or reindexing turned into objects (NaN for the new entries)
    back to fixed-width strings, "" where missing (numpy: they are small and loaded)."""
    for name, v in list(ds.variables.items()):
        if v.dtype.kind == "O":
            values = np.asarray(v.values, dtype=object)
            fixed = np.array(["" if (x is None or (isinstance(x, float) and np.isnan(x))) else str(x)
                              for x in values.ravel()], dtype=str).reshape(values.shape)
            if name in ds.coords:
                ds = ds.assign_coords({name: (v.dims, fixed, v.attrs)})
            else:
                ds[name] = (v.dims, fixed, v.attrs)
    return ds


def _blank(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every value missing (NaN; "missing" for strings; −1 for integers)."""
    out = ds.copy()
    for name, v in list(out.variables.items()):
        if name in out.indexes:
            continue
        kind = v.dtype.kind
        fill = np.nan if kind == "f" else ("missing" if kind in "UOS" else -1)
        out[name] = xr.full_like(out[name], fill, dtype=v.dtype)
    return out


def _group_of(manifest: dict, key: str) -> str | None:
    for g in manifest["axes"].get("zip", []):
        if key in g:
            return manifest["names"][g[0]]
    return None
