"""Tests of kcore.integrations."""
