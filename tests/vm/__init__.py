"""The QEMU harness (qemu_vm, guests) and the tests that boot real kernels."""
