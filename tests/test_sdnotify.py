"""sd_notify over a real datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from syncpro.daemon.sdnotify import MAX_STATUS, Notifier


@dataclass
class Systemd:
    """The receiving end of $NOTIFY_SOCKET, as systemd would hold it."""

    sock: socket.socket
    address: str  # as written into $NOTIFY_SOCKET
    path: str | None  # the file to unlink, for a filesystem socket

    def receive(self, timeout: float = 5.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def nothing_waiting(self) -> bool:
        self.sock.settimeout(0)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        return False


@pytest.fixture(params=["path", "abstract"])
def systemd(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Systemd]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        # A short directory: AF_UNIX paths stop at 107 bytes, test names as sentences don't.
        address = str(tmp_path_factory.mktemp("sd") / "notify")
        path: str | None = address
        sock.bind(address)
    else:
        path = None
        name = f"syncpro-test-{os.getpid()}-{os.urandom(6).hex()}"
        address = "@" + name
        sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with sock:
        yield Systemd(sock, address, path)


@pytest.fixture
def notifier(systemd: Systemd) -> Iterator[Notifier]:
    with Notifier() as notifier:
        yield notifier


def test_ready_arrives_with_its_status(systemd: Systemd, notifier: Notifier) -> None:
    assert notifier.enabled
    assert notifier.ready(status="watching 3 apps")
    assert systemd.receive() == {"READY": "1", "STATUS": "watching 3 apps"}
    assert notifier.ready()
    assert systemd.receive() == {"READY": "1"}


def test_status_watchdog_and_stopping_each_arrive(systemd: Systemd, notifier: Notifier) -> None:
    assert notifier.status("syncing server1")
    assert systemd.receive() == {"STATUS": "syncing server1"}
    assert notifier.watchdog()
    assert systemd.receive() == {"WATCHDOG": "1"}
    assert notifier.stopping(status="finishing 1 sync")
    assert systemd.receive() == {"STOPPING": "1", "STATUS": "finishing 1 sync"}


def test_reloading_carries_the_monotonic_clock_in_microseconds(
    systemd: Systemd, notifier: Notifier
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    fields = systemd.receive()
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert fields["RELOADING"] == "1"
    assert before <= int(fields["MONOTONIC_USEC"]) <= after


def test_a_raw_message_and_fields_go_out_as_one_datagram(
    systemd: Systemd, notifier: Notifier
) -> None:
    assert notifier.notify("READY=1\nSTATUS=raw", MAINPID=os.getpid())
    assert systemd.receive() == {"READY": "1", "STATUS": "raw", "MAINPID": str(os.getpid())}
    assert systemd.nothing_waiting()


def test_a_newline_in_a_status_cannot_smuggle_in_another_assignment(
    systemd: Systemd, notifier: Notifier
) -> None:
    assert notifier.status("bad upload\nREADY=1")
    assert systemd.receive() == {"STATUS": "bad upload READY=1"}


def test_a_long_status_is_cut_to_fit_systemds_buffer(systemd: Systemd, notifier: Notifier) -> None:
    assert notifier.ready(status="x" * 100_000)
    assert systemd.receive() == {"READY": "1", "STATUS": "x" * MAX_STATUS}


def test_an_invalid_field_name_is_a_programming_error(notifier: Notifier) -> None:
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(**{"A=B": 1})


def test_without_notify_socket_nothing_is_opened_or_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    with Notifier() as notifier:
        assert not notifier.enabled
        assert not notifier.ready(status="x")
        assert not notifier.reloading()
        assert not notifier.watchdog()
        assert not notifier.stopping()
        assert notifier.watchdog_interval() is None


def test_an_address_of_an_unknown_kind_disables_the_notifier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:4711")
    with Notifier() as notifier:
        assert not notifier.enabled
        assert not notifier.ready()


def test_watchdog_interval_is_half_of_watchdog_usec(
    notifier: Notifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert notifier.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_USEC", "500000")
    assert notifier.watchdog_interval() == 0.25


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_watchdog_interval_ignores_a_useless_watchdog_usec(
    notifier: Notifier, monkeypatch: pytest.MonkeyPatch, usec: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    assert notifier.watchdog_interval() is None


def test_watchdog_interval_honours_watchdog_pid(
    notifier: Notifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notifier.watchdog_interval() == 15.0
    # The watchdog belongs to another process: this one inherited the variables.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert notifier.watchdog_interval() is None


def test_a_vanished_socket_does_not_raise(systemd: Systemd, notifier: Notifier) -> None:
    systemd.sock.close()
    if systemd.path is not None:
        os.unlink(systemd.path)
    with capture_logs() as logs:
        assert not notifier.ready(status="x")
        assert not notifier.watchdog()
    assert [(e["event"], e["log_level"]) for e in logs] == [("sdnotify.send_failed", "debug")] * 2


def test_a_socket_that_appears_after_start_is_reached(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path_factory.mktemp("sd") / "late")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with Notifier() as notifier:
        assert not notifier.ready()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            assert notifier.ready()
            sock.settimeout(5.0)
            assert sock.recv(4096) == b"READY=1"


def test_a_systemd_that_does_not_read_never_blocks_the_daemon(
    systemd: Systemd, notifier: Notifier
) -> None:
    systemd.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    results: queue.Queue[int] = queue.Queue()

    def ping_until_refused() -> None:
        for sent in range(100_000):
            if not notifier.watchdog():
                results.put(sent)
                return
        results.put(-1)

    # A daemon thread, so a send that blocks fails this test instead of hanging the run.
    threading.Thread(target=ping_until_refused, daemon=True).start()
    assert results.get(timeout=10) > 0


def test_closing_twice_is_fine_and_silences_the_notifier(systemd: Systemd) -> None:
    notifier = Notifier()
    notifier.close()
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready()
    assert systemd.nothing_waiting()
