"""Declared options: a part's settings are a frozen dataclass whose fields say their own rules.

Each part (an allocation, a criterion, a pattern, a recovery, an objective, a dynamics) that has options
declares them next to its code as a nested ``Settings`` class::

    @ALLOCATIONS.register("erk")
    class ERK(Allocation):
        @dataclass(frozen=True)
        class Settings(Options, part="erk"):
            power: float = option(1.0, "ERK exponent (0 gives uniform)", minimum=0)

An option's canonical key is ``<part>_<field>`` (``erk_power``): its flag (``--erk-power``), its key in a
config file (flat, or nested as ``erk: {power: ...}``) and the name its errors use. Every option is
checked once, here, when its settings are built; the allowed values are written once, in the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from .errors import ConfigError

_UNBOUNDED = float("inf")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What values an option allows; :meth:`check` raises :class:`ConfigError` naming the option otherwise.

    Attributes:
        kind: ``bool``, ``int``, ``float``, ``str``, ``tuple`` (of strings) or ``dict``.
        choices: the allowed values of a ``str`` option.
        minimum, maximum: bounds of a number; ``open_maximum`` excludes the maximum.
        optional: ``None`` is allowed too (a default computed at run time).
        check: a further check of the value, raising :class:`ConfigError` itself.
    """

    kind: type
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    open_maximum: bool = False
    optional: bool = False
    check: Callable[[str, Any], None] | None = None

    def validate(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        elif self.kind is int:
            low = self.minimum
            if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
                wanted = "an integer" if low is None else "a positive integer" if low == 1 else f"an integer >= {low:g}"
                raise ConfigError(f"{name} must be {wanted}, got {value!r}")
        elif self.kind is float:
            self._check_number(name, value)
        elif self.choices is not None and value not in self.choices:
            raise ConfigError(f"{name} {value!r} is not allowed; choose from {', '.join(self.choices)}")
        if self.check is not None:
            self.check(name, value)

    def _check_number(self, name: str, value: Any) -> None:
        low = -_UNBOUNDED if self.minimum is None else self.minimum
        high = _UNBOUNDED if self.maximum is None else self.maximum
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and low <= value <= high and not (self.open_maximum and value >= high):
            return
        if low == -_UNBOUNDED and high == _UNBOUNDED:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if high == _UNBOUNDED:
            raise ConfigError(f"{name} must be a number >= {low:g}, got {value!r}")
        closing = ")" if self.open_maximum else "]"
        raise ConfigError(f"{name} {value!r} is not allowed; it must be in [{low:g}, {high:g}{closing}")


def positive(name: str, value: float) -> None:
    """A further check (:func:`option` ``check``) for numbers that must be above zero."""
    if not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def option(default: Any, help: str, *, kind: type | None = None, choices: Sequence[str] | None = None,
           minimum: float | None = None, maximum: float | None = None, open_maximum: bool = False,
           check: Callable[[str, Any], None] | None = None, cli: bool = True) -> Any:
    """A dataclass field that is a user-facing option.

    Args:
        default: the default value (a list or dict default is copied per instance).
        help: one line for ``--help`` and the docs.
        kind: the value's type; taken from the default unless that is ``None`` (then ``kind`` is needed
            and ``None`` stays allowed).
        choices: the allowed strings.
        minimum, maximum, open_maximum: bounds of a number (``minimum=1`` for a positive integer).
        check: a further check ``check(name, value)`` that raises :class:`ConfigError`.
        cli: whether the option gets a command-line flag.
    """
    rule = Rule(kind or type(default), tuple(choices) if choices is not None else None, minimum, maximum,
                open_maximum, default is None, check)
    metadata = {"help": help, "rule": rule, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def default_of(field: dataclasses.Field) -> Any:
    """An option's default value (a fresh copy where the default is a list or dict)."""
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def rule_of(field: dataclasses.Field) -> Rule:
    return field.metadata["rule"]


def check_fields(instance: Any, prefix: str = "") -> None:
    """Validates every option field of a dataclass instance; names in errors are ``prefix + field``."""
    for field in dataclasses.fields(instance):
        if "rule" in field.metadata:
            rule_of(field).validate(prefix + field.name, getattr(instance, field.name))


class Options:
    """Base of a part's ``Settings``: frozen dataclasses validated on construction.

    A subclass names its part (``class Settings(Options, part="iee")``); its fields are declared with
    :func:`option` and their keys are ``<part>_<field>``.
    """

    part: ClassVar[str] = ""

    def __init_subclass__(cls, part: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.part = part

    def __post_init__(self) -> None:
        check_fields(self, f"{self.part}_")

    @classmethod
    def build(cls, values: dict[str, Any]) -> Options:
        """Settings from ``{field: value}``; an unknown field is a :class:`ConfigError` listing the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in known:
                allowed = ", ".join(known) if known else "none"
                raise ConfigError(f"unknown option {key!r} of {cls.part}; its options: {allowed}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


class Part:
    """Base of every part of an axis (an allocation, a criterion, a recovery, an objective, a dynamics).

    ``Settings`` are its options (``None``: it has none); :meth:`from_config` builds the part from its settings
    in a run's config. A part that also takes run values (batch size, seed, ...) overrides it.
    """

    Settings: ClassVar[type[Options] | None] = None

    @classmethod
    def from_config(cls, config) -> Part:
        return cls(**config.settings_of(cls).to_dict()) if cls.Settings is not None else cls()


def plain(value: Any) -> Any:
    """A value as YAML and JSON hold it (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value
