"""Tests of kcore.formats."""
