"""Typed messages at the JSON edge: every body that crosses a process boundary is decoded
once, here, into a declared type (a :class:`msgspec.Struct`), and nothing past the handler
sees a dict. A request body that does not fit is a :class:`UsageError` (:func:`decode`,
:func:`convert`), a peer's answer that does not fit a :class:`PeerError` (:func:`from_peer`),
each naming the field's path as msgspec reports it
(``Expected `int`, got `str` - at `$.disks[1].size```)."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from devagent.errors import PeerError, UsageError

T = TypeVar("T")


def decode(raw: bytes | str, into: type[T], *, what: str = "the request body") -> T:
    """``raw`` JSON as an ``into``; :class:`UsageError` naming the bad field otherwise."""
    try:
        return msgspec.json.decode(raw, type=into)
    except msgspec.DecodeError as err:  # ValidationError is a DecodeError too
        raise UsageError(f"{what}: {err}") from None


def convert(data: object, into: type[T], *, what: str = "the request body") -> T:
    """Already-parsed JSON (a peer's answer, a saved record) as an ``into``."""
    try:
        return msgspec.convert(data, type=into)
    except msgspec.ValidationError as err:
        raise UsageError(f"{what}: {err}") from None


def from_peer(data: object, into: type[T], *, what: str) -> T:
    """A peer's answer (another daemon's, an agent's, QEMU's) as an ``into``; one that does
    not fit is the peer's fault: :class:`PeerError` naming the field."""
    try:
        return msgspec.convert(data, type=into)
    except msgspec.ValidationError as err:
        raise PeerError(f"{what}: {err}") from None


def to_json(message: object) -> Any:
    """A message as plain JSON values (what aiohttp's ``json=`` and ``json_response`` take)."""
    return msgspec.to_builtins(message)
