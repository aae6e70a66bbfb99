"""Checks of caller-sent text shared by the core and the plugins.

Two rules for every string a request carries:

- A pattern is matched against the WHOLE string (``full_match``).  Python's
  ``re.match(r"^x$")`` accepts ``"x\\n"`` (``$`` matches before a final
  newline), and such a value split dnsmasq.conf and added lines to preseeds.
  pydantic's ``Field(pattern=...)`` runs in pydantic-core's Rust engine, where
  ``$`` is the end of the text and an unanchored pattern is a search: anchor it.
- No control character (``control_chars``): none of C0 (newline, CR, tab,
  NUL...), DEL, C1, nor the Unicode line and paragraph separators.  The server
  refuses them in every request string before a model sees it
  (``refuse_control_chars``), so a new model gets the rule without a line of
  its own; a field that really takes lines (a shell script) is declared
  ``Multiline``, and then only newline, CR and tab pass.
"""

from __future__ import annotations

import re
import types
import typing
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_MULTILINE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")


class _MultilineMarker:
    """Metadata of a field whose text may hold newlines, CR and tabs."""


Multiline = Annotated[str, _MultilineMarker()]

UUID_TEXT = (r"[0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
             r"-[0-9a-fA-F]{12}")


def normalize_uuid(value: str) -> str:
    """32 hex digits or the dashed form -> 32 lowercase hex digits (ValueError otherwise)."""
    if not full_match(UUID_TEXT, value):
        raise ValueError("must be a UUID: 32 hex digits, or 36 characters with dashes")
    value = value.replace("-", "").lower()
    if value == "0" * 32:
        raise ValueError("must not be all zeros (the nil UUID names no resource)")
    return value


#: A resource's uuid as the manual writes it, normalised to 32 lowercase hex digits.
ResourceUuid = Annotated[str, AfterValidator(normalize_uuid),
                         Field(json_schema_extra={"pattern": rf"^(?:{UUID_TEXT})$"})]


def full_match(pattern: str | re.Pattern[str], value: Any) -> bool:
    """True when ``pattern`` matches all of ``value`` (a str), trailing newline included."""
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def control_chars(value: str, *, multiline: bool = False) -> str | None:
    """The first control character in ``value`` (as ``\\x0a``-style text), or None."""
    m = (_CONTROL_MULTILINE if multiline else _CONTROL).search(value)
    return None if m is None else escape_controls(m.group())


def check_text(value: str, what: str = "the value", *, multiline: bool = False) -> str:
    """``value``, or ValueError naming the control character (usable in a validator)."""
    bad = control_chars(value, multiline=multiline)
    if bad is not None:
        raise ValueError(f"{what} must not contain control characters (found {bad})")
    return value


def escape_controls(value: str) -> str:
    """``value`` with each control character written as ``\\xNN`` (safe to echo back)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", value)


class ControlCharError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], bad: str, multiline: bool = False) -> None:
        self.loc = tuple(escape_controls(p) if isinstance(p, str) else p for p in loc)
        which = ("other than line breaks and tabs" if multiline
                 else "such as line breaks, tabs or NUL")
        super().__init__(f"'{'.'.join(map(str, self.loc)) or '(body)'}': must not contain "
                         f"control characters {which} (found {bad})")


def refuse_control_chars(model: type[BaseModel] | None, data: Any,
                         loc: tuple[str | int, ...] = ()) -> None:
    """Raise ControlCharError for the first control character in ``data`` (a request's
    parameters, keys included), following ``model`` to honour ``Multiline`` fields."""
    if isinstance(data, str):
        bad = control_chars(data)
        if bad is not None:
            raise ControlCharError(loc, bad)
    elif isinstance(data, dict):
        fields = _fields(model) if model is not None else {}
        for key, value in data.items():
            if isinstance(key, str) and (bad := control_chars(key)) is not None:
                raise ControlCharError(loc + (key,), bad)
            sub, multiline = fields.get(key, (None, False))
            if multiline and isinstance(value, str):
                if (bad := control_chars(value, multiline=True)) is not None:
                    raise ControlCharError(loc + (key,), bad, multiline=True)
            else:
                refuse_control_chars(sub, value, loc + (key,))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            refuse_control_chars(model, value, loc + (i,))


@lru_cache(maxsize=None)
def _fields(model: type[BaseModel]) -> dict[str, tuple[type[BaseModel] | None, bool]]:
    """A model's keys (wire alias and Python name) -> (the nested model, is it Multiline)."""
    out: dict[str, tuple[type[BaseModel] | None, bool]] = {}
    for name, f in model.model_fields.items():
        entry = (_nested_model(f.annotation),
                 any(isinstance(m, _MultilineMarker) for m in f.metadata))
        out[name] = entry
        if f.alias:
            out[f.alias] = entry
    return out


def _nested_model(t: Any) -> type[BaseModel] | None:
    """The model inside an annotation (``X``, ``X | None``, ``list[X]``), if one."""
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType, list, tuple, set, frozenset, typing.Annotated):
        for arg in typing.get_args(t):
            found = _nested_model(arg)
            if found is not None:
                return found
    return None
