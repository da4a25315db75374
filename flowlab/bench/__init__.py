"""Benchmarks that print ratios (flowlab vs the raw PyTorch/JAX baseline, measured in one run).

``python -m flowlab.bench NAME [options]`` runs ``flowlab.bench.NAME.main(argv)``.
"""
