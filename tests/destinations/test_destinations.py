"""kcore dump -o URL / tcp: to real servers the tests start (nginx's WebDAV, Azurite, SeaweedFS's
S3 gateway, TCP peers): the remote object is the bytes `kcore dump -o -` gives, its manifest
holds each part's SHA-256, and faults (a killed server, a 403, a full disk, a stalled
receiver) end in one line, exit 1, and no object."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.destinations.servers import (
    Azurite,
    Nginx,
    SeaweedS3,
    free_ports,
    measured,
    measured_cmd,
    running,
)
from tests.helpers import (
    FIXTURE_NAMES,
    REPO,
    fixture_memory,
    run_kcore,
    scratch_dir,
    shared_fixture,
)

NOKASLR = FIXTURE_NAMES[0]
MiB = 1 << 20


def system_args() -> list[str]:
    """--root and --source of the no-KASLR capture (its raw RAM)."""
    return ["--root", str(shared_fixture(NOKASLR) / "root"),
            "--source", f"raw:{fixture_memory(NOKASLR)}"]


def dump(dest: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """kcore dump of the capture to dest."""
    return run_kcore("dump", *system_args(), "-o", dest, "-q", *args, **kw)


def dump_measured(dest: str, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    """kcore dump of the capture to dest; with the bytes the process wrote to storage and
    its peak RSS (servers.measured)."""
    r = subprocess.run(measured_cmd("dump", *system_args(), "-q", "-o", dest, *args),
                       env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1"),
                       capture_output=True)
    return r, measured(r.stderr)


def start_dump(dest: str, *args: str) -> subprocess.Popen:
    """kcore dump of the capture to dest, running (stderr piped)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "kcore", "dump", *system_args(), "-q",
                             "-o", dest, *args], env=env, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def streams(request: pytest.FixtureRequest) -> dict[str, bytes]:
    """What `kcore dump -o -` writes for each streamed case (the bytes a remote object must
    hold): elf and lime whole, kdump and avml at -d 31."""
    out = {}
    for key, args in {"elf": ["--format", "elf"], "lime": ["--format", "lime"],
                      "kdump31": ["--format", "kdump", "-d", "31"],
                      "avml31": ["--format", "avml", "-d", "31"]}.items():
        r = dump("-", *args)
        assert r.returncode == 0, r.stderr.decode()
        out[key] = r.stdout
    return out


def kdump_timeless(stream: bytes) -> bytes:
    """A flattened kdump stream with its dump time zeroed (two runs differ only there):
    disk_dump_header.timestamp, 408 bytes into the first record (file offset 0), which
    follows the 4096-byte flat header and its 16-byte record header."""
    assert stream.startswith(b"makedumpfile") and stream[4096:4104] == bytes(8)
    at = 4096 + 16 + 408
    return stream[:at] + bytes(16) + stream[at + 16:]


def one_line_error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single error line of a failed run (no traceback)."""
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("kcore: error:")]
    assert len(lines) == 1, err
    return lines[0]


def check_manifest(manifest: dict, data: bytes, whole: bool = True) -> None:
    """The manifest's digests are those of data: whole (or none), and part by part."""
    assert manifest["sha256"] == (hashlib.sha256(data).hexdigest() if whole else None)
    size = manifest["parts"]["size"]
    want = [hashlib.sha256(data[i:i + size]).hexdigest() for i in range(0, len(data), size)]
    assert manifest["parts"]["sha256"] == want
    assert manifest["size"] == len(data)


# TCP


def receive_all(sock: socket.socket, into: bytearray) -> None:
    """Read sock to its end into into, then close it."""
    with sock:
        while chunk := sock.recv(1 << 20):
            into.extend(chunk)


