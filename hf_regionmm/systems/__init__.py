"""Registered systems: importing this package registers every system with the registry and the Auto classes."""

from . import (
    groma,  # noqa: F401
    regionblip,  # noqa: F401
    tap,  # noqa: F401
    ullava,  # noqa: F401
)
