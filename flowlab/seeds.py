"""Seeds derived from the study's one seed (``study.seed``): every random stream of a run (batch
orders of the discrete run and its replicas, Brownian paths, SVAG's batches) has its own seed,
recorded in the Dataset's ``seeds`` attribute.

``derive_seed(seed, "sgd", 0) == seed`` so that a single run and replica 0 of an ensemble draw the
same batches as before ensembles existed; every other stream is numpy's ``SeedSequence`` of
(seed, a stable hash of its name, the replica).

flowlab's own streams draw from their own ``torch.Generator``.  Code that flowlab calls and that may
draw from the *global* generators — a model builder's initialisation, a data builder, a model with
random layers during the run — runs inside :func:`seeded_globals`: torch's (CPU and the run's
device), numpy's and Python's global generators seeded from the study, and put back as they were
afterwards, so a run neither depends on nor changes the caller's random state.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(seed: int, stream: str, replica: int = 0) -> int:
    """The seed of ``stream`` (``"sgd"`` or a dynamics' label), replica ``replica``."""
    if stream == "sgd" and replica == 0:
        return int(seed)
    entropy = [int(seed), zlib.crc32(stream.encode()), int(replica)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def seeded_globals(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside: torch's global generator (CPU, and ``device``'s when it is a CUDA device), numpy's
    and Python's seeded with ``seed`` (numpy's with ``seed mod 2³²``); afterwards, all as they were."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(int(seed))
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        np.random.seed(int(seed) % (1 << 32))
        random.seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
