"""Build kcore: the Python package and its cffi C core (csrc/)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# The one version string is kcore.__version__ (read, not imported: the C core is not built yet).
VERSION = re.search(r'^__version__ = "([^"]+)"$',
                    (Path(__file__).parent / "kcore" / "__init__.py").read_text(), re.M)[1]

setup(
    name="kcore",
    version=VERSION,
    description="The Linux kernel's /proc/kcore rebuilt in userspace, and fast memory dumps",
    python_requires=">=3.11",
    packages=find_packages(include=["kcore", "kcore.*"]),
    setup_requires=["cffi>=1.15"],
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    install_requires=["cffi>=1.15", "pyelftools>=0.29", "tqdm>=4.60"],
    extras_require={
        # kcore inside other tools (kcore.integrations): drgn programs, a Volatility 3 layer.
        "drgn": ["drgn"],
        "volatility": ["volatility3"],
        # drgn and volatility3: the consumers whose opening of kcore's dumps the tests check.
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "ruff", "mypy", "zstandard",
                 "drgn", "volatility3",
                 # an ISF of the fixtures' kernel for Volatility's linux.pslist (from its BTF)
                 "pakunoda",
                 # a FUSE pass-through returning short reads (tests/shortread_fs.py; fuse3)
                 "mfusepy"],
        # bench/ only (not the tests): the big-guest bench's plot
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
    entry_points={"console_scripts": ["kcore = kcore.cli:main"]},
    zip_safe=False,
)
