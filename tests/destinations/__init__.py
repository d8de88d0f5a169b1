"""Tests of kcore.destinations."""
