"""gdfo-ray: prompt tuning of black-box language models by GDFO on Ray.

The public surface is small: :func:`run` with a :class:`GDFOConfig`, and the
exception family. Everything else is reachable by module for those who extend it.
"""

from gdfo_ray.config import GDFOConfig
from gdfo_ray.exceptions import (
    BudgetExhaustedError,
    ConfigError,
    DataError,
    GDFOError,
    ModelNotFoundError,
    ResumeError,
    TeacherError,
)
from gdfo_ray.version import __version__

__all__ = [
    "BudgetExhaustedError",
    "ConfigError",
    "DataError",
    "GDFOConfig",
    "GDFOError",
    "ModelNotFoundError",
    "ResumeError",
    "TeacherError",
    "__version__",
    "run",
]


def run(config, **kwargs):
    """See :func:`gdfo_ray.api.run` (imported lazily: torch loads only when a run starts)."""
    from gdfo_ray.api import run as _run

    return _run(config, **kwargs)
