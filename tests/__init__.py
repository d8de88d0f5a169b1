"""kcore's tests: one subpackage per kcore/ package, shared helpers in tests.helpers."""
