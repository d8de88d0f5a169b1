"""The folder `vol -p` loads: its kcore_layer module brings in kcore's Volatility 3 layer."""
