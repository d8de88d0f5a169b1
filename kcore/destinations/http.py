"""HTTP destinations: a streamed PUT, Azure Blob blocks (SAS URL), S3 multipart (a URL set)."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import ssl
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

from kcore.destinations.remote import RemoteOptions, Sink, UploadError, backoff, send_all
from kcore.errors import InputError

AZURE_VERSION = "2021-12-02"  # x-ms-version, where the SAS does not name one
BLOCK_TAG = b"kcore-part-"  # Azure block ids: tag, 8-digit part number, raw SHA-256 of the part
RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def redact(url: str) -> str:
    """A URL without its query (a signature or SAS token is a secret) nor user info."""
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        port = p.port
    except ValueError:  # not a URL (checked_url says why): its text up to the query
        return re.sub(r"//[^/?#]*@", "//", url.split("?", 1)[0].split("#", 1)[0])
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    if port is not None:
        host += f":{port}"
    return urllib.parse.urlunsplit((p.scheme, host, p.path, "", ""))


def checked_url(url: str, what: str = "") -> str:
    """url, if it is an http(s) URL with a host and a valid port; else an InputError."""
    where = f"{what}: " if what else ""
    try:
        p = urllib.parse.urlsplit(url)
        port, host = p.port, p.hostname
    except ValueError as exc:
        raise InputError(f"{where}{redact(url)}: not a valid URL ({exc})") from None
    if p.scheme not in ("http", "https"):
        raise InputError(f"{where}{redact(url)}: not an http:// or https:// URL")
    if not host:
        raise InputError(f"{where}{redact(url)}: no host in the URL")
    if port == 0:
        raise InputError(f"{where}{redact(url)}: port 0 (a port from 1 to 65535)")
    return url


def with_query(url: str, **extra: str) -> str:
    """url with extra query parameters appended (the SAS's own are kept as they are)."""
    add = urllib.parse.urlencode(extra)
    return url + ("&" if urllib.parse.urlsplit(url).query else "?") + add


def beside(url: str, suffix: str) -> str:
    """The URL of name+suffix in the same place, with the same query (a container SAS)."""
    p = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, p.path + suffix, p.query, ""))


class Http:
    """A pooled client with the retry policy: network errors, 408/429/5xx retried with
    exponential backoff (and jitter), any other status a failure said in one line."""

    def __init__(self, options: RemoteOptions) -> None:
        import urllib3

        self.urllib3 = urllib3
        self.retries = options.retries
        self.pool = urllib3.PoolManager(
            num_pools=4, maxsize=options.threads + 2, retries=False,
            timeout=urllib3.Timeout(connect=10.0, read=120.0))

    def request(self, method: str, url: str, what: str, *, body: Any = None,
                headers: dict[str, str] | None = None, ok: Callable[[int], bool] | None = None,
                chunked: bool = False, retry: bool = True) -> Any:
        """One request, retried as the policy says; the response, or an UploadError."""
        tries = self.retries + 1 if retry else 1
        last = ""
        attempt = 0
        for attempt in range(tries):
            if attempt:
                backoff(attempt - 1)
            try:
                r = self.pool.request(method, url, body=body, headers=headers or {},
                                      chunked=chunked, preload_content=True, redirect=False)
            except self.urllib3.exceptions.HTTPError as exc:
                untrusted = _untrusted(exc)
                if untrusted:  # as certain on the next try: not retried
                    raise UploadError(f"{what} at {redact(url)} failed: {untrusted}") from None
                last = _reason(exc)
                continue
            if (ok or _2xx)(r.status):
                return r
            last = f"HTTP {r.status} {r.reason or ''}".rstrip() + _detail(r.data)
            if r.status not in RETRIED_STATUS:
                break
        again = f" (after {attempt + 1} tries)" if attempt else ""
        raise UploadError(f"{what} at {redact(url)} failed{again}: {last}")

    def close(self) -> None:
        """Close the pooled connections."""
        self.pool.clear()


def _2xx(status: int) -> bool:
    return 200 <= status < 300


def _untrusted(exc: BaseException) -> str | None:
    """What to say when exc (or what it wraps) is a TLS certificate the system does not
    trust; else None."""
    seen: set[int] = set()
    inner: Any = exc
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, ssl.SSLCertVerificationError):
            why = inner.verify_message or inner.reason or "not trusted"
            return (f"the server's TLS certificate is not trusted ({why}); if it is the "
                    f"right server, name its CA certificate with SSL_CERT_FILE=FILE")
        inner = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
    return None


