"""A throwaway S3-compatible server for tests: moto's server mode on loopback, in a process of its own.

    s3_or_skip()                              # skips (with the pip line) when moto is not installed
    with throwaway_s3() as s3:                # a module-scoped fixture in the test files wraps this
        s3.create_bucket("traces")
        with s3.env():                        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for this server
            ...

The server listens on 127.0.0.1 at a free port, holds its objects in memory, and is stopped on exit,
also when the test fails. The code under test reaches it the way it reaches any S3-compatible store:
through the standard AWS variables, over HTTP (no mocked client). `s3.client()` is a plain boto3 client
for the test's own setup (creating buckets, a multipart upload left open).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

MOTO_PIP_HINT = "pip install 'moto[server]' (it is in pyproject.toml's test extra)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_or_skip() -> None:
    import importlib.util

    import pytest

    for mod in ("moto", "flask", "s3fs", "boto3"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"the loopback S3 server needs {mod}; {MOTO_PIP_HINT}")


@dataclass
class S3Server:
    port: int
    host: str = "127.0.0.1"
    key_id: str = "lalp-test-key"
    secret: str = "lalp-test-secret"
    region: str = "us-east-1"

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def variables(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_REGION": self.region}

    @contextlib.contextmanager
    def env(self) -> Iterator[dict[str, str]]:
        """This process's environment pointed at the server (restored afterwards)."""
        old = {k: os.environ.get(k) for k in (*self.variables(), "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
                                              "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")}
        for k in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            os.environ.pop(k, None)
        os.environ.update(self.variables())
        os.environ["AWS_DEFAULT_REGION"] = self.region
        try:
            yield self.variables()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


@contextlib.contextmanager
def throwaway_s3() -> Iterator[S3Server]:
    log = Path(tempfile.mkstemp(prefix="lalp-moto-", suffix=".log")[1])
    proc = None
    try:
        for _ in range(3):
            srv = S3Server(port=free_port())
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", srv.host, "-p", str(srv.port)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if _wait_ready(srv, proc):
                break
            proc.kill()
            proc.wait(timeout=30)
            proc = None  # lost the port race, or a slow start: try another port
        if proc is None:
            raise RuntimeError(f"moto's S3 server did not start:\n{log.read_text(errors='replace')[-2000:]}")
        yield srv
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        log.unlink(missing_ok=True)


def _wait_ready(srv: S3Server, proc: subprocess.Popen, timeout_s: float = 60) -> bool:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            # moto's own health page (not an S3 call): answers once the server serves
            with urllib.request.urlopen(f"{srv.endpoint}/moto-api/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # it answered
        except OSError:
            time.sleep(0.2)
    return False
