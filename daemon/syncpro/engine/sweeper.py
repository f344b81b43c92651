"""Detached helper: wait out the grace period of replaced trees, then remove them."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from syncpro.engine.publish import next_expiry, sweep


def main(argv: list[str]) -> int:
    roots = [Path(arg) for arg in argv]
    deadline = time.time() + 24 * 3600  # never linger for ever, whatever the clock does
    while roots and time.time() < deadline:
        expiries = [e for e in (next_expiry(r) for r in roots) if e is not None]
        if not expiries:
            return 0
        time.sleep(max(0.0, min(expiries) - time.time()) + 0.05)
        for root in roots:
            sweep(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
