"""cluo's benchmarks: ``python -m bench`` (``make bench``) runs them against the
real test-bed control plane and writes docs/benchmarks.md. See bench/__main__.py."""
