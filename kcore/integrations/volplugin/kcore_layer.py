"""Volatility 3 imports this file from `vol -p DIR`: kcore's layer and stacker join its own."""

from kcore.integrations.volatility import KcoreLayer, KcoreStacker

__all__ = ["KcoreLayer", "KcoreStacker"]
