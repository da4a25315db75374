"""Seeds derived from the study's one seed (``study.seed``): every random stream of a run (batch
orders of the discrete run and its replicas, Brownian paths, SVAG's batches) has its own seed,
recorded in the Dataset's ``seeds`` attribute.

``derive_seed(seed, "sgd", 0) == seed`` so that a single run and replica 0 of an ensemble draw the
same batches as before ensembles existed; every other stream is numpy's ``SeedSequence`` of
(seed, a stable hash of its name, the replica).
"""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(seed: int, stream: str, replica: int = 0) -> int:
    """The seed of ``stream`` (``"sgd"`` or a dynamics' label), replica ``replica``."""
    if stream == "sgd" and replica == 0:
        return int(seed)
    entropy = [int(seed), zlib.crc32(stream.encode()), int(replica)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])
