"""Output formats of kcore dump (elf, kcore, lime, raw, padded)."""
