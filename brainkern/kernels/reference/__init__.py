"""The ``torch`` backend: the kernel interface implemented with torch's own ops, one module per
op family. It is the baseline the benchmarks compare against and the backend for dtypes and
devices no hand-written kernel serves."""
