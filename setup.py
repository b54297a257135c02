"""Declares the Cython extensions; metadata lives in pyproject.toml.

``usbip.protocol._codec`` is compiled from the pure-Python ``usbip/protocol/codec.py``
(Cython's pure Python mode), which ``usbip/protocol/_codec.pxd`` augments with C types.
"""

import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:  # building from an sdist without Cython: use the generated C
    cythonize = None

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3"]


def ext(name: str, source: str, depends: tuple[str, ...] = ()) -> Extension:
    src = source if cythonize else os.path.splitext(source)[0] + ".c"
    return Extension(
        name, [src], include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=CFLAGS, depends=list(depends)
    )


extensions = [
    # Cython does not see an augmenting .pxd named after another module: list it
    ext("usbip.protocol._codec", "usbip/protocol/codec.py", ("usbip/protocol/_codec.pxd", "usbip/protocol/_wire.pxd")),
    ext("usbip._buffers", "usbip/_buffers.pyx"),
]
if cythonize:
    # annotation_typing off: the C types come from the .pxd, the annotations are for type checkers
    directives = {"language_level": "3", "annotation_typing": False, "warn.unreachable": False}
    extensions = cythonize(extensions, compiler_directives=directives, quiet=True)

setup(ext_modules=extensions)
