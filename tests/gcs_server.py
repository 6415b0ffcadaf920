"""A local Google Cloud Storage server for the tests: gcp-storage-emulator on a free port.

The fixture starts it in memory with one bucket and points gcsfs at it
(``STORAGE_EMULATOR_HOST``) while the module runs; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSServer:
    def __init__(self, bucket: str = "ssl-shards") -> None:
        from gcp_storage_emulator.server import create_server

        self.bucket = bucket
        self.port = _free_port()
        self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=bucket)
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str) -> str:
        return f"gs://{self.bucket}/{prefix}"

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture(scope="module", name="gcs_server")
def gcs_server_fixture():
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    server = GCSServer()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    # without Google credentials gcsfs logs a warning per call while it probes the bucket type
    quiet = logging.getLogger("gcsfs")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield server
    finally:
        quiet.setLevel(level)
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        server.stop()
