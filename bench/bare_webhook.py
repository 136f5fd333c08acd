"""The baseline for webhook_latency: a Flask app with one POST route that only checks the
HMAC of the raw body and answers 202, served by kugetsu's own waitress wrapper with the same
interpreter settings as `kugetsu serve` (bot.httpserver.prepare_interpreter).

    python -m bench.bare_webhook --secret S [--port 0] [--threads 8]

Prints one JSON line {"port": N} once listening; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def create_app(secret: str):
    from flask import Flask, Response, request

    app = Flask("bare")
    key = secret.encode()

    @app.post("/webhook")
    def webhook() -> Response:
        body = request.get_data(cache=False)
        given = request.headers.get("X-Gitea-Signature", "")
        expected = hmac.new(key, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(given, expected):
            return Response(b'{"status": "rejected"}', 401, mimetype="application/json")
        return Response(b'{"status": "accepted"}', 202, mimetype="application/json")

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--secret", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    from bot.httpserver import HttpServer, prepare_interpreter

    app = create_app(args.secret)
    prepare_interpreter()  # the same process settings as kugetsu serve's receiver
    server = HttpServer(app, "127.0.0.1", args.port, threads=args.threads).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"port": server.port}), flush=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
