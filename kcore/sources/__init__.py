"""Memory sources: where kernel memory is read (raw, padded, lime, elf, kcore, devmem, pid)."""
