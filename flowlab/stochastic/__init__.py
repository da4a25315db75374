"""Stochastic continuous models of SGD (SDEs, SVAG), ensembles of replicas and weak errors
(docs/theory.md#stochastic-models)."""

from .integrator import EulerMaruyama
from .noise import NoiseSource, noise_constant, noise_scale
from .sde import SME, SME2, SMEMomentum, StochasticFlow

__all__ = ["EulerMaruyama", "NoiseSource", "SME", "SME2", "SMEMomentum", "StochasticFlow", "noise_constant",
           "noise_scale"]
