"""Host tests (no kernel needed): the ctypes declarations match
include/ublk.h, and bad arguments raise clear Python errors before the
kernel is asked."""

import ctypes
import errno
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

import pyublk
from pyublk import _lib as L

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "include" / "ublk.h"


def header_text() -> str:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found (tests run from the repository)")
    return HEADER.read_text()


def test_function_list_matches_header():
    text = re.sub(r"/\*.*?\*/", "", header_text(), flags=re.S)
    declared = set(re.findall(r"\b(ublk_[a-z0-9_]+)\s*\(", text))
    assert declared == set(L.FUNCTIONS), (
        f"only in the header: {sorted(declared - set(L.FUNCTIONS))}; "
        f"only in pyublk: {sorted(set(L.FUNCTIONS) - declared)}")


def test_constants_match_header():
    defines = dict(re.findall(r"^#define (UBLK_[A-Z0-9_]+) (\d+|INT32_MIN)$", header_text(), flags=re.M))
    limits = {"INT32_MIN": -(1 << 31)}
    assert {k: limits[v] if v in limits else int(v) for k, v in defines.items()} == L.CONSTANTS


def test_struct_layouts_match_the_c_compiler():
    """sizeof/offsetof of every field as gcc sees the header, against ctypes."""
    header_text()
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "ublk.h"', "int main(void) {"]
    for name, st in L.STRUCTS.items():
        lines.append(f'printf("{name}=%zu\\n", sizeof(struct {name}));')
        for f, _ in st._fields_:
            lines.append(f'printf("{name}.{f}=%zu %zu\\n", offsetof(struct {name}, {f}), sizeof(((struct {name} *)0)->{f}));')
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        Path(src).write_text("\n".join(lines))
        cc = os.environ.get("CC", "cc")
        r = subprocess.run([cc, "-I", str(HEADER.parent), "-o", exe, src], capture_output=True, text=True)
        assert r.returncode == 0, f"the layout probe does not compile (struct or field renamed?):\n{r.stderr}"
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")
    want = {}
    for name, st in L.STRUCTS.items():
        want[name] = str(ctypes.sizeof(st))
        for f, _ in st._fields_:
            fd = getattr(st, f)
            want[f"{name}.{f}"] = f"{fd.offset} {fd.size}"
    got = dict(line.split("=", 1) for line in out if line)
    assert got == want


def test_every_header_struct_is_declared():
    names = set(re.findall(r"^typedef struct (ublk_[a-z_]+) \{", header_text(), flags=re.M))
    assert names == set(L.STRUCTS)


class Reader:
    def read(self, offset, length, buf):
        pass


@pytest.mark.parametrize("kw, exc, text", [
    (dict(size=-1), ValueError, "size must be positive"),
    (dict(size=0), ValueError, "size must be positive"),
    (dict(size=1000), ValueError, "multiple of the logical block size"),
    (dict(size=1 << 20, queues=0), ValueError, "queues must be positive"),
    (dict(size=1 << 20, depth=5000), ValueError, "must be 1..4096"),
    (dict(size="1G"), TypeError, "size must be an int"),
    (dict(size=1 << 20, zero_copy="fast"), ValueError, "zero_copy must be one of"),
    (dict(size=1 << 20, dev_id=-3), ValueError, "dev_id"),
    (dict(size=1 << 20, recovery="sometimes"), ValueError, "recovery must be one of none, reissue, fail, wait"),
    (dict(size=1 << 20, recovery=1), ValueError, "recovery must be one of"),
    (dict(size=1 << 20, target_args=b"file=/x"), TypeError, "target_args must be a str or None"),
    (dict(size=1 << 20, target_args="a\0b"), ValueError, "target_args contains a NUL"),
])
def test_bad_arguments(kw, exc, text):
    with pytest.raises(exc, match=text):
        pyublk.Device(Reader(), **kw)


def test_non_target_object():
    with pytest.raises(TypeError, match="neither handle"):
        pyublk.Device(object(), size=1 << 20)


@pytest.mark.parametrize("args, exc, text", [
    ((Reader(), -1), ValueError, "dev_id must be a non-negative int"),
    ((Reader(), "3"), ValueError, "dev_id must be a non-negative int"),
    ((object(), 3), TypeError, "neither handle"),
])
def test_recover_bad_arguments(args, exc, text):
    with pytest.raises(exc, match=text):
        pyublk.Device.recover(*args)


def test_recover_without_state_file(tmp_path):
    """No state file for the id: ENOENT before the kernel is asked."""
    with pytest.raises(pyublk.UblkError) as e:
        pyublk.Device.recover(Reader(), 4000, state_dir=str(tmp_path))
    assert e.value.errno == errno.ENOENT, e.value
    assert "4000" in str(e.value), e.value


def test_recovery_names_match_constants():
    from pyublk import _device as D
    assert {k: v for k, v in L.CONSTANTS.items() if k.startswith("UBLK_RECOVERY_")} == \
        {f"UBLK_RECOVERY_{k.upper()}": v for k, v in D._RECOVERY.items()}


def test_library_search_names_what_it_tried(monkeypatch):
    monkeypatch.setattr(L, "_candidates", lambda: ["/nonexistent/libublk.so"])
    with pytest.raises(OSError, match="/nonexistent/libublk.so"):
        L.load()


def test_pyublk_lib_env_is_used(monkeypatch):
    lib = L.lib()  # found by the normal search
    path = os.environ.get("PYUBLK_LIB")
    monkeypatch.setenv("PYUBLK_LIB", "/elsewhere/libublk.so")
    assert "/elsewhere/libublk.so" in L._candidates()
    assert lib.ublk_strerror(-22).decode().startswith("EINVAL")
    del path
