"""The harness shared by the tests and the `scripts/bench_*` benchmarks, as structlog ships
`testing.py`: write a config and its sources under one root (`configs`), run the real
`syncpro serve` as a subprocess and talk to it (`driver`).

It drives the daemon from outside, as an operator does, so it imports no other syncpro
module, and nothing in the daemon imports it (tests/test_layers.py checks both).
"""

from syncpro.testing.configs import (
    DAEMON_DEFAULTS,
    SHORT_DIRS,
    app,
    config_doc,
    group,
    put,
    tree,
    write_config,
    write_doc,
)
from syncpro.testing.driver import (
    Daemon,
    DaemonWaitError,
    ctl,
    free_port,
    read_line,
    running,
    trash_empty,
    wait_until,
)

__all__ = [
    "DAEMON_DEFAULTS",
    "SHORT_DIRS",
    "Daemon",
    "DaemonWaitError",
    "app",
    "config_doc",
    "ctl",
    "free_port",
    "group",
    "put",
    "read_line",
    "running",
    "trash_empty",
    "tree",
    "wait_until",
    "write_config",
    "write_doc",
]
