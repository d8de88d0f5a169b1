"""Dumps opened by the tools people use: drgn, gdb, crash, makedumpfile, Volatility."""
