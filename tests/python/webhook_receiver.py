"""A webhook receiver for tests/webhooks.rs that checks signatures with the `standardwebhooks`
package (an implementation independent of botgate's).

Prints `PORT <n>` once it listens on 127.0.0.1. Control (JSON POST to /_control, any subset):
  secret          the endpoint's secret (whsec_...), or null: verify nothing
  statuses        statuses to answer next, in order (then `default_status`)
  default_status  the status once `statuses` is used up (default 200)
  now             the current time for the timestamp tolerance, in epoch seconds (the server
                  runs on the test's manual clock); null: the wall clock
GET /_received answers every delivery seen, oldest first:
  {id, timestamp, signature, verified, error, status, body}.
"""

import datetime as _dt
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks.webhooks as swh

LOCK = threading.Lock()
STATE = {"secret": None, "statuses": [], "default_status": 200, "now": None}
RECEIVED = []


class _Clock(_dt.datetime):
    """The package reads `datetime.now` for its five-minute tolerance; the test moves it."""

    @classmethod
    def now(cls, tz=None):
        with LOCK:
            now = STATE["now"]
        if now is None:
            return _dt.datetime.now(tz)
        return _dt.datetime.fromtimestamp(now, tz)


swh.datetime = _Clock


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, status, value):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_received":
            with LOCK:
                self._json(200, list(RECEIVED))
        else:
            self._json(404, {})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path == "/_control":
            with LOCK:
                STATE.update(json.loads(body))
            self._json(200, {})
            return
        with LOCK:
            secret = STATE["secret"]
            status = STATE["statuses"].pop(0) if STATE["statuses"] else STATE["default_status"]
        verified, error = False, None
        if secret is not None:
            try:
                swh.Webhook(secret).verify(body, dict(self.headers.items()))
                verified = True
            except Exception as e:  # the package's verification error, or a malformed header
                error = f"{type(e).__name__}: {e}"
        with LOCK:
            RECEIVED.append(
                {
                    "id": self.headers.get("webhook-id"),
                    "timestamp": self.headers.get("webhook-timestamp"),
                    "signature": self.headers.get("webhook-signature"),
                    "verified": verified,
                    "error": error,
                    "status": status,
                    "body": json.loads(body) if body else None,
                }
            )
        self._json(status, {})


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
