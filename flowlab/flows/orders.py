"""Discretisation-error analysis (``flowlab orders``): placeholder, filled in below."""
