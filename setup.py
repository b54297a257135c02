"""Declares the Cython extensions; metadata lives in pyproject.toml.

The .c files are generated here from the Cython sources (they are not in the repository nor in
the sdist), so building needs Cython (pyproject's build-system requires it), a C compiler and the
Python headers. The wheels (scripts/wheel) install without any of these.

``usbip.protocol._codec`` is compiled from the pure-Python ``usbip/protocol/codec.py``
(Cython's pure Python mode), which ``usbip/protocol/_codec.pxd`` augments with C types; the
URB path around it likewise: ``usbip.server._urbsession`` from ``usbip/server/urbsession.py``
(+ ``_urbsession.pxd``) and ``usbip.net._pump`` from ``usbip/net/pump.py`` (+ ``_pump.pxd``).
"""

import os
import sys

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError:
    sys.exit(
        "cyusbip: building needs Cython>=3.0 (the generated C is not shipped). "
        "`pip install .` or `python -m build` install it in an isolated build environment; "
        "to run setup.py directly, `pip install 'Cython>=3.0'` first. "
        "To install without a compiler, use the wheel: `pip install cyusbip`."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O3"]


def ext(name: str, source: str, depends: tuple[str, ...] = ()) -> Extension:
    return Extension(
        name, [source], include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=CFLAGS, depends=list(depends)
    )


# annotation_typing off: the C types come from the .pxd, the annotations are for type checkers
extensions = cythonize(
    [
        # Cython does not see an augmenting .pxd named after another module: list it
        ext(
            "usbip.protocol._codec",
            "usbip/protocol/codec.py",
            ("usbip/protocol/_codec.pxd", "usbip/protocol/_wire.pxd"),
        ),
        ext(
            "usbip.server._urbsession",
            "usbip/server/urbsession.py",
            (
                "usbip/server/_urbsession.pxd",
                "usbip/protocol/_codec.pxd",
                "usbip/pool/_buffers.pxd",
                "usbip/net/_pump.pxd",
            ),
        ),
        ext("usbip.net._pump", "usbip/net/pump.py", ("usbip/net/_pump.pxd", "usbip/net/_sock.pxd")),
        ext("usbip.pool._buffers", "usbip/pool/_buffers.pyx", ("usbip/pool/_buffers.pxd",)),
    ],
    compiler_directives={"language_level": "3", "annotation_typing": False, "warn.unreachable": False},
    quiet=True,
)

setup(ext_modules=extensions)
