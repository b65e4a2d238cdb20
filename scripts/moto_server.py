"""moto's S3 server with atomic conditional writes and, optionally, objects that
survive the process (scripts/moto-server runs it).

Atomic conditional writes. moto 5.2.5 checks `If-None-Match: *` and then stores the
object in two steps, in whichever of its request threads runs the PUT: two conditional
creates of one key that arrive together can both succeed — a lost update for an event
store that relies on the create being atomic (measured: 16 concurrent creates of one
key, 20 rounds, one round with two winners; `make torture` found acknowledged commits
overwritten). This runs the same application as `moto_server` with every PutObject
holding one lock, so the check and the write of one are never interleaved with
another's. Reads stay concurrent.

Durability (`--data-dir DIR`). moto keeps its objects in memory: killed, it forgets
them, which no real S3 server does. With a data directory every change to a bucket or
an object (create, overwrite, delete, one by one or in a batch) is mirrored to a file
before the request is answered — one file per object, written to a temporary name and
renamed over the old one, so a SIGKILL at any point leaves either the old or the new
object — and a restart loads them back. So `make torture` can kill the S3 server like
any other process. Kept: bucket names, keys and bodies (hence ETags, which are the
body's MD5), and Last-Modified (the file's modification time). Not kept: user
metadata, versions, ACLs, tags — nothing Tally or tansu's S3 storage reads back.
"""

import argparse
import datetime
import hashlib
import os
import signal
import sys
import threading

from werkzeug.serving import run_simple

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.s3.models import S3Backend, s3_backends
from moto.s3.responses import S3Response

# Every write holds it: the conditional check and the store of one PutObject are never
# interleaved with another write, and the files change in the order the memory does.
WRITES = threading.RLock()
DATA_DIR = None


def _locked(method):
    def run(*args, **kwargs):
        with WRITES:
            return method(*args, **kwargs)

    return run


S3Response.put_object = _locked(S3Response.put_object)

# Which of moto's services a request's host names, remembered per host. moto works it
# out for every request under one lock for all of them, by listing its package
# directory and stat-ing each of its ≈ 170 entries, then matching hundreds of URL
# patterns: each stat lets go of the GIL, so under concurrent requests the lock's
# holder waits for the interpreter behind the other threads and every request queues
# on it (sampled at 64 concurrent requests: three quarters of moto's request threads
# were waiting on that lock). The answer depends on the host alone.
_BACKEND_FOR_HOST = {}
_backend_for_host = DomainDispatcherApplication.get_backend_for_host


def _remembered_backend_for_host(self, host):
    try:
        return _BACKEND_FOR_HOST[host]
    except KeyError:
        backend = _BACKEND_FOR_HOST[host] = _backend_for_host(self, host)
        return backend


DomainDispatcherApplication.get_backend_for_host = _remembered_backend_for_host


def _bucket_dir(bucket: str) -> str:
    return os.path.join(DATA_DIR, bucket)


def _object_file(bucket: str, key: str) -> str:
    return os.path.join(_bucket_dir(bucket), hashlib.sha256(key.encode()).hexdigest())


def _write_atomically(path: str, data: bytes) -> None:
    temp = f"{path}.{threading.get_ident()}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
    os.replace(temp, path)


def _mirror(name, after):
    """Wrap S3Backend.name so that, once it succeeded, after(args, result) mirrors it."""
    original = getattr(S3Backend, name)

    def run(self, *args, **kwargs):
        with WRITES:
            result = original(self, *args, **kwargs)
            if DATA_DIR is not None and not getattr(self, "_restoring", False):
                after(self, args, kwargs, result)
            return result

    setattr(S3Backend, name, run)


def _arg(args, kwargs, index, name):
    return args[index] if len(args) > index else kwargs[name]


def _created_bucket(backend, args, kwargs, _result):
    os.makedirs(_bucket_dir(_arg(args, kwargs, 0, "bucket_name")), exist_ok=True)


def _deleted_bucket(backend, args, kwargs, result):
    bucket = _arg(args, kwargs, 0, "bucket_name")
    if result is not None and os.path.isdir(_bucket_dir(bucket)):
        for name in os.listdir(_bucket_dir(bucket)):
            os.remove(os.path.join(_bucket_dir(bucket), name))
        os.rmdir(_bucket_dir(bucket))


def _put(backend, args, kwargs, _result):
    bucket = _arg(args, kwargs, 0, "bucket_name")
    key = _arg(args, kwargs, 1, "key_name")
    value = _arg(args, kwargs, 2, "value")
    encoded = key.encode()
    os.makedirs(_bucket_dir(bucket), exist_ok=True)
    _write_atomically(
        _object_file(bucket, key), len(encoded).to_bytes(4, "big") + encoded + bytes(value)
    )


def _deleted(backend, args, kwargs, _result):
    bucket = _arg(args, kwargs, 0, "bucket_name")
    key = _arg(args, kwargs, 1, "key_name")
    if backend.get_bucket(bucket).keys.get(key) is None:
        try:
            os.remove(_object_file(bucket, key))
        except FileNotFoundError:
            pass


_mirror("create_bucket", _created_bucket)
_mirror("delete_bucket", _deleted_bucket)
_mirror("put_object", _put)
_mirror("delete_object", _deleted)


def restore() -> int:
    """Load what DATA_DIR holds into moto's memory; returns the number of objects."""
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend._restoring = True
    count = 0
    try:
        for bucket in sorted(os.listdir(DATA_DIR)):
            if not os.path.isdir(_bucket_dir(bucket)):
                continue
            backend.create_bucket(bucket, "us-east-1")
            for name in os.listdir(_bucket_dir(bucket)):
                path = os.path.join(_bucket_dir(bucket), name)
                if name.endswith(".tmp"):
                    os.remove(path)  # a write the last process did not finish
                    continue
                with open(path, "rb") as f:
                    data = f.read()
                size = int.from_bytes(data[:4], "big")
                key = data[4 : 4 + size].decode()
                restored = backend.put_object(bucket, key, data[4 + size :])
                # Last-Modified as the object was written (the file's time), not the
                # restart's: readers that count an object's age from it (a relay
                # taking an outbox lease over) see what they would see on S3.
                restored.last_modified = datetime.datetime.fromtimestamp(
                    os.path.getmtime(path), datetime.timezone.utc
                ).replace(tzinfo=None)
                count += 1
    finally:
        backend._restoring = False
    return count


def main() -> None:
    global DATA_DIR
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=4566)
    parser.add_argument("--data-dir", help="keep buckets and objects here, across restarts")
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.data_dir:
        DATA_DIR = os.path.abspath(args.data_dir)
        os.makedirs(DATA_DIR, exist_ok=True)
        print(f"moto: {restore()} objects loaded from {DATA_DIR}", file=sys.stderr, flush=True)

    run_simple(
        args.host,
        args.port,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
