"""Theory: exact dynamics of the broken conservation laws (issue 5), predicted for every run."""

from .predict import MOMENTUM_VARIANTS, SGD_VARIANTS, Predictor, variants_for

__all__ = ["MOMENTUM_VARIANTS", "SGD_VARIANTS", "Predictor", "variants_for"]
