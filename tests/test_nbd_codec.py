"""The pure NBD codec: handshake, transmission, every rejection, splits at every offset."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from devagent.errors import ProtocolError
from devagent.nbd.client_codec import ClientConnection, Completed, Ready
from devagent.nbd.codec import (
    BASE_ALLOCATION_ID,
    DATA_CHUNK,
    Buffer,
    Disconnect,
    Export,
    NeedData,
)
from devagent.nbd.proto import (
    BASE_ALLOCATION,
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    NBDMAGIC,
    OPTION_HEADER,
    REQUEST,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY,
    STRUCTURED_REPLY_MAGIC,
    U16,
    U32,
    U64,
    ZERO_PAD,
    ChunkType,
    ClientFlag,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    NbdProtocolError,
    NbdUsageError,
    Option,
    Reply,
    ReplyFlag,
    TransmissionFlag,
    parse,
)
from devagent.nbd.server_codec import (
    BadRequest,
    Negotiated,
    OptionHandled,
    Request,
    ServerConnection,
    ServerState,
)
from nbd_helpers import (
    EXPORT,
    FLAGS,
    HANDSHAKE,
    events,
    go,
    meta,
    new_server,
    opt,
    option_replies,
    pair,
    ready_server,
    req,
    shuttle,
    string,
)

# -- constants and the buffer ---------------------------------------------------------------


def test_parse_unknown_value_names_it_in_hex() -> None:
    assert parse(Command, 3) is Command.FLUSH
    with pytest.raises(NbdProtocolError, match="unknown Command value 0x63"):
        parse(Command, 0x63)
    assert issubclass(NbdProtocolError, ProtocolError)


def test_buffer_rolls_back_a_half_read_message() -> None:
    buf = Buffer()
    buf.feed(b"abc")
    assert buf.consume(2) == b"ab"
    assert buf.consume(4) is None  # not enough: cursor stays after "ab"
    buf.rollback()
    assert buf.consume(3) == b"abc"
    buf.commit()
    assert buf.pending == 0
    buf.feed(b"xyz")
    assert buf.discard(10) == 3
    assert len(buf) == 0


# -- handshake --------------------------------------------------------------------------------


def test_greeting_advertises_fixed_newstyle_and_no_zeroes() -> None:
    server = ServerConnection({"disk": EXPORT})
    magic, ihaveopt, flags = GREETING.unpack(server.data_to_send())
    assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
    assert flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    assert server.state is ServerState.AWAIT_CLIENT_FLAGS


def test_full_handshake_with_go_structured_and_meta_context() -> None:
    server = new_server()
    got = events(server, HANDSHAKE)
    assert [type(e) for e in got] == [OptionHandled, OptionHandled, Negotiated]
    negotiated = got[-1]
    assert isinstance(negotiated, Negotiated)
    assert negotiated.structured
    assert dict(negotiated.contexts) == {BASE_ALLOCATION_ID: BASE_ALLOCATION}
    replies = option_replies(server.data_to_send())
    assert [(o, r) for o, r, _ in replies] == [
        (Option.STRUCTURED_REPLY, Reply.ACK),
        (Option.SET_META_CONTEXT, Reply.META_CONTEXT),
        (Option.SET_META_CONTEXT, Reply.ACK),
        (Option.GO, Reply.INFO),
        (Option.GO, Reply.ACK),
    ]
    assert replies[1][2] == U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode()
    info, size, flags = INFO_EXPORT.unpack(replies[3][2])
    assert (info, size) == (Info.EXPORT, EXPORT.size)
    assert flags & TransmissionFlag.SEND_FLUSH and flags & TransmissionFlag.SEND_FUA
    assert not flags & TransmissionFlag.SEND_DF  # not implemented, not advertised
    assert server.state is ServerState.TRANSMISSION


def test_export_name_reply_with_and_without_zero_padding() -> None:
    for client_flags, pad in ((ClientFlag.C_FIXED_NEWSTYLE, ZERO_PAD), (3, 0)):
        server = new_server()
        got = events(server, CLIENT_FLAGS.pack(client_flags) + opt(Option.EXPORT_NAME, b"disk"))
        assert isinstance(got[-1], Negotiated)
        out = server.data_to_send()
        assert len(out) == EXPORT_NAME_REPLY.size + pad
        size, flags = EXPORT_NAME_REPLY.unpack_from(out)
        assert size == EXPORT.size and flags & TransmissionFlag.HAS_FLAGS


def test_info_then_go_with_block_size_and_list() -> None:
    server = new_server(EXPORT, Export("other", 4096, read_only=True))
    got = events(server, FLAGS + opt(Option.LIST) + go("other", (Info.BLOCK_SIZE,), Option.INFO))
    assert [e.reply for e in got if isinstance(e, OptionHandled)] == [Reply.ACK, Reply.ACK]
    replies = option_replies(server.data_to_send())
    servers = [p for o, r, p in replies if r == Reply.SERVER]
    assert servers == [string("disk"), string("other")]
    block = [p for o, r, p in replies if r == Reply.INFO and p[:2] == U16.pack(Info.BLOCK_SIZE)]
    assert INFO_BLOCK_SIZE.unpack(block[0])[1:] == (1, 4096, MAX_PAYLOAD)
    export_info = [p for o, r, p in replies if r == Reply.INFO and p[:2] == U16.pack(0)]
    assert INFO_EXPORT.unpack(export_info[0])[2] & TransmissionFlag.READ_ONLY
    assert server.state is ServerState.OPTIONS  # INFO does not end the handshake


def test_list_meta_context_lists_base_allocation() -> None:
    for queries in ((), ("base:",), (BASE_ALLOCATION,)):
        server = new_server()
        events(
            server,
            FLAGS + opt(Option.STRUCTURED_REPLY) + meta(Option.LIST_META_CONTEXT, queries=queries),
        )
        replies = option_replies(server.data_to_send())
        assert (
            Option.LIST_META_CONTEXT,
            Reply.META_CONTEXT,
            U32.pack(0) + BASE_ALLOCATION.encode(),
        ) in replies
    server = new_server()
    events(
        server,
        FLAGS
        + opt(Option.STRUCTURED_REPLY)
        + meta(Option.LIST_META_CONTEXT, queries=("x-other:thing",)),
    )
    assert [r for _, r, _ in option_replies(server.data_to_send())][-1] == Reply.ACK


def test_abort_acks_and_disconnects() -> None:
    server = new_server()
    got = events(server, FLAGS + opt(Option.ABORT))
    assert got == [Disconnect("abort")]
    assert option_replies(server.data_to_send()) == [(Option.ABORT, Reply.ACK, b"")]
    assert server.state is ServerState.CLOSED


@pytest.mark.parametrize(
    ("stream", "reply"),
    [
        (opt(Option.STARTTLS), Reply.ERR_UNSUP),
        (opt(Option.EXTENDED_HEADERS), Reply.ERR_UNSUP),
        (opt(0x7777, b"junk"), Reply.ERR_UNSUP),
        (opt(Option.LIST, b"x"), Reply.ERR_INVALID),
        (opt(Option.STRUCTURED_REPLY, b"x"), Reply.ERR_INVALID),
        (opt(Option.STRUCTURED_REPLY) + opt(Option.STRUCTURED_REPLY), Reply.ERR_INVALID),
        (meta(Option.SET_META_CONTEXT), Reply.ERR_INVALID),  # before STRUCTURED_REPLY
        (opt(Option.STRUCTURED_REPLY) + meta(Option.SET_META_CONTEXT, "nope"), Reply.ERR_UNKNOWN),
        (
            opt(Option.STRUCTURED_REPLY) + meta(Option.SET_META_CONTEXT, queries=("nocolon",)),
            Reply.ERR_INVALID,
        ),
        (
            opt(Option.STRUCTURED_REPLY)
            + opt(Option.SET_META_CONTEXT, string("disk") + U32.pack(3)),
            Reply.ERR_INVALID,
        ),
        (
            opt(Option.STRUCTURED_REPLY)
            + opt(Option.SET_META_CONTEXT, string("disk") + U32.pack(0) + b"x"),
            Reply.ERR_INVALID,
        ),
        (go("nope"), Reply.ERR_UNKNOWN),
        (opt(Option.GO, U32.pack(99) + b"disk"), Reply.ERR_INVALID),
        (opt(Option.GO, string("disk") + U16.pack(2) + U16.pack(0)), Reply.ERR_INVALID),
        (opt(Option.GO, string("disk")), Reply.ERR_INVALID),
        (opt(Option.GO, string(b"\xff\xfe") + U16.pack(0)), Reply.ERR_INVALID),
        (opt(Option.GO, string("di\0sk") + U16.pack(0)), Reply.ERR_INVALID),
    ],
)
def test_option_rejections_answer_and_keep_negotiating(stream: bytes, reply: Reply) -> None:
    server = new_server()
    got = events(server, FLAGS + stream)
    assert isinstance(got[-1], OptionHandled) and got[-1].reply is reply
    assert option_replies(server.data_to_send())[-1][1] == reply
    assert server.state is ServerState.OPTIONS
    # the session goes on: a good GO still works
    assert isinstance(events(server, go())[-1], Negotiated)


def test_meta_context_for_another_export_is_dropped_at_go() -> None:
    server = new_server(EXPORT, Export("other", 4096))
    got = events(
        server,
        FLAGS + opt(Option.STRUCTURED_REPLY) + meta(Option.SET_META_CONTEXT, "other") + go("disk"),
    )
    negotiated = got[-1]
    assert isinstance(negotiated, Negotiated) and not negotiated.contexts
    bad = events(server, req(Command.BLOCK_STATUS, length=512))
    assert isinstance(bad[0], BadRequest) and bad[0].errno is Errno.EINVAL


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (CLIENT_FLAGS.pack(4), "unknown client flags 0x4"),
        (FLAGS + OPTION_HEADER.pack(0x1234, Option.GO, 0), "bad option magic 0x1234"),
        (FLAGS + OPTION_HEADER.pack(IHAVEOPT, Option.GO, MAX_OPTION_LENGTH + 1), "over"),
        (FLAGS + opt(Option.EXPORT_NAME, b"nope"), "no export named 'nope'"),
        (FLAGS + opt(Option.EXPORT_NAME, b"\xff"), "EXPORT_NAME"),
    ],
)
def test_broken_handshake_raises_and_closes(stream: bytes, match: str) -> None:
    server = new_server()
    with pytest.raises(NbdProtocolError, match=match):
        events(server, stream)
    assert server.state is ServerState.CLOSED
    assert events(server, b"more bytes") == []  # closed: input ignored


def test_eof_during_handshake_is_a_disconnect() -> None:
    server = new_server()
    server.receive_data(FLAGS + opt(Option.GO)[:5])
    server.receive_data(b"")
    assert events(server) == [Disconnect("eof")]
    assert server.state is ServerState.CLOSED


# -- transmission ---------------------------------------------------------------------------


def test_requests_parse_into_events() -> None:
    server = ready_server()
    got = events(
        server,
        req(Command.READ, 1, 4096, 512)
        + req(Command.WRITE, 2, 0, flags=CommandFlag.FUA, data=b"x" * 100)
        + req(Command.FLUSH, 3)
        + req(Command.TRIM, 4, 0, 4096)
        + req(Command.WRITE_ZEROES, 5, 0, 4096, CommandFlag.NO_HOLE)
        + req(Command.BLOCK_STATUS, 6, 0, 8192, CommandFlag.REQ_ONE)
        + req(Command.DISC, 7),
    )
    assert got == [
        Request(1, Command.READ, CommandFlag(0), 4096, 512),
        Request(2, Command.WRITE, CommandFlag.FUA, 0, 100, b"x" * 100),
        Request(3, Command.FLUSH, CommandFlag(0), 0, 0),
        Request(4, Command.TRIM, CommandFlag(0), 0, 4096),
        Request(5, Command.WRITE_ZEROES, CommandFlag.NO_HOLE, 0, 4096),
        Request(6, Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 0, 8192),
        Disconnect("disc"),
    ]
    assert server.state is ServerState.CLOSED


SIZE = EXPORT.size


@pytest.mark.parametrize(
    ("request_bytes", "errno"),
    [
        (req(0x55, length=1), Errno.EINVAL),  # unknown command
        (req(Command.CACHE, length=512), Errno.EINVAL),  # known, not advertised
        (req(Command.RESIZE), Errno.EINVAL),
        (req(Command.READ, length=512, flags=0x100), Errno.EINVAL),  # unknown flag
        (req(Command.READ, length=512, flags=CommandFlag.DF), Errno.EINVAL),  # not advertised
        (req(Command.READ, length=512, flags=CommandFlag.NO_HOLE), Errno.EINVAL),
        (req(Command.WRITE_ZEROES, length=512, flags=CommandFlag.FAST_ZERO), Errno.EINVAL),
        (req(Command.BLOCK_STATUS, length=512, flags=CommandFlag.NO_HOLE), Errno.EINVAL),
        (req(Command.READ, length=MAX_PAYLOAD + 1), Errno.EOVERFLOW),
        (req(Command.READ, offset=SIZE - 511, length=512), Errno.EINVAL),
        (req(Command.READ, offset=2**64 - 1, length=2), Errno.EINVAL),
        (req(Command.TRIM, offset=SIZE, length=1), Errno.EINVAL),
        (req(Command.BLOCK_STATUS, offset=SIZE, length=1), Errno.EINVAL),
        (req(Command.BLOCK_STATUS, length=0), Errno.EINVAL),
        (req(Command.WRITE, offset=SIZE - 1, data=b"ab"), Errno.ENOSPC),
        (req(Command.WRITE_ZEROES, offset=SIZE, length=4096), Errno.ENOSPC),
        (req(Command.FLUSH, offset=1), Errno.EINVAL),
        (req(Command.WRITE, data=b"ab", flags=CommandFlag.REQ_ONE), Errno.EINVAL),
    ],
)
def test_request_rejections(request_bytes: bytes, errno: Errno) -> None:
    server = ready_server()
    got = events(server, request_bytes + req(Command.FLUSH, 99))
    assert isinstance(got[0], BadRequest) and got[0].errno is errno, got
    # framing survived: the next request parses
    assert got[1] == Request(99, Command.FLUSH, CommandFlag(0), 0, 0)


def test_oversized_write_payload_is_streamed_away_not_buffered() -> None:
    server = ready_server()
    length = MAX_PAYLOAD + 4096
    got = events(server, req(Command.WRITE, 1, 0, length))
    assert isinstance(got[0], BadRequest) and got[0].errno is Errno.EOVERFLOW
    chunk = b"\xaa" * (1 << 20)
    sent = 0
    while sent < length:
        piece = chunk[: min(len(chunk), length - sent)]
        assert events(server, piece) == []
        assert server.buffered < 2 * REQUEST.size  # nothing held
        sent += len(piece)
    assert events(server, req(Command.READ, 2, 0, 8)) == [
        Request(2, Command.READ, CommandFlag(0), 0, 8)
    ]


def test_read_only_export_refuses_writes_with_eperm() -> None:
    server = ready_server(export=Export("disk", 1 << 20, read_only=True))
    for command, data in ((Command.WRITE, b"x"), (Command.TRIM, b""), (Command.WRITE_ZEROES, b"")):
        got = events(server, req(command, length=1, data=data))
        assert isinstance(got[0], BadRequest) and got[0].errno is Errno.EPERM


def test_bad_request_magic_closes() -> None:
    server = ready_server()
    with pytest.raises(NbdProtocolError, match="bad request magic 0xdeadbeef"):
        events(server, REQUEST.pack(0xDEADBEEF, 0, 0, 1, 0, 0))
    assert server.state is ServerState.CLOSED


def test_replies_need_transmission_state() -> None:
    server = new_server()
    with pytest.raises(NbdUsageError, match="no transition from await-client-flags"):
        server._transition(Request(1, Command.READ, CommandFlag(0), 0, 0))
    replies: list[Callable[[ServerConnection], object]] = [
        lambda s: s.reply_ok(1),
        lambda s: s.reply_read(1, 0, b"data"),
        lambda s: s.reply_error(1, Command.READ, Errno.EIO, "boom"),
        lambda s: s.reply_block_status(1, [(4096, 0)]),
    ]
    for reply in replies:  # every argument is valid: only the state is wrong
        with pytest.raises(NbdUsageError, match="cannot reply in state await-client-flags"):
            reply(server)
    options = new_server()
    events(options, FLAGS + opt(Option.STRUCTURED_REPLY))
    assert options.state is ServerState.OPTIONS
    for reply in replies:
        with pytest.raises(NbdUsageError, match="cannot reply in state options"):
            reply(options)
    early = new_server()
    early.receive_data(b"")
    assert isinstance(early.next_event(), Disconnect) and early.state is ServerState.CLOSED
    for reply in replies:  # closed before transmission: no request can exist
        with pytest.raises(NbdUsageError, match="cannot reply in state closed"):
            reply(early)
    for reply in replies:  # closed after it: requests still in flight are answered
        late = ready_server()
        late.receive_data(b"")
        assert isinstance(late.next_event(), Disconnect) and late.state is ServerState.CLOSED
        assert reply(late)
    for reply in replies:  # the same calls in transmission succeed
        assert reply(ready_server())


def test_simple_replies_without_structured() -> None:
    server = ready_server(structured=False)
    parts = server.reply_read(7, 0, b"data")
    assert b"".join(parts) == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 7) + b"data"
    parts = server.reply_error(7, Command.READ, Errno.EIO, "boom")
    assert b"".join(parts) == SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Errno.EIO, 7)


def test_structured_read_error_is_an_error_chunk_never_a_simple_reply() -> None:
    server = ready_server()
    raw = b"".join(server.reply_error(7, Command.READ, Errno.EINVAL, "bad"))
    magic, flags, kind, handle, _length = STRUCTURED_REPLY.unpack_from(raw)
    assert (magic, flags, kind, handle) == (
        STRUCTURED_REPLY_MAGIC,
        ReplyFlag.DONE,
        ChunkType.ERROR,
        7,
    )
    assert raw[STRUCTURED_REPLY.size :] == U32.pack(Errno.EINVAL) + U16.pack(3) + b"bad"


# -- client and server as a pair ----------------------------------------------------------------


def test_pair_handshake_and_round_trips() -> None:
    client, server = pair()
    assert client.structured and client.size == EXPORT.size
    assert client.contexts == {BASE_ALLOCATION_ID: BASE_ALLOCATION}
    sends = [
        client.request(Command.WRITE, 0, data=b"hello"),
        client.request(Command.READ, 8, 4),
        client.request(Command.BLOCK_STATUS, 0, 8192),
        client.request(Command.READ, SIZE, 4),
    ]
    for _, parts in sends:
        server.receive_data(b"".join(parts))
    got = events(server)
    assert [type(e) for e in got] == [Request, Request, Request, BadRequest]
    write, read, status, bad = got
    assert isinstance(write, Request) and isinstance(read, Request)
    assert isinstance(bad, BadRequest)
    # answer out of order
    out = (
        server.reply_block_status(status.handle, [(4096, 0), (4096, 3)])
        + server.reply_error(bad.handle, bad.command, bad.errno, bad.message)
        + server.reply_read(read.handle, read.offset, b"abcd")
        + server.reply_ok(write.handle)
    )
    client.receive_data(b"".join(out))
    done = [e for e in shuttle(client, server) if isinstance(e, Completed)]
    by_handle = {c.handle: c for c in done}
    assert by_handle[sends[0][0]].error == 0
    assert by_handle[sends[1][0]].data == b"abcd"
    assert by_handle[sends[2][0]].extents == [(4096, 0), (4096, 3)]
    assert by_handle[sends[3][0]].error == Errno.EINVAL
    assert "beyond the export size" in by_handle[sends[3][0]].message
    assert client.in_flight == 0


def test_pair_without_structured_replies() -> None:
    client, server = pair(structured=False)
    assert not client.structured and not client.contexts
    handle, parts = client.request(Command.READ, 0, 3)
    server.receive_data(b"".join(parts))
    (read,) = events(server)
    assert isinstance(read, Request)
    client.receive_data(b"".join(server.reply_read(read.handle, 0, b"xyz")))
    assert client.next_event() == Completed(handle, Command.READ, 0, data=b"xyz")


def test_a_read_with_holes_sends_them_as_hole_chunks() -> None:
    client, server = pair()
    handle, parts = client.request(Command.READ, 4096, 5 * 4096)
    server.receive_data(b"".join(parts))
    (read,) = events(server)
    assert isinstance(read, Request)
    data = bytes(4096) + b"a" * 4096 + bytes(2 * 4096) + b"b" * 4096
    raw = b"".join(server.reply_read(read.handle, 4096, data, sparse=True))
    # two hole chunks (12-byte payloads) and two data chunks: 8 KiB of data crossed, not 20
    assert len(raw) == 4 * STRUCTURED_REPLY.size + 2 * 12 + 2 * (8 + 4096)
    kinds, pos = [], 0
    while pos < len(raw):
        _magic, flags, kind, _handle, length = STRUCTURED_REPLY.unpack_from(raw, pos)
        kinds.append((ChunkType(kind), bool(flags & ReplyFlag.DONE)))
        pos += STRUCTURED_REPLY.size + length
    assert kinds == [
        (ChunkType.OFFSET_HOLE, False),
        (ChunkType.OFFSET_DATA, False),
        (ChunkType.OFFSET_HOLE, False),
        (ChunkType.OFFSET_DATA, True),
    ]
    client.receive_data(raw)
    assert client.next_event() == Completed(handle, Command.READ, 0, data=data)
    all_hole = b"".join(server.reply_read(read.handle, 0, bytes(4096), sparse=True))
    assert len(all_hole) == STRUCTURED_REPLY.size + 12  # no data chunk at all
    dense = server.reply_read(read.handle, 4096, data)  # not asked sparse: one data chunk
    assert len(b"".join(dense)) == DATA_CHUNK.size + len(data)


def _read_in_pieces(chunks: list[tuple[int, bytes]]) -> Completed:
    """A READ of 16 KiB at 0 asked in pieces, answered with OFFSET_DATA ``chunks`` (offset,
    bytes), the last one DONE."""
    client, _server = pair()
    handle, _parts = client.request(Command.READ, 0, 4 * 4096, pieces=True)
    for n, (at, data) in enumerate(chunks):
        client.receive_data(
            _chunk(handle, ChunkType.OFFSET_DATA, U64.pack(at) + data, done=n == len(chunks) - 1)
        )
    event = client.next_event()
    assert isinstance(event, Completed)
    return event


def test_a_read_in_pieces_gets_its_data_chunks_in_order_and_no_holes() -> None:
    done = _read_in_pieces([(3 * 4096, b"d" * 4096), (0, b"a" * 4096)])
    assert done.data is None and done.pieces == [(0, b"a" * 4096), (3 * 4096, b"d" * 4096)]


@pytest.mark.parametrize(
    "chunks",
    [
        [(0, b"a" * 4096), (0, b"a" * 4096)],  # the same chunk twice
        [(0, b"a" * 8192), (4096, b"b" * 4096)],  # overlapping
        [(0, b"a" * 8192), (8192, b"b" * 8192), (8192, b"c" * 4096)],  # more than the read
    ],
)
def test_a_read_in_pieces_refuses_overlapping_chunks(chunks: list[tuple[int, bytes]]) -> None:
    with pytest.raises(ProtocolError, match="overlap"):
        _read_in_pieces(chunks)


def _chunk(handle: int, kind: ChunkType, payload: bytes, *, done: bool = False) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    head = STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload))
    return head + payload


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param(  # one chunk, the whole read: taken as it is
            [(ChunkType.OFFSET_DATA, U64.pack(100) + b"abcdefghijkl")],
            b"abcdefghijkl",
            id="whole",
        ),
        pytest.param(  # the whole read, then a NONE chunk carries DONE
            [(ChunkType.OFFSET_DATA, U64.pack(100) + b"abcdefghijkl"), (ChunkType.NONE, b"")],
            b"abcdefghijkl",
            id="whole-then-none",
        ),
        pytest.param(  # data out of order around a hole
            [
                (ChunkType.OFFSET_DATA, U64.pack(108) + b"ijkl"),
                (ChunkType.OFFSET_HOLE, U64.pack(100) + U32.pack(4)),
                (ChunkType.OFFSET_DATA, U64.pack(104) + b"efgh"),
                (ChunkType.NONE, b""),
            ],
            bytes(4) + b"efghijkl",
            id="pieces",
        ),
        pytest.param(  # nothing but a hole
            [(ChunkType.OFFSET_HOLE, U64.pack(100) + U32.pack(12))], bytes(12), id="hole"
        ),
    ],
)
def test_client_assembles_a_read_from_its_chunks(
    chunks: list[tuple[ChunkType, bytes]], expected: bytes
) -> None:
    client, _server = pair()
    handle, _ = client.request(Command.READ, 100, 12)
    last = len(chunks) - 1
    stream = [_chunk(handle, kind, body, done=i == last) for i, (kind, body) in enumerate(chunks)]
    client.receive_data(b"".join(stream))
    done = client.next_event()
    assert done == Completed(handle, Command.READ, 0, data=expected)
    assert isinstance(done.data, bytes) and client.in_flight == 0


def test_client_refuses_a_data_chunk_outside_its_read() -> None:
    client, _server = pair()
    handle, _ = client.request(Command.READ, 100, 12)
    client.receive_data(_chunk(handle, ChunkType.OFFSET_DATA, U64.pack(96) + b"abcd"))
    with pytest.raises(NbdProtocolError, match="data chunk outside the request"):
        client.next_event()


def test_client_refuses_unknown_export() -> None:
    server = ServerConnection({"disk": EXPORT})
    client = ClientConnection("nope")
    with pytest.raises(NbdProtocolError, match="refused export 'nope': ERR_UNKNOWN"):
        shuttle(client, server)


def test_client_rejects_reply_for_unknown_handle() -> None:
    client, _server = pair()
    client.receive_data(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, 12345))
    with pytest.raises(NbdProtocolError, match="unknown handle 0x3039"):
        client.next_event()


def test_client_request_before_ready_is_a_usage_error() -> None:
    with pytest.raises(NbdUsageError):
        ClientConnection("disk").request(Command.READ, 0, 1)


# -- every message split at every offset ----------------------------------------------------


def _server_events_fed(chunks: list[bytes]) -> list[object]:
    server = new_server()
    seen: list[object] = []
    for chunk in chunks:
        seen.extend(events(server, chunk))
    return seen


SESSION = (
    HANDSHAKE
    + req(Command.WRITE, 1, 0, data=bytes(range(40)))
    + req(Command.READ, 2, 0, 40)
    + req(Command.BLOCK_STATUS, 3, 0, 4096)
    + req(0x42, 4)
    + req(Command.DISC, 5)
)


def test_server_session_split_at_every_offset() -> None:
    whole = _server_events_fed([SESSION])
    assert isinstance(whole[-1], Disconnect) and len(whole) == 8
    for cut in range(1, len(SESSION)):
        assert _server_events_fed([SESSION[:cut], SESSION[cut:]]) == whole, cut
    assert _server_events_fed([SESSION[i : i + 1] for i in range(len(SESSION))]) == whole


def test_client_replies_split_at_every_offset() -> None:
    client, server = pair()
    h_read, parts = client.request(Command.READ, 0, 6)
    h_stat, parts2 = client.request(Command.BLOCK_STATUS, 0, 4096)
    h_bad, parts3 = client.request(Command.WRITE, SIZE, data=b"zz")
    server.receive_data(b"".join(parts + parts2 + parts3))
    read, stat, bad = events(server)
    assert isinstance(bad, BadRequest)
    stream = b"".join(
        server.reply_read(read.handle, 0, b"sixsix")
        + server.reply_block_status(stat.handle, [(4096, 3)])
        + server.reply_error(bad.handle, bad.command, bad.errno, bad.message)
    )
    expected = None
    for cut in range(0, len(stream) + 1):
        c, _ = pair()
        for command, args in ((Command.READ, (0, 6)), (Command.BLOCK_STATUS, (0, 4096))):
            c.request(command, *args)
        c.request(Command.WRITE, SIZE, data=b"zz")
        got: list[object] = []
        for piece in (stream[:cut], stream[cut:]):
            if not piece:
                continue  # b"" would mean EOF
            c.receive_data(piece)
            while isinstance(ev := c.next_event(), Completed):
                got.append(ev)
        expected = expected or got
        assert got == expected and len(got) == 3, cut
    assert expected is not None
    assert [c.handle for c in expected] == [h_read, h_stat, h_bad]  # type: ignore[attr-defined]


def test_ready_event_from_pair() -> None:
    server = ServerConnection({"disk": EXPORT})
    client = ClientConnection("disk")
    seen = shuttle(client, server)
    ready = [e for e in seen if isinstance(e, Ready)]
    assert ready == [
        Ready(EXPORT.size, EXPORT.transmission_flags, True, {BASE_ALLOCATION_ID: BASE_ALLOCATION})
    ]


def test_client_handshake_split_at_every_offset() -> None:
    # what a server says during a full GO handshake, recorded once
    server = ServerConnection({"disk": EXPORT})
    client = ClientConnection("disk")
    said = bytearray(server.data_to_send())
    client.receive_data(bytes(said))
    while True:
        event = client.next_event()
        server.receive_data(client.data_to_send())
        events(server)
        out = server.data_to_send()
        if isinstance(event, Ready):
            break
        said += out
        client.receive_data(out)
    stream = bytes(said)
    for cut in range(1, len(stream)):
        fresh = ClientConnection("disk")
        got: list[object] = []
        for piece in (stream[:cut], stream[cut:]):
            fresh.receive_data(piece)
            while not isinstance(ev := fresh.next_event(), NeedData):
                got.append(ev)
        assert got == [event], cut