def test_tcp_listen_serves_one_client(streams: dict[str, bytes]) -> None:
    """tcp-listen: waits for a receiver (nc HOST PORT > mem.lime) and sends it the lime."""
    port = free_ports(1)[0]
    got = bytearray()

    def receive() -> None:
        for _ in range(600):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        receive_all(s, got)

    t = threading.Thread(target=receive)
    t.start()
    r = dump(f"tcp-listen:127.0.0.1:{port}", "--format", "lime", "--json")
    t.join(60)
    assert r.returncode == 0, r.stderr.decode()
    assert bytes(got) == streams["lime"]
    assert json.loads(r.stdout)["sha256"] == hashlib.sha256(got).hexdigest()


def test_tcp_connect_and_stalled_receiver_bound_memory(streams: dict[str, bytes]) -> None:
    """tcp:// connects to a receiver that stalls 3 s before reading (a slow server): kcore
    waits, its peak RSS stays far below the 158 MiB it sends, and every byte arrives."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        time.sleep(3)
        receive_all(conn, got)

    t = threading.Thread(target=serve)
    t.start()
    r, stats = dump_measured(f"tcp://127.0.0.1:{port}", "--format", "lime")
    t.join(60)
    server.close()
    assert r.returncode == 0, r.stderr.decode()
    assert bytes(got) == streams["lime"]
    assert stats["VmHWM"] < 120 * MiB, stats


def test_tcp_interrupted_while_the_receiver_stalls() -> None:
    """Ctrl-C while the receiver reads nothing: kcore stops at once (exit 130), and the
    receiver gets a reset, not a clean end it could take for a whole dump."""
    server = socket.create_server(("127.0.0.1", 0))
    proc = start_dump(f"tcp://127.0.0.1:{server.getsockname()[1]}", "--format", "lime")
    conn, _ = server.accept()
    server.close()
    time.sleep(2)  # the socket's buffers fill; kcore waits in send
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    # at once (0.7 s here idle); the slack is for a loaded machine: without the cancel it
    # waits for the receiver, which reads nothing until kcore has ended
    assert time.monotonic() - t < 60
    with conn, pytest.raises(ConnectionResetError):
        while conn.recv(1 << 20):
            pass


def test_tcp_refused_fails_in_one_line() -> None:
    """Nobody listening: retried, then one line and exit 1."""
    port = free_ports(1)[0]
    line = one_line_error(dump(f"tcp://127.0.0.1:{port}", "--format", "lime", "--retries", "1"))
    assert f"tcp://127.0.0.1:{port}" in line and "after 2 tries" in line, line


# HTTP PUT (nginx WebDAV)


def test_nginx_put_elf_writes_no_local_disk(request: pytest.FixtureRequest,
                                            streams: dict[str, bytes]) -> None:
    """The default elf goes in one streamed PUT; .sha256 and the manifest beside it; the
    process writes nothing to local disk (/proc/self/io write_bytes); pyelftools reads it."""
    folder = scratch_dir(request, "nginx")
    with running(Nginx(folder)) as ng:
        url = ng.url("/dumps/mem.elf")
        r, stats = dump_measured(url)
        assert r.returncode == 0, r.stderr.decode()
        data = (ng.www / "dumps" / "mem.elf").read_bytes()
        assert data == streams["elf"]
        assert stats["write_bytes"] == 0, stats
        sha = (ng.www / "dumps" / "mem.elf.sha256").read_text()
        assert sha == f"{hashlib.sha256(data).hexdigest()}  mem.elf\n"
        manifest = json.loads((ng.www / "dumps" / "mem.elf.json").read_bytes())
        check_manifest(manifest, data)
        # one PUT commits once: one part, the whole dump (hashed once, not twice)
        assert manifest["parts"]["count"] == 1 and manifest["parts"]["size"] == len(data)
        from elftools.elf.elffile import ELFFile

        with open(ng.www / "dumps" / "mem.elf", "rb") as f:
            assert ELFFile(f).header["e_type"] == "ET_CORE"
        # there now: refused without --force, replaced with it
        line = one_line_error(dump(url))
        assert "already exists" in line and "--force" in line, line
        r = dump(url, "--force", "--format", "lime")
        assert r.returncode == 0, r.stderr.decode()
        assert (ng.www / "dumps" / "mem.elf").read_bytes() == streams["lime"]
        # --no-digest: the same bytes, and no digest anywhere (no part needs one to resume)
        r = dump(url, "--force", "--no-digest")
        assert r.returncode == 0, r.stderr.decode()
        assert (ng.www / "dumps" / "mem.elf").read_bytes() == streams["elf"]
        manifest = json.loads((ng.www / "dumps" / "mem.elf.json").read_bytes())
        assert manifest["sha256"] is None and manifest["parts"] is None, manifest


def test_nginx_https_put_through_tls(request: pytest.FixtureRequest,
                                    streams: dict[str, bytes],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An https:// PUT (what a pre-signed URL is): the object and its .sha256 are the
    stream's. A certificate the system does not trust ends in one line naming it, and nothing
    is made."""
    folder = scratch_dir(request, "nginx-tls")
    with running(Nginx(folder, tls=True)) as ng:
        url = ng.url("/mem.lime")
        line = one_line_error(dump(url, "--format", "lime"))
        # said at once (not retried: the next try would fail alike), with what to do
        assert url in line and "certificate is not trusted" in line, line
        assert "SSL_CERT_FILE" in line and "tries" not in line, line
        assert not (ng.www / "mem.lime").exists()
        monkeypatch.setenv("SSL_CERT_FILE", str(ng.cert))
        r = dump(url, "--format", "lime")
        assert r.returncode == 0, r.stderr.decode()
        data = (ng.www / "mem.lime").read_bytes()
        assert data == streams["lime"]
        sha = (ng.www / "mem.lime.sha256").read_text()
        assert sha == f"{hashlib.sha256(data).hexdigest()}  mem.lime\n"
        check_manifest(json.loads((ng.www / "mem.lime.json").read_bytes()), data)


