"""Tests of kcore.sources."""
