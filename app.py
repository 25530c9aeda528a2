"""Grader studio web app.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:password]
                  [--max-upload-mb 20] [--max-jobs 2]

Listens on 127.0.0.1 unless told otherwise. `--auth` (or the GRADER_AUTH environment variable,
"user:password") turns on a login page.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise SystemExit("--auth / GRADER_AUTH must look like user:password")
    return user, password


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=os.environ.get("GRADER_AUTH"),
                   help="user:password for the login page (default: $GRADER_AUTH, else no login)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload")
    p.add_argument("--max-jobs", type=int, default=2,
                   help="grading jobs run at once; more wait in the queue")
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost") and not args.auth:
        print(f"warning: listening on {args.host} without --auth: anyone who can reach this "
              "port can use the studio", file=sys.stderr)

    from app.common import Settings
    from app.ui import build_app
    from data.library_noise import quiet_library_noise

    quiet_library_noise()  # the app grades in this process: its terminal is the user's
    settings = Settings(max_upload_mb=args.max_upload_mb, max_jobs=args.max_jobs)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=None, max_size=256)
    demo.launch(server_name=args.host, server_port=args.port, auth=parse_auth(args.auth),
                max_file_size=settings.max_upload_bytes, show_error=True, ssr_mode=False,
                share=False)


if __name__ == "__main__":
    main()
