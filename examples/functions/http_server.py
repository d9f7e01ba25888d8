"""Stateful functions served to an Apache Flink Stateful Functions cluster over HTTP.

    python examples/functions/http_server.py --port 8000

serves ``example/greeter`` at ``http://<host>:8000/statefun`` with the standard library's HTTP
server (any framework does: docs/functions-http.md).  Point a Statefun ``module.yaml`` endpoint
at it::

    kind: io.statefun.endpoints.v2/http
    spec:
      functions: example/*
      urlPathTemplate: http://<host>:8000/statefun

The same ``functions`` also run on a zeromesh mesh: ``functions.run()`` under an executor.
"""
from __future__ import annotations

import argparse
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from executor import RequestReplyHandler, StatefulFunctions, ValueSpec
from executor.statefun_http import kafka_egress_record

functions = StatefulFunctions()


@functions.bind("example/greeter", specs=[ValueSpec("seen", int, expire_after_write=timedelta(days=1))])
def greeter(context, name: str) -> None:
    seen = (context["seen"] or 0) + 1
    context["seen"] = seen
    greeting = f"Hello {name}, welcome!" if seen == 1 else f"Hello again {name}, #{seen}"
    context.send_egress("example/greetings", kafka_egress_record("greetings", greeting, key=name))


handler = RequestReplyHandler(functions)


class Statefun(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        request = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            response = handler(request)
        except Exception as exc:   # the batch failed: the runtime retries it
            self.send_error(500, f"{type(exc).__name__}: {exc}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(response)))
        self.end_headers()
        self.wfile.write(response)

    def log_message(self, format: str, *args: object) -> None:   # quiet
        pass


def server(host: str = "0.0.0.0", port: int = 8000) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), Statefun)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    with server(args.host, args.port) as httpd:
        print(f"serving {', '.join(functions.typenames)} at http://{args.host}:{httpd.server_port}/statefun")
        httpd.serve_forever()
