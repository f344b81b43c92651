"""One control-socket client as the accepting thread holds it: a line read in pieces, and a
refusal written without blocking."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator

import pytest

from syncpro.control.peers import Peer
from syncpro.control.protocol import MAX_REQUEST
from syncpro.control.socket_server import Connection, Drop, Refuse

ME = Peer(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server.setblocking(False)
    with server, client:
        yield Connection(server, ME, read_timeout=10.0), client


def test_a_line_sent_in_pieces_is_whole_only_with_its_newline(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, client = pair
    assert connection.receive() is None  # nothing sent yet
    client.sendall(b"action=sta")
    assert connection.receive() is None
    client.sendall(b"tus\nmore")
    assert connection.receive() == b"action=status\n"


def test_a_client_that_leaves_mid_line_is_refused_and_one_that_sent_nothing_dropped(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, client = pair
    client.sendall(b"action=status")
    assert connection.receive() is None
    client.shutdown(socket.SHUT_WR)
    step = connection.receive()
    assert isinstance(step, Refuse) and "lacks its newline" in step.reason

    other, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with other, peer:
        other.setblocking(False)
        peer.shutdown(socket.SHUT_WR)
        assert Connection(other, ME, 10.0).receive() == Drop("closed without a request")


def test_a_line_over_the_limit_is_refused_before_its_newline_arrives(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, client = pair
    chunk = b"x" * 4096
    step = None
    for _ in range(MAX_REQUEST // len(chunk) + 2):  # one chunk past the limit, and a spare
        client.sendall(chunk)
        if (step := connection.receive()) is not None:
            break
    assert isinstance(step, Refuse) and "KiB" in step.reason


def test_a_refusal_is_written_whole_and_what_the_client_sends_after_is_thrown_away(
    pair: tuple[Connection, socket.socket],
) -> None:
    connection, client = pair
    connection.refuse("not allowed", "403")
    assert connection.deadline <= connection.started + 10.0
    assert connection.write() is True
    line = client.makefile("rb").readline()
    assert json.loads(line)["code"] == "403"
    client.sendall(b"action=status\n")
    assert connection.receive() is None  # read and dropped: nothing runs once refused
    client.close()
    assert isinstance(connection.receive(), Drop)
