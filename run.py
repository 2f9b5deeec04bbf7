"""Entry point for ``ray submit cluster/config.yaml run.py`` and ``ray job submit ... -- python run.py``.

Arguments are those of ``gdfo run``; with none, it runs the embedded defaults.
"""

import sys

from gdfo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
