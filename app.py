"""Start the comcat app: python app.py [--host 127.0.0.1] [--port 7860] [--share] [--data-root DIR]."""
import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    ap.add_argument("--data-root", default=None, metavar="DIR",
                    help="let visitors compress on image folders inside DIR (default: uploads only)")
    args = ap.parse_args()
    from app.ui import build_demo

    build_demo(data_root=args.data_root).queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port,
                                                           share=args.share)


if __name__ == "__main__":
    main()
