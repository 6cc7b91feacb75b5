"""Errors the CLI turns into one clear line and exit code 2 instead of a traceback, and the
one-line warning for what is allowed but probably not meant."""
import sys


class ConfigError(ValueError):
    """A configuration value is invalid or two values contradict each other.

    ``field`` is the dotted config key the user should change (e.g. ``model.n_heads``).
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def require(condition: bool, field: str, message: str) -> None:
    """Raise ConfigError(field, message) unless condition holds."""
    if not condition:
        raise ConfigError(field, message)


def require_positive_int(value, field: str) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0, field,
            f"must be a positive integer, got {value!r}")


def warn(message: str) -> None:
    """One line on stderr, prefixed ``ssdbench:``; the run goes on."""
    print(f"ssdbench: {message}", file=sys.stderr, flush=True)


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, step: int, loss: float):
        self.step, self.loss = step, loss
        super().__init__(f"loss became {loss} at step {step}")
