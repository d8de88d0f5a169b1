# Developer habits, also run by .ci/run: `make check` (lint and types), `make test-fast`
# (the fast set: no QEMU guest, no consumer tool). ruff format is not enforced: adopting it
# would rewrite nearly every file at once.
PYTHON ?= python3

.PHONY: build check test-fast test dist dist-aarch64

build:  ## the C core, in place (again after changing csrc/)
	$(PYTHON) setup.py build_ext --inplace -q

check:  ## ruff and mypy (configured in pyproject.toml)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

test-fast: build  ## the fast set: no QEMU guest (vm), no crash/drgn/makedumpfile/Volatility (consumers)
	$(PYTHON) -m pytest -m 'not vm and not consumers'

test: build  ## the README's test command: everything
	$(PYTHON) -m pytest

dist: build  ## dist/kcore-VERSION-linux-ARCH: one file, nothing needed on the target (pip install '.[dist]')
	$(PYTHON) packaging/build_dist.py $(DIST_ARGS)

dist-aarch64:  ## dist/kcore-VERSION-linux-aarch64, built here in Debian's arm64 root (root; qemu-user-static, debootstrap)
	$(PYTHON) packaging/build_dist.py --arch aarch64 $(DIST_ARGS)
