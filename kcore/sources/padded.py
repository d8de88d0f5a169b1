"""LiME's zero-padded format: a raw image whose holes below the last range are zero bytes."""

from __future__ import annotations

from kcore.sources.base import Probe
from kcore.sources.raw import RawSource


class PaddedSource(RawSource):
    """A LiME `format=padded` image: file offset = physical address, holes written as zeros."""

    kind = "padded"

    @classmethod
    def detect(cls, probe: Probe) -> bool:
        """Never: a padded image looks like a raw one (name it padded:PATH)."""
        return False
