"""Byte builders and drivers shared by the NBD codec tests."""

from __future__ import annotations

from devagent.nbd.client_codec import ClientConnection
from devagent.nbd.codec import Export, NeedData
from devagent.nbd.proto import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    IHAVEOPT,
    OPTION_HEADER,
    OPTION_REPLY_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    U16,
    U32,
    ClientFlag,
    Option,
)
from devagent.nbd.server_codec import ServerConnection, ServerEvent

EXPORT = Export("disk", 1 << 20)
FLAGS = CLIENT_FLAGS.pack(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)


def opt(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return U32.pack(len(raw)) + raw


def go(name: str = "disk", infos: tuple[int, ...] = (), option: int = Option.GO) -> bytes:
    payload = string(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)
    return opt(option, payload)


def meta(option: int, name: str = "disk", queries: tuple[str, ...] = (BASE_ALLOCATION,)) -> bytes:
    payload = string(name) + U32.pack(len(queries)) + b"".join(string(q) for q in queries)
    return opt(option, payload)


def req(
    command: int,
    handle: int = 1,
    offset: int = 0,
    length: int = 0,
    flags: int = 0,
    data: bytes = b"",
) -> bytes:
    if data and not length:
        length = len(data)
    return REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length) + data


HANDSHAKE = FLAGS + opt(Option.STRUCTURED_REPLY) + meta(Option.SET_META_CONTEXT) + go()


def events(server: ServerConnection, data: bytes = b"") -> list[ServerEvent]:
    if data:
        server.receive_data(data)
    out: list[ServerEvent] = []
    while True:
        event = server.next_event()
        if isinstance(event, NeedData):
            return out
        out.append(event)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server handshake output (after the greeting) into (option, reply, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        _, option, reply, length = OPTION_REPLY_HEADER.unpack_from(data, pos)
        pos += OPTION_REPLY_HEADER.size
        out.append((option, reply, data[pos : pos + length]))
        pos += length
    return out


def new_server(*exports: Export) -> ServerConnection:
    server = ServerConnection({e.name: e for e in (exports or (EXPORT,))})
    server.data_to_send()  # the greeting
    return server


def ready_server(structured: bool = True, export: Export = EXPORT) -> ServerConnection:
    server = new_server(export)
    handshake = (
        FLAGS
        + (opt(Option.STRUCTURED_REPLY) + meta(Option.SET_META_CONTEXT) if structured else b"")
        + go(export.name)
    )
    events(server, handshake)
    server.data_to_send()
    return server


def pair(export: Export = EXPORT, **client_kw: object) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server codec shuttled to the end of the handshake."""
    server = ServerConnection({export.name: export})
    client = ClientConnection(export.name, **client_kw)  # type: ignore[arg-type]
    shuttle(client, server)
    return client, server


def shuttle(client: ClientConnection, server: ServerConnection) -> list[object]:
    """Move bytes both ways until neither side has anything to say; return all events."""
    seen: list[object] = []
    while True:
        moved = False
        out = server.data_to_send()
        if out:
            client.receive_data(out)
            moved = True
        while not isinstance(ev := client.next_event(), NeedData):
            seen.append(ev)
        out = client.data_to_send()
        if out:
            server.receive_data(out)
            moved = True
        seen.extend(events(server))
        if not moved:
            return seen
