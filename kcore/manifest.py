"""The dump manifest (OUTPUT.json): one schema, written by dump and rebuild, read by verify.

A manifest is a bounded JSON object: at most MAX_BYTES, nested at most MAX_DEPTH deep, each
known field of one type (SCHEMA). Fields it does not know are kept and not checked, so a newer
kcore's manifest still verifies. A manifest that breaks these rules is a ManifestError whose
message names the field, in one line.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CHUNK = 64 << 20  # the manifest holds a SHA-256 of each CHUNK bytes of the output
MAX_BYTES = 64 << 20  # the most of any manifest (a 16 TiB dump's chunk digests take ~20 MiB)
BASE_BYTES = 4 << 20  # what a manifest holds besides chunk digests (iomem, modules: < 1 MiB)
CHUNK_BYTES = 128  # a chunk digest's share of a manifest (70 bytes in kcore's indented JSON)
MAX_DEPTH = 8  # the deepest kcore writes is 4 (dump_level.pages_excluded)
U64 = 1 << 64

_HEX = re.compile(r"0x[0-9a-fA-F]{1,16}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class ManifestError(ValueError):
    """A manifest that is not valid JSON or breaks the schema (the message names the field)."""


def _u64(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < U64


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _hex(v: Any) -> bool:
    return isinstance(v, str) and _HEX.fullmatch(v) is not None


def _sha256(v: Any) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _texts(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _object(v: Any) -> bool:
    return isinstance(v, dict)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# A range: where a piece of memory lies in the file (every key optional, by format).
RANGE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "kind": (_text, "a string"),
    "paddr": (_hex, "a 0x hex string"),
    "vaddr": (_hex, "a 0x hex string"),
    "size": (_u64, "a byte count"),
    "offset": (_u64, "a file offset"),
}


def _chunks(v: Any) -> bool:
    if not isinstance(v, dict) or not _u64(v.get("size")):
        return False
    digests = v.get("sha256")
    if isinstance(digests, list):
        return all(_sha256(d) for d in digests)
    if isinstance(digests, dict):  # the sparse kcore image: chunk index -> digest
        return all(k.isdigit() and len(k) < 20 and _sha256(d) for k, d in digests.items())
    return False


def _parts(v: Any) -> bool:
    """A remote dump's parts (kcore.destinations): their size, count and SHA-256s."""
    return (isinstance(v, dict) and _u64(v.get("size")) and _u64(v.get("count"))
            and isinstance(v.get("sha256"), list) and all(_sha256(d) for d in v["sha256"]))


SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tool": (_text, "a string"),
    "output": (_text, "a string"),
    "input": (_text, "a string"),
    "format": (_text, "a string"),
    "source": (_text, "a string"),
    "root": (_text, "a string"),
    "kernel_release": (_optional(_text), "a string or null"),
    "started": (_optional(_text), "a string or null"),
    "finished": (_optional(_text), "a string or null"),
    "size": (_u64, "a byte count"),
    "ranges": (lambda v: isinstance(v, list), "a list of ranges"),
    "bytes_elided": (_u64, "a byte count"),
    "pages_zero_filled": (_u64, "a page count"),
    "first_unreadable": (_optional(_text), "a string or null"),
    "warnings": (_texts, "a list of strings"),
    "sha256": (_optional(_sha256), "a SHA-256 in hex or null"),
    "chunks": (_optional(_chunks), "null or {size, sha256: [...] or {index: digest}}"),
    "parts": (_optional(_parts), "null or {size, count, sha256: [...]}"),
    "compression": (_optional(_object), "an object or null"),
    "dump_level": (_optional(_object), "an object or null"),
    "recheck": (_optional(_object), "an object or null"),
    "times": (_optional(_object), "an object or null"),
    "critical": (_optional(_object), "an object or null"),
    "order": (_optional(_text), "a string or null"),
    "banner": (_optional(_text), "a string or null"),
    "boot_id": (_optional(_text), "a string or null"),
    "lockdown": (_optional(_object), "an object or null"),
    "modules": (_optional(_texts), "a list of strings or null"),
    "iomem": (_optional(_texts), "a list of strings or null"),
    "source_choice": (_optional(_object), "an object or null"),
}


@dataclass(frozen=True)
class Range:
    """One range of the manifest, its numbers parsed (None where the format has none)."""

    kind: str | None
    paddr: int | None
    vaddr: int | None
    size: int
    offset: int | None


def _describe(v: Any) -> str:
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object", type(None): "null"}.get(type(v), "a value")
    return kind


def validate(doc: Any) -> dict[str, Any]:
    """doc itself when it is a manifest by the schema; ManifestError naming the field if not."""
    if not isinstance(doc, dict):
        raise ManifestError(f"not a JSON object but {_describe(doc)}")
    for key, (check, want) in SCHEMA.items():
        if key in doc and not check(doc[key]):
            raise ManifestError(f"field {key!r} is {_describe(doc[key])}, not {want}")
    for i, r in enumerate(doc.get("ranges") or []):
        if not isinstance(r, dict):
            raise ManifestError(f"ranges[{i}] is {_describe(r)}, not an object")
        if "size" not in r:
            raise ManifestError(f"ranges[{i}] has no size")
        for key, (check, want) in RANGE.items():
            if key in r and not check(r[key]):
                raise ManifestError(f"ranges[{i}].{key} is {_describe(r[key])}"
                                    f"{' ' + repr(r[key])[:40] if isinstance(r[key], str) else ''}"
                                    f", not {want}")
    return doc


def ranges(doc: dict[str, Any]) -> list[Range]:
    """The manifest's ranges, parsed (validate() has checked them)."""
    def num(v: Any) -> int | None:
        return int(v, 16) if isinstance(v, str) else v

    return [Range(r.get("kind"), num(r.get("paddr")), num(r.get("vaddr")), r["size"],
                  r.get("offset")) for r in doc.get("ranges") or []]


def _depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (strings skipped)."""
    depth = deepest = 0
    for m in _NESTING.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif tok in "]}":
            depth -= 1
    return deepest


def limit_for(dump_size: int) -> int:
    """The most bytes the manifest of a dump_size-byte dump can take."""
    return min(MAX_BYTES, BASE_BYTES + CHUNK_BYTES * (dump_size // CHUNK + 1))


def parse(data: bytes, limit: int = MAX_BYTES) -> dict[str, Any]:
    """A manifest from its bytes: bounded, valid JSON, by the schema; ManifestError if not."""
    if len(data) > limit:
        raise ManifestError(f"{len(data)} bytes, more than a manifest of this dump takes "
                            f"({limit}): not a kcore manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text (byte {exc.start:#x})") from None
    if _depth(text) > MAX_DEPTH:
        raise ManifestError(f"nested deeper than {MAX_DEPTH} levels: not a kcore manifest")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    except ValueError:  # a number of more digits than Python converts
        raise ManifestError("not JSON kcore reads (a number too long)") from None
    return validate(doc)


def load(path: str, dump_size: int) -> dict[str, Any] | None:
    """The manifest at path of a dump_size-byte dump (None when there is none); ManifestError
    when it is unreadable or not a manifest."""
    limit = limit_for(dump_size)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc.strerror}") from None
    return parse(data, limit)


def dumps(doc: dict[str, Any]) -> bytes:
    """The bytes of a manifest as kcore writes it (checked against the schema first)."""
    return (json.dumps(validate(doc), indent=2) + "\n").encode()


def sidecar_path(output: str) -> str:
    """Where the manifest of an output file goes."""
    return os.fspath(output) + ".json"
