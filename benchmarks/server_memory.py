"""The app's resident memory over repeated Explore calls, each from a new visitor session (a new
gradio_client), as API clients and many visitors use it: RSS after the first call and every
--every calls, and the growth from the warm-up to the end.

    python benchmarks/server_memory.py [--calls 100] [--every 10] [--sessions N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from gradio_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the app's package, beside comcat
from app.serve import AppServer  # noqa: E402

EXPLORE = ("embedded", "", None, "", ["W^QK per head", "W^VO per head"], 0, 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=None, help="the app's --sessions (default: its own)")
    args = ap.parse_args()
    with AppServer(*(["--sessions", str(args.sessions)] if args.sessions else [])) as server:
        start, t0, rows = server.rss_mb(), time.time(), []
        for i in range(1, args.calls + 1):
            Client(server.url, verbose=False).predict(*EXPLORE, api_name="/on_explore")
            if i == 1 or i % args.every == 0:
                rows.append((i, server.rss_mb()))
                print(f"after {i:4d} calls: RSS {rows[-1][1]:7.0f} MB ({time.time() - t0:.0f} s)", flush=True)
        warm = rows[min(1, len(rows) - 1)][1]
        print(
            f"server at start {start:.0f} MB; growth from call {rows[min(1, len(rows) - 1)][0]} to {i}: "
            f"{rows[-1][1] - warm:+.0f} MB over {i - rows[min(1, len(rows) - 1)][0]} calls"
        )


if __name__ == "__main__":
    main()
