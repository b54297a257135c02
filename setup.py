"""Declares the Cython extensions; metadata lives in pyproject.toml."""

import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # building from an sdist without Cython: use the generated C
    cythonize = None

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3"]


def ext(name: str, pyx: str) -> Extension:
    src = pyx if cythonize else pyx[:-4] + ".c"
    return Extension(name, [src], include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=CFLAGS)


extensions = [
    ext("usbip.protocol._codec", "usbip/protocol/_codec.pyx"),
    ext("usbip._buffers", "usbip/_buffers.pyx"),
]
if cythonize:
    extensions = cythonize(extensions, compiler_directives={"language_level": "3"}, quiet=True)

setup(ext_modules=extensions)
