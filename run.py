"""Entry point for ``ray submit cluster/config.yaml run.py`` and ``ray job submit ... -- python run.py``.

Arguments are those of ``gdfo run``; with none, it runs the embedded defaults. A first
argument ``tune``, ``bench`` or ``report`` runs that command instead (``run.py bench --tasks ...``).
"""

import sys

from gdfo_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] in (["tune"], ["bench"], ["report"], ["run"]) else ["run", *args]))
