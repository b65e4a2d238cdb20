"""moto's S3 server with atomic conditional writes (scripts/moto-server runs it).

moto 5.2.5 checks `If-None-Match: *` and then stores the object in two steps, in
whichever of its request threads runs the PUT: two conditional creates of one key that
arrive together can both succeed — a lost update for an event store that relies on the
create being atomic (measured: 16 concurrent creates of one key, 20 rounds, one round
with two winners; `make torture` found acknowledged commits overwritten). This runs the
same application as `moto_server` with every PutObject holding one lock, so the check
and the write of one are never interleaved with another's. Everything else stays
concurrent.
"""

import argparse
import os
import signal
import sys
import threading

from werkzeug.serving import run_simple

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.s3.responses import S3Response

WRITES = threading.Lock()
_put_object = S3Response.put_object


def put_object(self):
    with WRITES:
        return _put_object(self)


S3Response.put_object = put_object


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    run_simple(
        args.host,
        args.port,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
