"""PyInstaller entry point of the cluo-agent bundle (hack/build-agent-artifact.sh).

The console script `cluo-agent` (pyproject's [project.scripts]) is generated at install
time, so the bundle needs a real file to start from: this one.
"""

import sys

from cluo_host.main import main

if __name__ == "__main__":
    sys.exit(main())
