"""Which codec twin ``usbip.protocol`` picks, and how it falls back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

NO_EXTENSIONS = os.environ.get("USBIP_NO_EXTENSIONS", "") not in ("", "0")

_PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    {prelude}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import usbip.protocol
        import usbip.pool
    print(json.dumps({{
        "impl": usbip.protocol.IMPLEMENTATION,
        "pool": usbip.pool.IMPLEMENTATION,
        "module": usbip.protocol.Decoder.__module__,
        "warnings": [[w.category.__name__, str(w.message)] for w in caught],
    }}))
    """
)


def _probe(prelude: str = "", **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "USBIP_NO_EXTENSIONS"}
    environ.update(env)
    # -W error would turn the warning into an exception; make sure nothing filters it away either
    environ.pop("PYTHONWARNINGS", None)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(prelude=prelude)],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
        timeout=60,
    )
    assert out.stderr == "", out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(NO_EXTENSIONS, reason="USBIP_NO_EXTENSIONS=1 forces the pure twin")
def test_compiled_codec_is_the_default() -> None:
    import usbip.protocol
    from usbip.protocol import _codec

    assert usbip.protocol.IMPLEMENTATION == "cython"
    assert usbip.protocol.Decoder is _codec.Decoder
    assert usbip.protocol.CmdSubmit is _codec.CmdSubmit
    assert usbip.protocol.IsoPackets is _codec.IsoPackets
    assert usbip.protocol.pack_cmd_submit is _codec.pack_cmd_submit
    assert usbip.protocol.unpack_header is _codec.unpack_header


@pytest.mark.skipif(NO_EXTENSIONS, reason="USBIP_NO_EXTENSIONS=1 forces the pure twin")
def test_compiled_default_in_a_fresh_interpreter() -> None:
    res = _probe()
    assert res["impl"] == "cython"
    assert res["pool"] == "cython"
    assert res["module"] == "usbip.protocol._codec"
    assert res["warnings"] == []


def test_no_extensions_env_selects_pure_without_warning() -> None:
    res = _probe(USBIP_NO_EXTENSIONS="1")
    assert res["impl"] == "python"
    assert res["pool"] == "python"
    assert res["module"] == "usbip.protocol.codec"
    assert res["warnings"] == []


def test_failed_extension_import_falls_back_with_one_warning() -> None:
    # None in sys.modules makes `import usbip.protocol._codec` raise ImportError
    res = _probe("sys.modules['usbip.protocol._codec'] = None\nsys.modules['usbip.pool._buffers'] = None")
    assert res["impl"] == "python"
    assert res["pool"] == "python"
    assert res["module"] == "usbip.protocol.codec"
    assert len(res["warnings"]) == 1, res["warnings"]
    category, message = res["warnings"][0]
    assert category == "RuntimeWarning"
    assert "pure-Python" in message


def test_failed_codec_import_only_warns_once() -> None:
    res = _probe("sys.modules['usbip.protocol._codec'] = None")
    assert res["impl"] == "python"
    assert [w[0] for w in res["warnings"]] == ["RuntimeWarning"]


def test_twins_share_the_api(py_codec, cy_codec) -> None:
    public = set(py_codec.__all__) - {"USBIP_DIR_IN"}
    for name in public:
        assert hasattr(cy_codec, name), name
    assert py_codec.IMPLEMENTATION == "python"
    assert cy_codec.IMPLEMENTATION == "cython"
