"""Benchmarks for django-satori (``make bench``; ``python -m bench.run --help``).

Every figure is measured in a fresh child process (``python -m bench.child``)
so that its peak memory is its own, and every comparison runs side by side in
the same invocation and is reported as a ratio. Results go to bench/RESULTS.md.
"""
