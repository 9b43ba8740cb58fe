"""Exceptions that paratrain raises on purpose.

User mistakes raise ``ValueError``/``TypeError`` subclasses so that ordinary ``except
ValueError`` code keeps working; network trouble raises :class:`CommTimeout` or
:class:`PeerError`, which always name the peer that was waited for.
"""


class ConfigError(ValueError):
    """A bad option or value, caught at the edge. The message names the key, the value
    and what is allowed."""


class CommTimeout(TimeoutError):
    """A network wait ran past its timeout. The message says who was waited for."""


class PeerError(RuntimeError):
    """A peer (worker or server) answered with an error or went away."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the message says at which step."""


def check_choice(name: str, value, allowed) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        allowed_text = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{name}={value!r} is not allowed; choose one of: {allowed_text}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a positive (or non-negative) number."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be a number {bound}")
