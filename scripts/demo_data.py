"""Create the demo apps' sources under var/ (for the shipped config.yml) if they are absent."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

DEMO: dict[str, str] = {
    # downloaded from the running servers (update=0)
    "remotecomdir/softdir/server1/bin/server.sh": "#!/bin/sh\nexec java -jar lib/server.jar\n",
    "remotecomdir/softdir/server1/lib/server.jar": "server 1.4.2\n",
    "remotecomdir/softdir/server2/bin/server.sh": "#!/bin/sh\nexec java -jar lib/server.jar\n",
    "remotecomdir/softdir/server2/lib/server.jar": "server 1.4.2\n",
    "remotecomdir/configuredir/server1/server.properties": "port=8080\nnode=1\n",
    "remotecomdir/configuredir/server2/server.properties": "port=8080\nnode=2\n",
    "remotecomdir/softdir/web1/app/index.html": "<h1>web 2.0.1</h1>\n",
    "remotecomdir/configuredir/web1/config.properties": "env=prod\n",
    "remotecomdir/configuredir/web1/conf/app.yml": "workers: 4\n",
    "remotecomdir/configuredir/web1/conf/local-notes.txt": "not listed: never published\n",
    # new builds (update=1)
    "updatedir/softdir/server/bin/server.sh": "#!/bin/sh\nexec java -jar lib/server.jar\n",
    "updatedir/softdir/server/lib/server.jar": "server 1.5.0\n",
    "updatedir/configuredir/server/server1/server.properties": "port=8080\nnode=1\n",
    "updatedir/configuredir/server/server2/server.properties": "port=8080\nnode=2\n",
    "updatedir/softdir/web/app/index.html": "<h1>web 2.1.0</h1>\n",
    "updatedir/configuredir/web/web1/config.properties": "env=prod\n",
    "updatedir/configuredir/web/web1/conf/app.yml": "workers: 8\n",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--var", type=Path, default=ROOT / "var", help="where var/ lives")
    args = parser.parse_args()
    created = 0
    for rel, content in DEMO.items():
        path = args.var / rel
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        if path.suffix == ".sh":
            path.chmod(0o755)
        created += 1
    for name in ("softdir", "configuredir", "state", "run"):
        (args.var / name).mkdir(parents=True, exist_ok=True)
    print(f"demo sources under {args.var}: {created} files created", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