def test_nginx_full_disk_leaves_no_object(request: pytest.FixtureRequest) -> None:
    """A server whose disk fills (a 16 MiB tmpfs) fails the PUT: one line, exit 1, and the
    object is not there."""
    folder = scratch_dir(request, "nginx-full")
    with running(Nginx(folder, small_disk=16)) as ng:
        url = ng.url("/mem.lime")
        line = one_line_error(dump(url, "--format", "lime"))
        assert ng.url("/mem.lime") in line, line
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"))
        assert e.value.code == 404


# Azure Blob (Azurite)


def test_azurite_blocks_kdump_stream(request: pytest.FixtureRequest,
                                     streams: dict[str, bytes]) -> None:
    """kdump's flattened stream as 1 MiB blocks on 4 threads, the block list committed, the
    manifest and .sha256 beside it (a container SAS signs them)."""
    with running(Azurite(scratch_dir(request, "azurite"))) as az:
        url = az.sas_url("dumps", "mem.kdump")
        r = dump(url, "--format", "kdump", "-d", "31", "--part-size", str(MiB),
                 "--threads", "4", "--json")
        assert r.returncode == 0, r.stderr.decode()
        data = az.read("dumps", "mem.kdump")
        assert kdump_timeless(data) == kdump_timeless(streams["kdump31"])
        assert len(data) > 8 * MiB  # several blocks
        check_manifest(json.loads(az.read("dumps", "mem.kdump.json")), data)
        summary = json.loads(r.stdout)
        assert "sig=" not in r.stdout.decode() and summary["sha256"] == hashlib.sha256(
            data).hexdigest()
        # a blob SAS signs the blob alone: the dump lands, the manifest is said to be missing
        url = az.sas_url("dumps", "solo.kdump", container_sas=False)
        r = dump(url, "--format", "kdump", "-d", "31", "--json")
        assert r.returncode == 0, r.stderr.decode()
        assert any("manifest was not uploaded" in w for w in json.loads(r.stdout)["warnings"])
        assert kdump_timeless(az.read("dumps", "solo.kdump")) == kdump_timeless(
            streams["kdump31"])
        assert az.read("dumps", "solo.kdump.json") is None


