"""What the model reads from a cubin's ELF without running a tool: its kernels' symbol indices (for
``nvdisasm -fun``, so that one kernel of a cubin of hundreds is disassembled) and their parameter layouts
(``EIATTR_KPARAM_INFO`` in each kernel's ``.nv.info.<name>`` section, what ``cuobjdump -elf`` prints).

ELF64, little-endian (every cubin). The ``.nv.info`` attribute stream is a run of records
``{u8 format, u8 attribute, ...}``: format 0x04 (EIFMT_SVAL) is followed by a u16 size and that many bytes,
the others (EIFMT_NVAL 0x01, EIFMT_BVAL 0x02, EIFMT_HVAL 0x03) by two bytes of value. A KPARAM_INFO (0x17)
value is {u32 index, u16 ordinal, u16 offset, u32 flags} with the size in bytes in the flags' upper 14 bits
(bits 18..31).
"""
from __future__ import annotations

import struct
from typing import Dict, List, Tuple

__all__ = ["ElfError", "sections", "functions", "kparams"]

_EIFMT_SVAL = 0x04
_EIATTR_KPARAM_INFO = 0x17
_STT_FUNC = 2


class ElfError(ValueError):
    """Not a cubin this reader understands."""


def sections(data: bytes) -> List[Tuple[str, int, int, int, int, int]]:
    """Every section header as (name, type, offset, size, link, entry size)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = raw[shstrndx][4]

    def name(off: int) -> str:
        end = data.index(b"\0", names_off + off)
        return data[names_off + off:end].decode()

    return [(name(h[0]), h[1], h[4], h[5], h[6], h[9]) for h in raw]


def functions(data: bytes) -> Dict[str, int]:
    """{kernel or device function name: its index in the symbol table} (the indices ``nvdisasm -fun`` takes)."""
    secs = sections(data)
    symtab = [s for s in secs if s[0] == ".symtab"]
    if len(symtab) != 1:
        raise ElfError(f"expected one .symtab, found {len(symtab)}")
    _, _, off, size, link, ent = symtab[0]
    stroff = secs[link][2]
    out: Dict[str, int] = {}
    for i in range(size // ent):
        st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", data, off + i * ent)
        if st_info & 0xF == _STT_FUNC and st_shndx:
            end = data.index(b"\0", stroff + st_name)
            out[data[stroff + st_name:end].decode()] = i
    return out


def kparams(data: bytes) -> Dict[str, List[tuple]]:
    """{function: [(ordinal, offset, size)]} from EIATTR_KPARAM_INFO, sorted by ordinal (the same as
    :func:`benchmarks.sm90.tools.kparams`, which reads ``cuobjdump -elf``)."""
    out: Dict[str, List[tuple]] = {}
    for name, _, off, size, _, _ in sections(data):
        if not name.startswith(".nv.info."):
            continue
        params = []
        p, end = off, off + size
        while p < end:
            fmt, attr = data[p], data[p + 1]
            if fmt == _EIFMT_SVAL:
                n, = struct.unpack_from("<H", data, p + 2)
                if attr == _EIATTR_KPARAM_INFO:
                    _, ordinal, offset, flags = struct.unpack_from("<IHHI", data, p + 4)
                    params.append((ordinal, offset, flags >> 18))
                p += 4 + n
            else:
                p += 4
        if params:
            out[name[len(".nv.info."):]] = sorted(params)
    return out
