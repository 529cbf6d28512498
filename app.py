"""Start the comcat app: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--data-root DIR]
[--visitor-quota-mb MB] [--disk-quota-mb MB] [--idle-minutes M] [--sessions N]."""

import argparse
import os
import signal
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ap.add_argument(
        "--data-root",
        default=None,
        metavar="DIR",
        help="let visitors compress on image folders inside DIR (default: uploads only)",
    )
    ap.add_argument("--visitor-quota-mb", type=int, default=2048, help="disk space one visitor's files may take")
    ap.add_argument("--disk-quota-mb", type=int, default=8192, help="disk space all visitors' files may take")
    ap.add_argument(
        "--idle-minutes", type=int, default=60, help="a visitor's files go after this long without a request"
    )
    ap.add_argument(
        "--sessions",
        type=int,
        default=200,
        help="visitor sessions whose page state the server keeps in memory (the least recently used go first)",
    )
    args = ap.parse_args()
    if min(args.visitor_quota_mb, args.disk_quota_mb, args.idle_minutes, args.sessions) < 1:
        ap.error("the quotas, --idle-minutes and --sessions must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the temp folder goes at exit (atexit)
    from app import common
    from app.common import MAX_UPLOAD_MB, WORK

    common.VISITOR_QUOTA_MB, common.DISK_QUOTA_MB = args.visitor_quota_mb, args.disk_quota_mb
    common.SESSION_TTL_S = args.idle_minutes * 60

    os.environ.setdefault("GRADIO_TEMP_DIR", str(WORK / "gradio"))  # gradio's upload cache goes at exit too
    from app.ui import build_demo

    demo = build_demo(data_root=args.data_root).queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        max_file_size=f"{MAX_UPLOAD_MB}mb",
        state_session_capacity=args.sessions,  # memory bounded however many visitors (and API clients) come
        quiet=True,
        prevent_thread_lock=True,
    )  # quiet: gradio's hint names share=True, ours --share
    print(
        f"comcat app on {demo.local_url}"
        + (f" and {demo.share_url}" if demo.share_url else " (python app.py --share for a public link)"),
        flush=True,
    )
    demo.block_thread()


if __name__ == "__main__":
    main()
