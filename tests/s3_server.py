"""A local S3 server for the tests: moto's server mode on a free port, with a request log.

``S3Server`` starts the server in a thread, creates a bucket and points the standard AWS
environment (dummy credentials, ``AWS_ENDPOINT_URL``) at it. ``requests`` is every request the
server answered, as ``(method, path, status)``: what the tests count downloads with.
"""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest

_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d+)')


class _RequestLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        m = _LINE.search(record.getMessage())
        if m:
            with self._lock:
                self.lines.append((m["method"], m["path"], int(m["status"])))


class S3Server:
    """moto's S3 in server mode at ``endpoint``, with the bucket ``bucket``."""

    def __init__(self, bucket: str = "ssl-shards") -> None:
        from moto.server import ThreadedMotoServer

        self.bucket = bucket
        self._log = _RequestLog()
        logger = logging.getLogger("werkzeug")
        logger.addHandler(self._log)  # before werkzeug adds its own stderr handler
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        return list(self._log.lines)

    def gets(self, key: str) -> int:
        """GET requests of the object ``key`` of the bucket answered with its bytes."""
        path = f"/{self.bucket}/{key}"
        return sum(
            1 for m, p, s in self.requests if m == "GET" and p.split("?")[0] == path and s < 300
        )

    def stop(self) -> None:
        self._server.stop()
        logging.getLogger("werkzeug").removeHandler(self._log)


@pytest.fixture(scope="module", name="s3_server")
def s3_server_fixture():
    """One server per test module; the AWS environment points at it while the module runs."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
