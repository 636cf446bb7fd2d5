"""cluo's version, as pyproject.toml's ``[project] version`` says it.

A constant rather than ``importlib.metadata.version("cluo")``: the agent reads it at every
start for its User-Agent, and importlib.metadata costs its process 0.6 MB and 10 to 18 ms
of CPU (docs/decisions.md). tests/unit/test_kube_config.py keeps the two equal.
"""

VERSION = "0.1.0"