def _reason(exc: Exception) -> str:
    """A network error in a few words (urllib3 nests the OS error)."""
    inner: Any = exc
    while getattr(inner, "reason", None) is not None and inner.reason is not inner:
        inner = inner.reason
    text = str(inner) if inner is not exc else str(exc)
    for cut in ("<urllib3.connection.HTTPConnection object at", "HTTPConnectionPool("):
        if cut in text:
            text = text.split(":", 1)[-1].strip() if ":" in text else text
    text = text.replace("\n", " ")
    return text[:200] or type(exc).__name__


def _detail(data: bytes) -> str:
    """The error code an XML (S3, Azure) or text body gives, in a few words."""
    if not data:
        return ""
    try:
        root = ET.fromstring(data)
        code = root.findtext("Code") or ""
        msg = (root.findtext("Message") or "").splitlines()[0:1]
        text = ": ".join(x for x in (code, msg[0] if msg else "") if x)
    except ET.ParseError:
        text = data[:200].decode("utf-8", "replace")
        if "<" in text:  # an HTML page: its title at most
            start = text.find("<title>")
            text = text[start + 7:text.find("</title>")] if start >= 0 else ""
    text = " ".join(text.split())
    return f" ({text[:160]})" if text else ""


class PutStream(Sink):
    """One PUT of the whole dump, streamed (chunked transfer encoding): a WebDAV server
    (nginx's dav module), any pre-signed PUT URL that takes a body of unknown length."""

    parallel = False

    def __init__(self, url: str, options: RemoteOptions, force: bool) -> None:
        self.url, self.options, self.force = url, options, force
        self.display = redact(url)
        self.http = Http(options)
        self._conn: Any = None
        self._sent = 0

    def open(self) -> None:
        """Refuse an object that is there (a URL without signature: HEAD tells), connect."""
        if not urllib.parse.urlsplit(self.url).query and not self.force:
            r = self.http.request("HEAD", self.url, "checking", ok=lambda s: True)
            if r.status == 200:
                raise UploadError(f"{self.display} already exists; use --force to replace it")
        p = urllib.parse.urlsplit(self.url)
        conn_class = (http.client.HTTPSConnection if p.scheme == "https"
                      else http.client.HTTPConnection)
        target = urllib.parse.urlunsplit(("", "", p.path or "/", p.query, ""))
        for attempt in range(self.http.retries + 1):
            conn = conn_class(p.hostname or "", p.port, timeout=120)
            try:
                conn.putrequest("PUT", target, skip_accept_encoding=True)
                conn.putheader("Transfer-Encoding", "chunked")
                conn.putheader("Content-Type", "application/octet-stream")
                if not self.force:
                    conn.putheader("If-None-Match", "*")
                conn.endheaders()
                self._conn = conn
                return
            except OSError as exc:
                conn.close()
                untrusted = _untrusted(exc)
                if untrusted:
                    raise UploadError(f"connecting to {self.display} failed: {untrusted}"
                                      ) from None
                if attempt == self.http.retries:
                    raise UploadError(f"connecting to {self.display} failed (after "
                                      f"{attempt + 1} tries): {exc.strerror or exc}") from None
                backoff(attempt)

    def send(self, data: memoryview) -> None:
        """One chunk of the body."""
        send_all(self._conn.sock, (b"%x\r\n" % len(data), data, b"\r\n"), self.display,
                 self._sent, "a single PUT cannot resume: nothing was committed", self.cancel)
        self._sent += len(data)

    def finish(self, parts: list[str], sha256: str | None) -> None:
        """The last chunk, then the server's answer: 2xx or an error."""
        conn = self._conn
        try:
            conn.send(b"0\r\n\r\n")
            r = conn.getresponse()
            body = r.read()
        except OSError as exc:
            raise UploadError(f"{self.display} did not confirm the upload "
                              f"({exc.strerror or exc})") from None
        finally:
            conn.close()
            self._conn = None
        if r.status == 412:
            raise UploadError(f"{self.display} appeared meanwhile; not replaced (use --force)")
        if not _2xx(r.status):
            raise UploadError(f"{self.display} refused the upload: HTTP {r.status} "
                              f"{r.reason}{_detail(body)}")

    def abort(self) -> None:
        """Cut the connection before the last chunk: the server drops the partial body."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def put_beside(self, suffix: str, data: bytes) -> str | None:
        """PUT name+suffix (a URL with a query is signed for itself only: the manifest then
        needs --manifest-url)."""
        return _put_small(self.http, self.url, self.options, suffix, data, self.force)

    def close(self) -> None:
        """Close the connections."""
        self.abort()
        self.http.close()


def _put_small(client: Http, url: str, options: RemoteOptions, suffix: str, data: bytes,
               force: bool, headers: dict[str, str] | None = None,
               signed_beside: bool = False) -> str | None:
    """PUT data beside url (name+suffix) where that needs no other signature, or to
    --manifest-url (the .json only); where it went, or None."""
    if options.manifest_url is not None:
        if suffix != ".json":
            return None
        target = options.manifest_url
    elif urllib.parse.urlsplit(url).query and not signed_beside:
        return None
    else:
        target = beside(url, suffix)
    h = {"Content-Type": "application/json" if suffix == ".json" else "text/plain"}
    h.update(headers or {})
    if not force and options.manifest_url is None:
        h["If-None-Match"] = "*"
    client.request("PUT", target, f"uploading {suffix}", body=data, headers=h)
    return redact(target)


class AzureBlob(Sink):
    """An Azure block blob through a SAS URL: Put Block per part (in parallel, retried), then
    Put Block List. Uncommitted blocks stay a week: --resume sends only the missing ones."""

    parallel = True
    resumable = True

    def __init__(self, url: str, options: RemoteOptions, force: bool) -> None:
        self.url, self.options, self.force = url, options, force
        self.display = redact(url)
        self.http = Http(options)
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        self.version = q.get("sv", [AZURE_VERSION])[0]
        # a container or account SAS also signs NAME.json beside the blob
        self.container_sas = q.get("sr", [""])[0] == "c" or "o" in q.get("srt", [""])[0]
        self.tls = url.startswith("https://")
        self._held: dict[int, tuple[bytes, int]] = {}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"x-ms-version": self.version}
        h.update(extra or {})
        return h

    def open(self) -> None:
        """Refuse an existing blob (without --force); with --resume, list the held blocks."""
        if not self.force:
            r = self.http.request("HEAD", self.url, "checking", headers=self._headers(),
                                  ok=lambda s: True)
            if r.status == 200:
                raise UploadError(f"{self.display} already exists; use --force to replace it")
        if self.options.resume:
            r = self.http.request(
                "GET", with_query(self.url, comp="blocklist", blocklisttype="uncommitted"),
                "listing the uploaded blocks", headers=self._headers(),
                ok=lambda s: _2xx(s) or s == 404)
            if r.status != 404:
                for block in ET.fromstring(r.data).iter("Block"):
                    raw = base64.b64decode(block.findtext("Name") or "")
                    if raw.startswith(BLOCK_TAG) and len(raw) == len(BLOCK_TAG) + 8 + 32:
                        index = int(raw[len(BLOCK_TAG):len(BLOCK_TAG) + 8])
                        self._held[index] = raw[-32:], int(block.findtext("Size") or -1)

    @staticmethod
    def block_id(index: int, sha256: str) -> str:
        """The block's id: its part number and SHA-256 (all ids of a blob are one length)."""
        raw = BLOCK_TAG + b"%08d" % index + bytes.fromhex(sha256)
        return base64.b64encode(raw).decode()

    def already(self, index: int, data: memoryview, sha256: str) -> bool:
        """Whether an uncommitted block holds this part (same number, same SHA-256)."""
        return self._held.get(index, (b"", 0))[0] == bytes.fromhex(sha256)

    def held(self, index: int, size: int) -> str | None:
        """The SHA-256 in the id of an uncommitted block index of size bytes, if any."""
        digest, length = self._held.get(index, (b"", 0))
        return digest.hex() if digest and length == size else None

    def put_part(self, index: int, data: memoryview, sha256: str) -> None:
        """Put Block; over plain HTTP with a Content-MD5 that lets the service check the bytes
        it got (HTTPS: TLS checks every record already, as the Azure SDK's default assumes)."""
        h = {}
        if not self.tls:
            h["Content-MD5"] = base64.b64encode(hashlib.md5(data).digest()).decode()
        url = with_query(self.url, comp="block", blockid=self.block_id(index, sha256))
        self.http.request("PUT", url, f"part {index + 1}", body=data, headers=self._headers(h))

    def finish(self, parts: list[str], sha256: str | None) -> None:
        """Put Block List: the blob is made of the parts, in order, at once."""
        body = ["<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>"]
        body += [f"<Latest>{self.block_id(i, s)}</Latest>" for i, s in enumerate(parts)]
        body.append("</BlockList>")
        h = {"x-ms-blob-content-type": "application/octet-stream",
             "Content-Type": "application/xml"}
        if sha256 is not None:
            h["x-ms-meta-sha256"] = sha256
        if not self.force:
            h["If-None-Match"] = "*"
        self.http.request("PUT", with_query(self.url, comp="blocklist"), "committing the blob",
                          body="".join(body).encode(), headers=self._headers(h))

    def put_beside(self, suffix: str, data: bytes) -> str | None:
        """Put Blob NAME+suffix (a container SAS signs it too), or to --manifest-url."""
        return _put_small(self.http, self.url, self.options, suffix, data, self.force,
                          self._headers({"x-ms-blob-type": "BlockBlob"}),
                          signed_beside=self.container_sas)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()


