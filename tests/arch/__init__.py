"""Tests of kcore.arch."""
