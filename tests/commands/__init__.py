"""Tests of kcore.commands."""
