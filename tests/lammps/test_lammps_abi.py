"""The C ABI between plugin and runtime: one header, one ctypes mirror, one version number.

The header is compiled into a small program that prints every struct's size and every field's
offset; the ctypes classes of ``ltau_lmp.lammps.abi`` must agree field for field. A plugin and a
runtime of different ABI versions refuse each other with "rebuild the plugin".
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps import abi, plugin_path

HEADER = Path(abi.__file__).parent / "plugin" / "ltau_abi.h"


def _header_fields() -> dict[str, list[str]]:
    """Field names of every typedef'd struct in the header, in declaration order."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    return {name: [re.search(r"(\w+)\s*(\[\d+\])?$", decl.strip()).group(1)
                   for decl in body.split(";") if decl.strip()]
            for name, body in re.findall(r"typedef struct (\w+) \{(.*?)\}", text, flags=re.S)}


def _compiled_layout(tmp_path: Path) -> dict[str, dict[str, int]]:
    fields = _header_fields()
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{HEADER}"', "int main(void) {"]
    for struct, names in fields.items():
        lines.append(f'  printf("{struct} sizeof %zu\\n", sizeof({struct}));')
        for name in names:
            lines.append(f'  printf("{struct} {name} %zu\\n", offsetof({struct}, {name}));')
    lines += ['  printf("version %d msglen %d\\n", LTAU_ABI_VERSION, LTAU_MSGLEN);', "  return 0;", "}"]
    src, exe = tmp_path / "layout.c", tmp_path / "layout"
    src.write_text("\n".join(lines))
    compiler = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([compiler, str(src), "-o", str(exe)], check=True)
    layout: dict[str, dict[str, int]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        parts = line.split()
        if parts[0] == "version":
            layout["_constants"] = {"version": int(parts[1]), "msglen": int(parts[3])}
        else:
            layout.setdefault(parts[0], {})[parts[1]] = int(parts[2])
    return layout


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_ctypes_mirror_matches_the_header(tmp_path):
    layout = _compiled_layout(tmp_path)
    assert layout.pop("_constants") == {"version": abi.ABI_VERSION, "msglen": abi.MSGLEN}
    assert set(layout) == set(abi.STRUCTS)
    for struct, offsets in layout.items():
        mirror = abi.STRUCTS[struct]
        c_names = [n for n in offsets if n != "sizeof"]
        py_names = [n.rstrip("_") if n == "global_" else n for n, *_ in mirror._fields_]
        assert py_names == c_names, struct
        assert ctypes.sizeof(mirror) == offsets["sizeof"], struct
        for (py_name, *_), c_name in zip(mirror._fields_, c_names):
            assert getattr(mirror, py_name).offset == offsets[c_name], (struct, c_name)


def test_version_mismatch_is_refused_by_both_sides(monkeypatch):
    """A stale plugin (or a stale runtime) stops with "rebuild the plugin", never reads garbage."""
    from ltau_lmp.lammps.driver import create_lammps

    lmp = create_lammps(log="none", screen=False)      # registers the real table
    try:
        lib = ctypes.CDLL(plugin_path(), mode=ctypes.RTLD_GLOBAL)
        lib.ltau_abi_version.restype = ctypes.c_int32
        assert lib.ltau_abi_version() == abi.ABI_VERSION
        # the runtime refuses a plugin of another version
        monkeypatch.setattr(abi, "ABI_VERSION", abi.ABI_VERSION + 1)
        with pytest.raises(LTAUError, match=r"rebuild the plugin \(`pip install -e \.`\)"):
            abi.register(lib, plugin_path(), abi.Callbacks(abi_version=abi.ABI_VERSION))
        monkeypatch.undo()
        # the plugin refuses a table of another version, and its styles then say why
        lib.ltau_set_callbacks.restype = ctypes.c_int32
        lib.ltau_set_callbacks.argtypes = [ctypes.POINTER(abi.Callbacks)]
        stale = abi.Callbacks(abi_version=abi.ABI_VERSION + 7)
        assert lib.ltau_set_callbacks(ctypes.byref(stale)) == abi.ABI_VERSION
        with pytest.raises(Exception, match=r"speaks C ABI version \d+ but the Python runtime speaks "
                                            rf"version {abi.ABI_VERSION + 7}: rebuild the plugin"):
            lmp.commands_string("units metal\nregion b block 0 5 0 5 0 5\ncreate_box 1 b\npair_style ltau\n")
    finally:
        # put the real table back for the rest of the session
        from ltau_lmp.lammps import bridge

        table = next(iter(bridge._registered.values()))[1]
        lib.ltau_set_callbacks(ctypes.byref(table))
        lmp.close()