class S3Multipart(Sink):
    """S3 multipart upload through pre-signed URLs (a URL set: no credentials here): an
    UploadPart per part (in parallel, retried), then CompleteMultipartUpload."""

    parallel = True
    resumable = True

    def __init__(self, path: str, options: RemoteOptions, force: bool) -> None:
        self.options, self.force = options, force
        try:
            with open(path, "rb") as f:
                spec = json.load(f)
            self.parts: list[str] = list(spec["parts"])
            self.complete_url: str = spec["complete"]
            self.part_size = int(spec["part_size"])
            self.list_url: str | None = spec.get("list")
            self.manifest_url: str | None = options.manifest_url or spec.get("manifest")
            self.sha256_url: str | None = spec.get("sha256")
        except OSError as exc:
            raise InputError(f"{path}: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: not a URL set (JSON with part_size, parts, complete; "
                             f"see kcore dump --help): {exc!r}") from None
        if not self.parts or not all(isinstance(u, str) for u in self.parts):
            raise InputError(f"{path}: its parts must be a non-empty list of URLs")
        for url in [*self.parts, self.complete_url, self.list_url, self.manifest_url,
                    self.sha256_url]:
            if url is None:
                continue
            if not isinstance(url, str):
                raise InputError(f"{path}: {url!r} is not a URL")
            checked_url(url, path)
        if not 5 << 20 <= self.part_size <= 5 << 30:
            raise InputError(f"{path}: part_size {self.part_size} must be from 5 MiB to 5 GiB "
                             f"(S3's limits)")
        options.part_size = self.part_size
        self.display = redact(self.complete_url)
        self.http = Http(options)
        self.etags: dict[int, str] = {}
        self._held: dict[int, str] = {}

    def open(self) -> None:
        """With --resume, list the parts the server holds (the URL set's list URL)."""
        if not self.options.resume:
            return
        if self.list_url is None:
            raise InputError("--resume needs the URL set's \"list\" URL (a pre-signed "
                             "ListParts of the same upload)")
        r = self.http.request("GET", self.list_url, "listing the uploaded parts")
        ns = ""
        root = ET.fromstring(r.data)
        if root.tag.startswith("{"):
            ns = root.tag[:root.tag.index("}") + 1]
        for part in root.iter(f"{ns}Part"):
            number = int(part.findtext(f"{ns}PartNumber") or 0)
            self._held[number - 1] = (part.findtext(f"{ns}ETag") or "").strip('"')

    def already(self, index: int, data: memoryview, sha256: str) -> bool:
        """Whether the server holds this part: its ETag is the part's MD5."""
        held = self._held.get(index)
        if held is None or hashlib.md5(data).hexdigest() != held:
            return False
        self.etags[index] = held
        return True

    def put_part(self, index: int, data: memoryview, sha256: str) -> None:
        """UploadPart (its Content-MD5 checked by the server); the ETag kept."""
        if index >= len(self.parts):
            raise UploadError(f"the URL set holds {len(self.parts)} parts of "
                              f"{self.part_size} bytes, and the dump is longer: pre-sign "
                              f"more parts (or larger ones); nothing was committed")
        md5 = hashlib.md5(data)
        r = self.http.request("PUT", self.parts[index], f"part {index + 1}", body=data,
                              headers={"Content-MD5": base64.b64encode(md5.digest()).decode()})
        self.etags[index] = (r.headers.get("ETag") or md5.hexdigest()).strip('"')

    def finish(self, parts: list[str], sha256: str | None) -> None:
        """CompleteMultipartUpload: the object is made of the parts at once."""
        body = ["<CompleteMultipartUpload>"]
        body += [f"<Part><PartNumber>{i + 1}</PartNumber><ETag>\"{self.etags[i]}\"</ETag>"
                 f"</Part>" for i in range(len(parts))]
        body.append("</CompleteMultipartUpload>")
        r = self.http.request("POST", self.complete_url, "completing the upload",
                              body="".join(body).encode(),
                              headers={"Content-Type": "application/xml"})
        if b"<Error>" in r.data:  # S3 may answer 200 and fail in the body
            raise UploadError(f"completing the upload at {self.display} failed:"
                              f"{_detail(r.data[r.data.index(b'<Error>'):])}")

    def put_beside(self, suffix: str, data: bytes) -> str | None:
        """PUT the manifest (or the .sha256) to the URL set's own pre-signed URL for it."""
        url = self.manifest_url if suffix == ".json" else self.sha256_url
        if url is None:
            return None
        self.http.request("PUT", url, f"uploading {suffix}", body=data)
        return redact(url)

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

