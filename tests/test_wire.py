"""The data channel's wire protocol, sans-IO: frames, the decoder's checks, the handshake."""

from __future__ import annotations

import struct
from typing import Any
from zlib import crc32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typing_extensions import Buffer

from orchestrator.errors import PeerAuthError, PeerProtocolError
from orchestrator.transport import wire
from orchestrator.transport.wire import FrameDecoder, FrameEncoder, Kind, Role

DEVICES = ["gpu0", "gpu1", "nic0"]


def flat(buffers: list[Buffer]) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in buffers)


def summary(events: list[wire.Event]) -> list[tuple[Any, ...]]:
    """Events as plain tuples, payload pieces joined (boundaries are not part of the stream)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if isinstance(e, wire.Data):
            out.append(("data", e.device, e.seq, b"".join(e.pieces)))
        elif isinstance(e, wire.End):
            out.append(("end", e.device, e.seq, e.total_bytes))
        elif isinstance(e, wire.Ack):
            out.append(("ack", e.device, e.seq, e.loaded_bytes))
        elif isinstance(e, wire.Control):
            out.append(("control", e.seq, e.message))
        else:
            out.append(("abort", e.reason))
    return out


def valid_stream(payloads: list[tuple[int, bytes]]) -> tuple[list[bytes], list[tuple[Any, ...]]]:
    """Frames (one bytes each) for a destination with one data connection, and their events."""
    enc = FrameEncoder()
    frames: list[bytes] = []
    expected: list[tuple[Any, ...]] = []
    seqs: dict[int, int] = {}
    totals: dict[int, int] = {}
    for device, payload in payloads:
        frames.append(flat(enc.data(device, payload)))
        seq = seqs.get(device, 0)
        seqs[device] = seq + 1
        totals[device] = totals.get(device, 0) + len(payload)
        expected.append(("data", device, seq, payload))
    for device in sorted(totals):
        frames.append(flat(enc.end(device, totals[device])))
        expected.append(("end", device, seqs[device], totals[device]))
    return frames, expected


payloads_strategy = st.lists(
    st.tuples(st.integers(0, len(DEVICES) - 1), st.binary(min_size=1, max_size=300)),
    min_size=1,
    max_size=8,
)


def test_round_trip_of_every_kind() -> None:
    enc = FrameEncoder()
    stream = flat(enc.data(1, b"abc")) + flat(enc.data(1, b"def")) + flat(enc.end(1, 6))
    stream += flat(enc.abort("operator said stop"))
    events = FrameDecoder(Role.DESTINATION, DEVICES).feed(stream)
    assert summary(events) == [
        ("data", 1, 0, b"abc"),
        ("data", 1, 1, b"def"),
        ("end", 1, 2, 6),
        ("abort", "operator said stop"),
    ]
    acks = flat(enc.ack(2, 4096))
    assert summary(FrameDecoder(Role.SOURCE, DEVICES).feed(acks)) == [("ack", 2, 0, 4096)]
    # One data connection: the control connection is number 1.
    control = flat(enc.control({"commit": True})) + flat(enc.abort("too late"))
    for role in Role:
        events = FrameDecoder(role, DEVICES, connection=1, connections=1).feed(control)
        assert summary(events) == [("control", 0, {"commit": True}), ("abort", "too late")]


def test_frame_layout_is_header_payload_trailer() -> None:
    header, payload, trailer = FrameEncoder().data(2, b"xyz")
    assert memoryview(header).nbytes == wire.HEADER_SIZE == 16
    kind, flags, slot, seq, length, header_crc = struct.unpack("!BBHIII", bytes(header))
    assert (kind, flags, slot, seq, length) == (Kind.DATA, 0, 2, 0, 3)
    assert header_crc == crc32(bytes(header)[:12])
    assert bytes(trailer) == struct.pack("!I", crc32(b"xyz", crc32(bytes(header))))
    assert bytes(memoryview(payload)) == b"xyz"


@settings(max_examples=150, deadline=None)
@given(payloads=payloads_strategy, data=st.data())
def test_any_split_of_a_valid_stream_decodes_the_same(
    payloads: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    frames, expected = valid_stream(payloads)
    stream = b"".join(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = FrameDecoder(Role.DESTINATION, DEVICES)
    events: list[wire.Event] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        events += decoder.feed(stream[last:cut])
        last = cut
    assert summary(events) == expected
    assert decoder.reader.at_frame_boundary


@settings(max_examples=200, deadline=None)
@given(payloads=payloads_strategy, data=st.data())
def test_any_single_byte_corruption_is_detected_and_nothing_after_it_delivered(
    payloads: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    frames, expected = valid_stream(payloads)
    stream = bytearray(b"".join(frames))
    offset = data.draw(st.integers(0, len(stream) - 1))
    stream[offset] ^= data.draw(st.integers(1, 255))
    # The frame the corrupted byte belongs to: nothing from it on may come out.
    bad_frame, start = 0, 0
    while start + len(frames[bad_frame]) <= offset:
        start += len(frames[bad_frame])
        bad_frame += 1
    decoder = FrameDecoder(Role.DESTINATION, DEVICES)
    events: list[wire.Event] = []
    with pytest.raises(PeerProtocolError):
        feed_bytewise(decoder, bytes(stream), events)
    assert summary(events) == expected[:bad_frame]
    # A failed decoder stays failed.
    with pytest.raises(PeerProtocolError):
        decoder.feed(b"")


def feed_bytewise(decoder: FrameDecoder, stream: bytes, events: list[wire.Event]) -> None:
    for i in range(len(stream)):
        events += decoder.feed(stream[i : i + 1])


def decode_error(
    stream: bytes, role: Role = Role.DESTINATION, connection: int = 0, connections: int = 1
) -> PeerProtocolError:
    decoder = FrameDecoder(role, DEVICES, connection, connections)
    with pytest.raises(PeerProtocolError) as info:
        decoder.feed(stream)
    return info.value


def test_a_sequence_gap_is_refused_naming_device_and_frame() -> None:
    enc = FrameEncoder()
    first = flat(enc.data(0, b"a"))
    enc.data(0, b"lost")  # numbered, never sent
    error = decode_error(first + flat(enc.data(0, b"c")))
    assert (error.device, error.seq) == ("gpu0", 2)
    assert "out of order" in str(error) and "expected sequence 1" in str(error)
    assert "device 'gpu0' frame 2" in str(error)


def test_a_duplicated_frame_is_refused() -> None:
    frame = flat(FrameEncoder().data(1, b"twice"))
    error = decode_error(frame + frame)
    assert (error.device, error.seq) == ("gpu1", 0)
    assert "duplicate" in str(error)


def test_an_unknown_device_is_refused() -> None:
    error = decode_error(flat(FrameEncoder().data(7, b"who")))
    assert error.seq == 0 and "unknown device index 7" in str(error)


def test_a_device_on_the_wrong_connection_is_refused() -> None:
    # Three devices over two connections: gpu1 (index 1) belongs on connection 1.
    error = decode_error(flat(FrameEncoder().data(1, b"x")), connection=0, connections=2)
    assert error.device == "gpu1" and "wrong connection" in str(error)


def test_frames_after_end_are_refused() -> None:
    enc = FrameEncoder()
    stream = flat(enc.data(0, b"ab")) + flat(enc.end(0, 2)) + flat(enc.data(0, b"late"))
    error = decode_error(stream)
    assert (error.device, error.seq) == ("gpu0", 2) and "after the device's END" in str(error)


def test_an_end_that_miscounts_the_bytes_is_refused() -> None:
    enc = FrameEncoder()
    error = decode_error(flat(enc.data(0, b"abc")) + flat(enc.end(0, 4)))
    assert "END says 4 bytes were sent, 3 arrived" in str(error)


def test_an_oversized_frame_is_refused_before_its_payload_is_read() -> None:
    body = struct.pack("!BBHII", Kind.DATA, 0, 0, 0, wire.MAX_DATA_PAYLOAD + 1)
    header = body + struct.pack("!I", crc32(body))
    error = decode_error(header)  # no payload at all: refused on the header alone
    assert "oversized" in str(error)
    with pytest.raises(ValueError, match="weighs"):
        FrameEncoder().header(Kind.DATA, 0, wire.MAX_DATA_PAYLOAD + 1)


def test_a_corrupted_header_is_refused_before_its_length_is_believed() -> None:
    header = bytearray(flat(FrameEncoder().data(0, b"abc")))
    header[11] ^= 0x40  # a length bit: the reader would wait for 16 MiB
    assert "header checksum mismatch" in str(decode_error(bytes(header[:16])))


def test_kinds_each_end_must_not_receive_are_refused() -> None:
    enc = FrameEncoder()
    assert "not accepted by the source" in str(
        decode_error(flat(enc.data(0, b"x")), role=Role.SOURCE)
    )
    assert "not accepted by the destination" in str(decode_error(flat(enc.ack(0, 1))))


def test_control_frames_travel_on_the_control_connection_only() -> None:
    enc = FrameEncoder()
    for connection in (0, 1):
        error = decode_error(flat(enc.control({"a": 1})), connection=connection, connections=2)
        assert "CONTROL frame on a data connection" in str(error)
    # Connection 2 of 2 data connections is the control connection: no device's frames.
    error = decode_error(flat(enc.data(0, b"x")), connection=2, connections=2)
    assert error.device == "gpu0" and "wrong connection" in str(error)
    error = decode_error(flat(enc.ack(0, 1)), role=Role.SOURCE, connection=2, connections=2)
    assert error.device == "gpu0" and "wrong connection" in str(error)
    with pytest.raises(ValueError, match="of 2 data connections"):
        FrameDecoder(Role.DESTINATION, DEVICES, connection=3, connections=2)


def test_a_decoder_can_use_a_validator_of_its_own() -> None:
    validator = wire.InboundValidator(Role.SOURCE, DEVICES, connection=1, connections=1)
    decoder = FrameDecoder(Role.DESTINATION, [], validator=validator)
    assert decoder.validator is validator and validator.control
    enc = FrameEncoder()
    assert summary(decoder.feed(flat(enc.control({"n": 1})))) == [("control", 0, {"n": 1})]


def test_events_come_out_one_by_one_up_to_a_bad_frame() -> None:
    enc = FrameEncoder()
    good = flat(enc.control({"n": 1}))
    bad = bytearray(flat(enc.control({"n": 2})))
    bad[-1] ^= 1
    decoder = FrameDecoder(Role.DESTINATION, DEVICES, connection=1, connections=1)
    events = decoder.events(good + bytes(bad))
    assert summary([next(events)]) == [("control", 0, {"n": 1})]
    with pytest.raises(PeerProtocolError, match="checksum"):
        next(events)


def test_a_control_payload_must_be_a_json_object() -> None:
    frame = flat(FrameEncoder().frame(Kind.CONTROL, 0xFFFF, b"[1]"))
    assert "not a JSON object" in str(decode_error(frame, connection=1, connections=1))


def test_reader_wants_payload_through_add_payload() -> None:
    reader = wire.FrameReader()
    header = bytes(memoryview(FrameEncoder().data(0, b"0123456789")[0]))
    reader.buffer()[:16] = header
    reader.advance(16)
    assert reader.next_frame() is None and reader.payload_remaining == 10
    with pytest.raises(RuntimeError):
        reader.buffer()
    with pytest.raises(ValueError, match="wanted"):
        reader.add_payload(b"x" * 11)


# -- handshake --------------------------------------------------------------------

SECRET = b"s" * 32
SERVER_NONCE = b"n" * 32
CLIENT_NONCE = b"c" * 32


def hello(
    secret: bytes = SECRET, migration_id: str = "mig-1", connection: int = 0, connections: int = 2
) -> wire.Hello:
    raw = wire.client_hello(
        secret, SERVER_NONCE, migration_id, connection, connections, CLIENT_NONCE
    )
    prefix = raw[: wire.HELLO_PREFIX_SIZE]
    return wire.parse_hello(prefix, raw[wire.HELLO_PREFIX_SIZE :])


def test_the_handshake_proves_both_sides() -> None:
    h = hello()
    assert (h.migration_id, h.connection, h.connections) == ("mig-1", 0, 2)
    assert not h.control and hello(connection=2).control
    assert wire.verify_hello(SECRET, SERVER_NONCE, h)
    welcome = wire.make_welcome(SECRET, SERVER_NONCE, h)
    wire.verify_welcome(SECRET, SERVER_NONCE, h, welcome)
    assert wire.parse_challenge(wire.make_challenge(SERVER_NONCE)) == SERVER_NONCE


def test_a_hello_proves_nothing_under_another_secret_nonce_or_identity() -> None:
    assert not wire.verify_hello(b"t" * 32, SERVER_NONCE, hello())
    assert not wire.verify_hello(SECRET, b"m" * 32, hello())  # a replay to a new challenge
    forged = wire.Hello("mig-2", 0, 2, CLIENT_NONCE, hello().proof)  # proof for another id
    assert not wire.verify_hello(SECRET, SERVER_NONCE, forged)
    moved = wire.Hello("mig-1", 1, 2, CLIENT_NONCE, hello().proof)  # for another connection
    assert not wire.verify_hello(SECRET, SERVER_NONCE, moved)


def test_a_client_proof_reflected_back_is_not_a_server_proof() -> None:
    h = hello()
    reflected = b"PTMIG/W3" + h.proof
    with pytest.raises(PeerAuthError):
        wire.verify_welcome(SECRET, SERVER_NONCE, h, reflected)
    with pytest.raises(PeerAuthError):
        wire.verify_welcome(b"t" * 32, SERVER_NONCE, h, wire.make_welcome(SECRET, SERVER_NONCE, h))


def test_garbage_is_not_a_handshake() -> None:
    with pytest.raises(PeerAuthError):
        wire.parse_challenge(b"x" * wire.CHALLENGE_SIZE)
    with pytest.raises(PeerAuthError):
        wire.parse_hello_prefix(b"GET / HTTP/1.1\r\n".ljust(wire.HELLO_PREFIX_SIZE, b"x"))
    with pytest.raises(ValueError, match="at least 16"):
        hello(secret=b"short")
