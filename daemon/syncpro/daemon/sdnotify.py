"""Tell systemd about readiness, reloads, stops and liveness over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
from types import TracebackType

import structlog

log = structlog.get_logger()

# systemd reads a notification into a PIPE_BUF (4096 byte) buffer and drops or truncates a
# longer one, so a runaway status text must not cost the READY=1 sent along with it.
MAX_STATUS = 1024


class Notifier:
    """Speak the sd_notify protocol without libsystemd; a no-op when not run by systemd.

    Sending never raises: a daemon must keep working if systemd's socket goes away.
    """

    def __init__(self, address: str | None = None) -> None:
        """Given a socket address (default: $NOTIFY_SOCKET), open a datagram socket for it.

        A leading "@" names an abstract socket. Without an address, or with one of a kind
        this module cannot speak to (such as systemd's "vsock:"), every call does nothing.
        """
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self._address: str | None = None
        self._sock: socket.socket | None = None
        if address.startswith("@") and len(address) > 1:
            self._address = "\0" + address[1:]
        elif address.startswith("/"):
            self._address = address
        elif address:
            log.debug("sdnotify.unsupported_address", address=address)
        if self._address is not None:
            # Unconnected on purpose: each send looks the address up afresh, so a socket
            # that appears or is replaced after start is still reached.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, message: str | None = None, /, **fields: object) -> bool:
        """Given a raw message and/or KEY=value fields, send them as one datagram.

        Return whether the datagram was sent; False when disabled or when sending failed.
        Raise ValueError if a field name could not be sent as one.
        """
        lines = [message] if message else []
        for key, value in fields.items():
            if not key or "=" in key or "\n" in key:
                raise ValueError(f"sd_notify field name {key!r} is not a valid name")
            # A newline in a value would start a new assignment of its own.
            text = str(value).replace("\n", " ")
            lines.append(f"{key}={text}")
        sock, address = self._sock, self._address
        if sock is None or address is None or not lines:
            return False
        try:
            # Never wait for a busy systemd: a dropped ping costs less than a frozen daemon.
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, address)
        except OSError as exc:
            log.debug("sdnotify.send_failed", error=str(exc), message=lines[0])
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Say start-up (or a reload) is complete."""
        return self.notify(READY=1, **_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Say a reload began; ready() ends it."""
        # sd_notify(3) asks for the timestamp next to RELOADING=1 since systemd 253
        # (Type=notify-reload); older versions ignore it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec, **_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """Say shutdown began."""
        return self.notify(STOPPING=1, **_status(status))

    def status(self, text: str) -> bool:
        """Given a line on what the daemon is doing, show it in `systemctl status`."""
        return self.notify(**_status(text))

    def watchdog(self) -> bool:
        """Say the daemon is alive; due every watchdog_interval() seconds."""
        return self.notify(WATCHDOG=1)

    def watchdog_interval(self) -> float | None:
        """Return the seconds between watchdog pings: half of $WATCHDOG_USEC.

        Return None when there is nothing to ping: no notify socket, no or an invalid
        $WATCHDOG_USEC, or a $WATCHDOG_PID naming another process (a child that inherited it).
        """
        if not self.enabled:
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2 / 1_000_000 if usec > 0 else None

    def close(self) -> None:
        """Close the socket; later calls do nothing."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _status(text: str | None) -> dict[str, str]:
    return {} if text is None else {"STATUS": text[:MAX_STATUS]}
