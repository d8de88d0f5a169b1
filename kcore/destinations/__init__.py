"""Dump destinations beyond a local file: object storage, HTTP PUT and TCP (no local disk).

`kcore dump -o DEST` takes, besides a file or `-`:
  https://... / http://...    one PUT of the whole dump, streamed (chunked): a WebDAV server
  (an Azure SAS URL)          Azure Blob: Put Block per part in parallel, then Put Block List
  multipart:URLSET.json       S3 multipart through pre-signed URLs (UploadPart, Complete)
  tcp://HOST:PORT             connect and send (`nc -l PORT > mem.lime` receives it)
  tcp-listen:[HOST:]PORT      wait for one client and send (`nc HOST PORT > mem.lime`)
The writer writes to a pipe; remote.RemoteOutput pumps it to the destination's Sink.
"""

from __future__ import annotations

import argparse
import urllib.parse

from kcore.cli import int_arg
from kcore.destinations.remote import RemoteOptions, RemoteOutput, Sink, UploadError
from kcore.errors import InputError
from kcore.output import Output
from kcore.output import open_output as local_output

__all__ = ["RemoteOptions", "RemoteOutput", "UploadError", "add_args", "is_remote",
           "open_remote", "options", "MIN_PART", "MAX_PART"]

SCHEMES = ("http://", "https://", "azure+http://", "azure+https://", "tcp://", "tcp-listen:",
           "multipart:")
MIN_PART = 1 << 20
MAX_PART = 256 << 20  # Azure takes 4000 MiB blocks, but memory holds threads+1 of them
DEFAULT_PART = 32 << 20  # Azurite takes fewer, larger blocks faster (bench/)

HELP = """\
destinations (-o DEST; nothing is written to local disk, peak memory is bounded):
  https://HOST/PATH   one streamed PUT (chunked): a WebDAV server (nginx dav), a pre-signed
                      PUT URL that takes a body of unknown length
  https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?SAS   (any URL with a SAS: sv, sig)
                      Azure Blob: parts put as blocks in parallel (--threads), then the
                      block list; azure+https:// forces it
  multipart:URLSET.json   S3 multipart upload with pre-signed URLs, no credentials here:
                      {"part_size": N, "parts": [URL of part 1, ...], "complete": URL,
                       "list": URL (for --resume), "manifest": URL, "sha256": URL}
  tcp://HOST:PORT     connect and send (nc -l PORT > mem.lime receives it)
  tcp-listen:[HOST:]PORT   wait for one client and send (nc HOST PORT > mem.lime)
  Formats that stream go (elf, lime, avml; kdump as makedumpfile's flattened stream).
  The manifest (with every part's SHA-256) and DEST.sha256 are uploaded last, beside the
  dump, where the URL allows (a plain URL, an Azure container SAS, the URL set's), else to
  --manifest-url. A failed part is retried with backoff (--retries); then the dump fails
  (exit 1) and no object is made; --resume sends again only the parts the server lacks
  (to Azure, elf/lime/raw/padded do not read the held parts again)."""


def is_remote(dest: str) -> bool:
    """Whether dest names a remote destination rather than a file."""
    return dest.startswith(SCHEMES)


def _is_azure(url: str) -> bool:
    """A SAS URL: the query signs with sig and names the service version sv."""
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    return ("sig" in q and "sv" in q) or ".blob.core.windows.net" in url.split("?")[0]


def sink_for(dest: str, opts: RemoteOptions, force: bool) -> Sink:
    """The Sink that dest names (the URL's credentials stay out of every message)."""
    from kcore.destinations import http, tcp

    if dest.startswith(("tcp://", "tcp-listen:")):
        if opts.resume:
            raise InputError(f"--resume applies to object storage, not {dest} (a stream "
                             f"starts over)")
        return tcp.TcpSink(dest, opts)
    if dest.startswith("multipart:"):
        return http.S3Multipart(dest[len("multipart:"):], opts, force)
    if dest.startswith("azure+"):
        return http.AzureBlob(http.checked_url(dest[len("azure+"):]), opts, force)
    if _is_azure(http.checked_url(dest)):
        return http.AzureBlob(dest, opts, force)
    if opts.resume:
        raise InputError(f"--resume needs parts on the server: an Azure SAS URL or a "
                         f"multipart: URL set, not one PUT to {http.redact(dest)}")
    return http.PutStream(dest, opts, force)


def open_remote(dest: str, opts: RemoteOptions, *, force: bool, digest: bool) -> RemoteOutput:
    """A dump destination for dest (connected when its with block is entered)."""
    return RemoteOutput.make(sink_for(dest, opts, force), opts, force=force, digest=digest)


def open_output(dest: str, opts: RemoteOptions | None, *, force: bool, digest: bool) -> Output:
    """A dump destination: a URL when opts are given and dest is one, else a local output
    (kcore.output.open_output: a file, a device, or '-')."""
    if opts is not None and is_remote(dest):
        return open_remote(dest, opts, force=force, digest=digest)
    return local_output(dest, force=force, digest=digest)


def add_args(parser: argparse.ArgumentParser) -> None:
    """The options of remote destinations (-o URL)."""
    g = parser.add_argument_group("remote destinations (-o URL, tcp://, multipart:)")
    g.add_argument("--resume", action="store_true",
                   help="object storage: send only the parts the server does not hold yet "
                        "(same part size). To Azure, elf, lime, raw and padded start reading "
                        "at the first missing part (no whole-dump SHA-256 then); kdump and "
                        "avml (compressed: a byte depends on all before it) and S3 read the "
                        "dump again and skip the parts held with the same bytes")
    g.add_argument("--retries", type=int, default=5, metavar="N",
                   help="tries again after a failed request or connection, with backoff "
                        "from 0.5 s doubling up to 8 s (default 5)")
    g.add_argument("--part-size", type=int_arg, default=DEFAULT_PART, metavar="BYTES",
                   help="Azure block size (default 32 MiB; from 1 to 256 MiB); memory "
                        "holds --threads + 1 parts at most, within 96 MiB")
    g.add_argument("--manifest-url", metavar="URL",
                   help="where the JSON manifest goes when it cannot go beside the dump "
                        "(a pre-signed PUT URL of its own)")


UPLOADS = 4  # parts in flight by default: an upload waits on the network, not on a CPU


def options(args: argparse.Namespace) -> RemoteOptions:
    """RemoteOptions from parsed `kcore dump` arguments (checked: exit 2 when out of range)."""
    from kcore.engine import default_threads

    threads = args.threads or max(UPLOADS, default_threads())
    if not 0 <= args.retries <= 20:
        raise InputError(f"--retries {args.retries} must be from 0 to 20")
    if not MIN_PART <= args.part_size <= MAX_PART:
        raise InputError(f"--part-size {args.part_size} must be from {MIN_PART} to {MAX_PART}")
    return RemoteOptions(threads=threads, part_size=args.part_size, resume=args.resume,
                         retries=args.retries, manifest_url=args.manifest_url)