def when_stored(folder: Path, size: int, proc: subprocess.Popen) -> None:
    """Wait until Azurite under folder holds size bytes of blocks (or the dump ended)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        held = sum(f.stat().st_size for f in (folder / "__blobstorage__").glob("*"))
        if held >= size:
            return
        time.sleep(0.02)
    raise AssertionError(f"the dump ended, or Azurite got less than {size} bytes in 300 s")


KDUMP_BLOCKS = ("--format", "kdump", "-d", "31", "--part-size", str(MiB))


def test_azurite_killed_mid_upload(request: pytest.FixtureRequest) -> None:
    """Azurite killed (SIGKILL) mid-upload: kcore retries with backoff, then fails in one
    line with exit 1, and no blob is there when Azurite is back."""
    folder = scratch_dir(request, "azurite-kill")
    with running(Azurite(folder)) as az:
        url = az.sas_url("dumps", "mem.kdump")
        proc = start_dump(url, *KDUMP_BLOCKS, "--threads", "1", "--retries", "2")
        when_stored(folder, 4 * MiB, proc)
        az.proc.kill()
        az.proc.wait(30)
        err = proc.communicate(timeout=120)[1]
        line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, b"", err))
        assert "/devstoreaccount1/dumps/mem.kdump" in line and "sig=" not in line, line
        assert "after 3 tries" in line, line
        az.start()
        assert az.read("dumps", "mem.kdump") is None


def test_azurite_interrupted_then_resume(request: pytest.FixtureRequest,
                                         streams: dict[str, bytes]) -> None:
    """A dump interrupted mid-upload (Ctrl-C: exit 130) leaves no blob; --resume sends only
    the blocks Azurite does not hold, and the blob is the whole stream."""
    folder = scratch_dir(request, "azurite-resume")
    with running(Azurite(folder)) as az:
        url = az.sas_url("dumps", "mem.kdump")
        proc = start_dump(url, *KDUMP_BLOCKS, "--threads", "1")
        when_stored(folder, 4 * MiB, proc)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 130, err.decode()
        assert "Traceback" not in err.decode()
        assert az.read("dumps", "mem.kdump") is None  # never committed
        r = dump(url, *KDUMP_BLOCKS, "--resume", "--json")
        assert r.returncode == 0, r.stderr.decode()
        assert json.loads(r.stdout)["parts_resumed"] >= 3
        data = az.read("dumps", "mem.kdump")
        assert kdump_timeless(data) == kdump_timeless(streams["kdump31"])
        check_manifest(json.loads(az.read("dumps", "mem.kdump.json")), data)


def test_azurite_resume_reads_only_what_is_missing(request: pytest.FixtureRequest,
                                                   streams: dict[str, bytes]) -> None:
    """An elf upload interrupted after N parts, resumed: the source is read from part N on.
    The process's reads (rchar: the source, then the writer's pipe to the uploader) are
    those of a whole upload less about twice N parts; the blob is the whole stream."""
    folder = scratch_dir(request, "azurite-resume-elf")
    part = 4 * MiB
    args = ("--format", "elf", "--part-size", str(part), "--threads", "1")
    with running(Azurite(folder)) as az:
        url = az.sas_url("dumps", "mem.elf")
        proc = start_dump(url, *args)
        when_stored(folder, 64 * MiB, proc)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 130, err.decode()
        r, resumed = dump_measured(url, *args, "--resume", "--json")
        assert r.returncode == 0, r.stderr.decode()
        held = json.loads(r.stdout)["parts_resumed"] * part
        assert held >= 16 * part
        data = az.read("dumps", "mem.elf")
        assert data == streams["elf"]
        check_manifest(json.loads(az.read("dumps", "mem.elf.json")), data, whole=False)
        assert az.read("dumps", "mem.elf.sha256") is None  # no whole digest to give
        r, whole = dump_measured(az.sas_url("dumps", "again.elf"), *args)
        assert r.returncode == 0, r.stderr.decode()
    saved = whole["rchar"] - resumed["rchar"]
    assert abs(saved - 2 * held) <= held // 10, (saved, held)


# S3 multipart (SeaweedFS's S3 gateway)


def test_s3_multipart_avml_and_a_403_part(request: pytest.FixtureRequest,
                                          streams: dict[str, bytes]) -> None:
    """avml to S3 through a pre-signed URL set (5 MiB parts): the object is the stream, the
    manifest beside it. A part whose signature is wrong gets 403: one line naming that
    part, exit 1, no object."""
    folder = scratch_dir(request, "seaweedfs")
    with running(SeaweedS3(folder / "data")) as s3:
        spec = s3.url_set("mem.avml", parts=10, part_size=5 * MiB)
        urls = folder / "urls.json"
        urls.write_text(json.dumps(spec))
        r = dump(f"multipart:{urls}", "--format", "avml", "-d", "31")
        assert r.returncode == 0, r.stderr.decode()
        data = s3.read("mem.avml")
        assert data == streams["avml31"]
        check_manifest(json.loads(s3.read("mem.avml.json")), data)
        assert s3.read("mem.avml.sha256") == (
            f"{hashlib.sha256(data).hexdigest()}  mem.avml\n".encode())

        spec = s3.url_set("bad.avml", parts=10, part_size=5 * MiB)
        spec["parts"][2] = re.sub(r"X-Amz-Signature=[0-9a-f]{8}", "X-Amz-Signature=00000000",
                                  spec["parts"][2])
        urls.write_text(json.dumps(spec))
        r = dump(f"multipart:{urls}", "--format", "avml", "-d", "31", "--threads", "1")
        line = one_line_error(r)
        assert "part 3" in line and "403" in line and "X-Amz" not in line, line
        assert s3.read("bad.avml") is None


def test_bad_destinations_are_refused_up_front(tmp_path: Path) -> None:
    """A format that needs seeking, --resume to a stream, a malformed URL set: exit 2."""
    line = one_line_error(dump("http://127.0.0.1:9/x", "--format", "raw"), 2)
    assert "remote destination" in line
    line = one_line_error(dump("tcp://127.0.0.1:9", "--resume"), 2)
    assert "--resume" in line
    bad = tmp_path / "urls.json"
    bad.write_text('{"parts": []}')
    line = one_line_error(dump(f"multipart:{bad}"), 2)
    assert str(bad) in line
    line = one_line_error(dump(str(tmp_path / "f.elf"), "--resume"), 2)
    assert "remote" in line


@pytest.mark.parametrize(("dest", "says"), [
    ("http://127.0.0.1:99999/x", "Port out of range"),
    ("http://127.0.0.1:12ab/x", "12ab"),
    ("azure+http://[::1/x", "Invalid IPv6 URL"),
    ("http://[zz]/x", "IPv4 or IPv6"),
    ("https://127.0.0.1:0/x", "port 0"),
    ("http://:80/x", "no host"),
    ("http://u:pw@127.0.0.1:1x/x?sig=SECRET", "not a valid URL"),
])
def test_malformed_urls_end_in_one_line(dest: str, says: str) -> None:
    """A URL urllib cannot split (bad port, bad IPv6 host) or with no host is refused before
    anything is read: exit 2, one line, the URL's secrets (user info, query) left out."""
    line = one_line_error(dump(dest), 2)
    assert says in line and "SECRET" not in line and "pw" not in line, line


def test_malformed_url_in_a_url_set(tmp_path: Path) -> None:
    """A URL set whose part URL or complete URL is not a URL: exit 2, one line naming the set."""
    for i, (parts, complete) in enumerate([(["http://h:99999/a"], "http://h/c"),
                                           (["http://h/a"], 5)]):
        urls = tmp_path / f"urls{i}.json"
        urls.write_text(json.dumps({"parts": parts, "complete": complete,
                                    "part_size": 5 * MiB}))
        line = one_line_error(dump(f"multipart:{urls}"), 2)
        assert str(urls) in line, line
