"""Allow `python -m syncpro`."""

from syncpro.cli import main

raise SystemExit(main())
