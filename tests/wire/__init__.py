"""Tests of kcore.wire."""
