"""SASS as ``nvdisasm -gi -c`` prints it for sm_90: parsing, control flow, launch constants, loops, and
the instructions one thread issues per launch.

Pure text in, numbers out (no files, no tools): :func:`parse` reads a disassembly into
:class:`Function` objects, :func:`analyze` counts one of them. The model is described in
:mod:`benchmarks.sm90`; in short:

* basic blocks and edges from the branches (``CALL`` returns to the next instruction, so the
  subroutines it reaches, the 64-bit division and similar slow paths, are never counted);
* launch constants: a forward propagation of the values the launch fixes (kernel parameters read from
  ``c[0x0][...]``, immediates) through a small set of integer and predicate instructions; a branch whose
  predicate is known never takes its other edge (nvcc versions loops on runtime sizes such as the tree
  depth D and unrolls ``kMaxDepth`` loops with exits at D: only the code that runs is counted);
* loops are the natural loops of the back edges; each is mapped to a source loop through the line
  chain of its back edge (or header) and gets the ``trips`` of that loop's ``sm90:`` annotation;
  several SASS loops of one source loop at the same call site (unrolled main loop plus remainder) share
  its trips; copies inlined at different call sites each get them;
* block frequencies inside a loop body (or the function body): 1 on both sides of an ordinary
  branch (a warp issues both when its threads diverge), 0 on the cold side of a branch annotated
  ``sm90: cold``, the annotated share on the guarded side of a branch annotated ``sm90: share=<expr>``
  (warp-uniform: only those warps issue it), and never more than the block's dominator (a join issues
  once);
* the count is the sum over blocks of instructions × frequency × the trips of every enclosing loop.
"""
from __future__ import annotations

import math
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

Loc = Tuple[str, int]  # (file, line) as nvdisasm prints it

__all__ = ["Annotation", "SassError", "Instr", "Function", "Analysis", "LoopInfo", "parse", "analyze",
           "load_bits", "resource_usage"]


class SassError(Exception):
    """The SASS cannot be modelled (an unannotated loop, irreducible control flow, ...)."""


@dataclass(frozen=True)
class Annotation:
    """What an ``sm90:`` comment on a source line says: the loop's trip count expression, that the
    branch on this line skips cold code, that the line loads the logits, the share of a thread's executions
    that enter the code the branch on this line guards (an expression: a branch on the warp index that
    one warp of CH takes, ``share=1/CH``), and the memory instructions one iteration of the loop on this line
    issues in its own body (an expression, ``mem``: tells a loop that the compiler unrolled without a remainder
    copy, its body then u times that, from one that it did not)."""
    trips: Optional[str] = None
    cold: bool = False
    logits: bool = False
    share: Optional[str] = None
    mem: Optional[str] = None


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class Instr:
    index: int
    addr: int
    pred: Optional[str]  # "P0", "!P0", "UP1", ... or None
    opcode: str  # "ISETP.GE.U32.AND"
    operands: List[str]
    chain: Tuple[Loc, ...]  # innermost first; empty without line info
    target: Optional[str] = None  # label of a branch or call

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def mods(self) -> List[str]:
        return self.opcode.split(".")[1:]

    def __str__(self) -> str:
        p = f"@{self.pred} " if self.pred else ""
        ops = self.operands + ([f"`({self.target})"] if self.target else [])
        return f"/*{self.addr:04x}*/ {p}{self.opcode} {', '.join(ops)}".rstrip()


@dataclass
class Function:
    name: str
    instrs: List[Instr]
    labels: Dict[str, int]  # label -> index of the instruction after it


_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)\s*,")
_LOC = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(.*)$')
_INLINED = re.compile(r'inlined at "([^"]+)", line (\d+)')
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^([.$A-Za-z_][\w.$@]*):\s*$")
_TARGET = re.compile(r"`\(([^)]+)\)")
_PRED = re.compile(r"^@(!?U?P[0-6T])\s+(.*)$")


def _split_operands(s: str) -> List[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    last = "".join(cur).strip()
    if last:
        out.append(last)
    return out


def parse(text: str) -> Dict[str, Function]:
    """Functions of an ``nvdisasm -gi -c`` listing by (mangled) name."""
    funcs: Dict[str, Function] = {}
    cur: Optional[Function] = None
    pending: List[Loc] = []
    chain: Tuple[Loc, ...] = ()
    for raw in text.splitlines():
        m = _SECTION.match(raw)
        if m:
            cur = Function(m.group(1), [], {})
            funcs[cur.name] = cur
            pending, chain = [], ()
            continue
        if cur is None:
            continue
        m = _LOC.match(raw)
        if m:
            for loc in [(m.group(1), int(m.group(2)))] + [(f, int(n)) for f, n in _INLINED.findall(m.group(3))]:
                if loc not in pending:
                    pending.append(loc)
            continue
        m = _INSTR.match(raw)
        if m:
            if pending:
                chain, pending = tuple(pending), []
            body = m.group(2).strip()
            pred = None
            pm = _PRED.match(body)
            if pm:
                pred, body = pm.group(1), pm.group(2)
            parts = body.split(None, 1)
            opcode = parts[0]
            rest = parts[1] if len(parts) > 1 else ""
            tm = _TARGET.search(rest)
            target = tm.group(1) if tm else None
            operands = _split_operands(_TARGET.sub("", rest))
            cur.instrs.append(Instr(len(cur.instrs), int(m.group(1), 16), pred, opcode, operands, chain, target))
            continue
        m = _LABEL.match(raw.strip())
        if m and not raw.lstrip().startswith("."+"section"):
            cur.labels[m.group(1)] = len(cur.instrs)
    return funcs


_PTX_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_PTX_FUNC = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)")
_PTX_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+\d+(?:.*?inlined_at\s+(\d+)\s+(\d+)\s+\d+)?")


def ptx_lines(ptx: str) -> Dict[str, Set[Loc]]:
    """The (file, line) pairs each function's ``.loc`` directives name (inlined-at call sites included)."""
    files: Dict[str, str] = {}
    raw: Dict[str, Set[Tuple[str, int]]] = {}
    cur: Optional[str] = None
    for line in ptx.splitlines():
        m = _PTX_FILE.match(line)
        if m:
            files[m.group(1)] = m.group(2)
            continue
        m = _PTX_FUNC.match(line)
        if m:
            cur = m.group(1)
            raw.setdefault(cur, set())
            continue
        m = _PTX_LOC.match(line)
        if m and cur is not None:
            raw[cur].add((m.group(1), int(m.group(2))))
            if m.group(3):
                raw[cur].add((m.group(3), int(m.group(4))))
    return {fn: {(files.get(f, f), n) for f, n in locs if n > 0} for fn, locs in raw.items()}


def repair_lines(fn: Function, valid: Set[Loc], norm: Callable[[str], Optional[str]]) -> Tuple[int, int]:
    """Fixes line-chain entries whose file is wrong, using the function's PTX ``.loc`` pairs ``valid``.

    ptxas 13.0 sometimes writes the wrong file into the line table (a math header's line 284 shows up as
    common.cuh:284, a file of 127 lines) while the line number is right. An entry naming a repository
    file (``norm`` gives its repository path, else None) at a line the PTX never names there is renamed
    to the one repository file whose line the PTX does name; returns (renamed, left unresolved)."""
    valid_n = {(norm(f), n) for f, n in valid if norm(f)}
    by_line: Dict[int, List[str]] = {}
    for f, n in valid_n:
        by_line.setdefault(n, []).append(f)
    fixed = unresolved = 0
    cache: Dict[Loc, Loc] = {}
    for ins in fn.instrs:
        new = []
        for loc in ins.chain:
            if loc not in cache:
                rel = norm(loc[0])
                out = loc
                if rel is not None and (rel, loc[1]) not in valid_n:
                    cands = [f for f in by_line.get(loc[1], []) if f != rel]
                    if len(cands) == 1:
                        out = (cands[0], loc[1])
                cache[loc] = out
            new.append(cache[loc])
        new_t = tuple(new)
        if new_t != ins.chain:
            fixed += 1
        elif any(norm(f) is not None and (norm(f), n) not in valid_n for f, n in ins.chain):
            unresolved += 1
        ins.chain = new_t
    return fixed, unresolved


# --------------------------------------------------------------------------------- control flow
_TERMINAL = {"EXIT", "RET", "BPT"}
_INDIRECT = {"BRX", "JMX", "JMP", "BRXU"}


def _is_branch(ins: Instr) -> bool:
    return ins.base == "BRA"


def _never(ins: Instr) -> bool:  # @!PT: never executes
    return ins.pred in ("!PT", "!UPT")


def _conditional(ins: Instr) -> bool:
    return (ins.pred is not None and ins.pred not in ("PT", "UPT")) or "DIV" in ins.mods


@dataclass
class Block:
    id: int
    start: int
    end: int  # exclusive
    succs: List[Tuple[int, str]] = field(default_factory=list)  # (block, "taken" | "fall")


def _blocks(fn: Function) -> Tuple[List[Block], Dict[int, int]]:
    n = len(fn.instrs)
    if n == 0:
        raise SassError(f"{fn.name}: no instructions")
    leaders = {0}
    for ins in fn.instrs:
        if ins.base in _INDIRECT:
            raise SassError(f"{fn.name}: indirect branch {ins} is not modelled")
        if _is_branch(ins) and not _never(ins):
            if ins.target not in fn.labels:
                raise SassError(f"{fn.name}: branch to unknown label {ins.target!r}: {ins}")
            leaders.add(fn.labels[ins.target])
            leaders.add(ins.index + 1)
        elif ins.base in _TERMINAL and not _never(ins):
            leaders.add(ins.index + 1)
    starts = sorted(i for i in leaders if i < n)
    blocks: List[Block] = []
    block_of: Dict[int, int] = {}
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else n
        blocks.append(Block(k, s, e))
        for i in range(s, e):
            block_of[i] = k
    for b in blocks:
        last = fn.instrs[b.end - 1]
        fall = block_of.get(b.end)
        if _is_branch(last) and not _never(last):
            tgt = block_of.get(fn.labels[last.target])
            if tgt is None:
                raise SassError(f"{fn.name}: branch past the end: {last}")
            b.succs.append((tgt, "taken"))
            if _conditional(last) and fall is not None:
                b.succs.append((fall, "fall"))
        elif last.base in _TERMINAL and not _never(last):
            if _conditional(last) and fall is not None:
                b.succs.append((fall, "fall"))
        elif fall is not None:
            b.succs.append((fall, "fall"))
    return blocks, block_of


# ------------------------------------------------------------------------ launch-constant propagation
_M32 = 0xFFFFFFFF
_PREDREG = re.compile(r"^!?U?P[0-6T]$")
_REG = re.compile(r"^(U?R)(\d+|Z)$")


def _is_pred(op: str) -> bool:
    return bool(_PREDREG.match(op)) or op == "PR"


def _reg_name(op: str) -> Optional[str]:
    """'R12' for 'R12', 'R12.reuse'; None for anything else."""
    op = op.split(".reuse")[0]
    return op if _REG.match(op) else None


_CBANK = re.compile(r"^c\[0x0\]\[(0x[0-9a-fA-F]+)\]$")
_IMM = re.compile(r"^-?0x[0-9a-fA-F]+$|^-?\d+$")
_FLOAT = re.compile(r"^\d+(\.\d*)?([eE][-+]?\d+)?$")


class _Env:
    def __init__(self, cbank: Dict[int, int]):
        self.cbank = cbank

    def cword(self, off: int, size: int = 4, signed: bool = False) -> Optional[int]:
        try:
            v = int.from_bytes(bytes(self.cbank[off + k] for k in range(size)), "little", signed=signed)
        except KeyError:
            return None
        return v & _M32

    def fvalue(self, op: str, st: Dict[str, object]) -> Optional[float]:
        """Float value of an FSETP operand (register bits, constant bank, or a float literal)."""
        neg = absv = False
        if op.startswith("-"):
            neg, op = True, op[1:]
        elif op.startswith("+"):
            op = op[1:]
        if op.startswith("|") and op.endswith("|"):
            absv, op = True, op[1:-1]
        if op in ("INF", "QNAN", "NAN"):
            f = math.inf if op == "INF" else math.nan
        elif _FLOAT.match(op):
            f = float(op)
        else:
            bits = self.value(op, st)
            if bits is None or isinstance(bits, bool):
                return None
            f = struct.unpack("<f", struct.pack("<I", bits))[0]
        if absv:
            f = abs(f)
        return -f if neg else f

    def value(self, op: str, st: Dict[str, object]):
        """Integer (32-bit, unsigned) or bool value of an operand, None when unknown."""
        neg = bnot = lnot = False
        if op.startswith("!"):
            lnot, op = True, op[1:]
        elif op.startswith("-") and not _IMM.match(op):
            neg, op = True, op[1:]
        elif op.startswith("~"):
            bnot, op = True, op[1:]
        if op.endswith(".reuse"):
            op = op[: -len(".reuse")]
        if op in ("PT", "UPT"):
            v: object = True
        elif op in ("RZ", "URZ"):
            v = 0
        elif _PREDREG.match(op) or _REG.match(op):
            v = st.get(op)
        elif _IMM.match(op):
            v = int(op, 16) if "0x" in op else int(op)
            v &= _M32
        else:
            m = _CBANK.match(op)
            v = self.cword(int(m.group(1), 16)) if m else None
        if v is None:
            return None
        if lnot:
            return not v
        if neg:
            return (-v) & _M32
        if bnot:
            return (~v) & _M32
        return v


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def _cmp(kind: str, a: int, b: int) -> bool:
    return {"EQ": a == b, "NE": a != b, "LT": a < b, "LE": a <= b, "GT": a > b, "GE": a >= b}[kind]


def _unordered(a: float, b: float) -> bool:
    return math.isnan(a) or math.isnan(b)


_FCMP = {
    "EQ": lambda a, b: a == b, "NE": lambda a, b: not _unordered(a, b) and a != b,
    "LT": lambda a, b: a < b, "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b,
    "EQU": lambda a, b: _unordered(a, b) or a == b, "NEU": lambda a, b: _unordered(a, b) or a != b,
    "LTU": lambda a, b: _unordered(a, b) or a < b, "LEU": lambda a, b: _unordered(a, b) or a <= b,
    "GTU": lambda a, b: _unordered(a, b) or a > b, "GEU": lambda a, b: _unordered(a, b) or a >= b,
    "NUM": lambda a, b: not _unordered(a, b), "NAN": _unordered,
}


def _bop(kind: str, a: bool, b: bool) -> bool:
    return {"AND": a and b, "OR": a or b, "XOR": a != b}[kind]


def _lut3(lut: int, a: int, b: int, c: int, bits: int) -> int:
    mask = (1 << bits) - 1
    out = 0
    for i in range(8):
        if lut >> i & 1:
            out |= (a if i & 4 else ~a) & (b if i & 2 else ~b) & (c if i & 1 else ~c)
    return out & mask


_NO_DEST = {"ST", "STG", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "CALL", "RET", "BAR", "BSSY", "BSYNC",
            "WARPSYNC", "NOP", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "CCTLL", "DEPBAR", "BPT", "YIELD", "BREAK",
            "KILL", "NANOSLEEP", "ARRIVES", "SYNCS", "UCGABAR_ARV", "UCGABAR_WAIT", "ACQBULK", "STSM",
            "UTMACMDFLUSH", "WARPGROUP"}


def _width(ins: Instr) -> int:
    mods = ins.mods
    if "128" in mods:
        return 4
    if "64" in mods or "WIDE" in mods or "F64" in mods or ins.base in ("DADD", "DMUL", "DFMA", "DMNMX", "DSETP"):
        return 2
    return 1


def _regs(first: str, width: int) -> List[str]:
    m = _REG.match(first.split(".")[0])
    if not m or m.group(2) == "Z":
        return []
    return [f"{m.group(1)}{int(m.group(2)) + k}" for k in range(width)]


def _generic_dests(ins: Instr) -> List[str]:
    """Registers an instruction may write (a superset is safe: it only forgets values)."""
    if ins.base in _NO_DEST:
        return []
    ops = ins.operands
    if ins.base.endswith("SETP") or ins.base in ("PLOP3", "UPLOP3"):
        return [o for o in ops[:2]]
    dests: List[str] = []
    i = 0
    while i < len(ops) and _is_pred(ops[i]):
        dests.append(ops[i])
        i += 1
    if i < len(ops) and _reg_name(ops[i]):
        dests += _regs(ops[i], _width(ins))
        i += 1
        while i < len(ops) and _is_pred(ops[i]):
            dests.append(ops[i])
            i += 1
    return dests


def _transfer(ins: Instr, st: Dict[str, object], env: _Env) -> None:
    """Applies ``ins`` to the known values ``st`` in place."""
    if _never(ins):
        return
    guard = True
    if ins.pred:
        guard = env.value(ins.pred, st)
        if guard is False:
            return
    results: Dict[str, object] = {}  # dest -> value (None: unknown)
    ops = ins.operands
    base, mods = ins.base, ins.mods
    v = lambda o: env.value(o, st)  # noqa: E731
    try:
        if base == "R2P" and not mods and len(ops) == 3 and ops[0] == "PR":  # P_i = bit i of Ra, i in mask
            a, mask = v(ops[1]), v(ops[2])
            for i in range(7):
                if mask is None or mask >> i & 1:
                    results[f"P{i}"] = None if a is None or mask is None else bool(a >> i & 1)
        elif "PR" in ops[:1]:  # anything else writing PR: every predicate
            for k in list(st):
                if k.startswith("P") or k.startswith("UP"):
                    del st[k]
            return
        elif base == "P2R" and not mods and len(ops) == 4 and ops[1] == "PR":  # Rd = (PR & mask) | (Rb & ~mask)
            b, mask = v(ops[2]), v(ops[3])
            bits = [v(f"P{i}") for i in range(7)]
            if b is None or mask is None or any(bits[i] is None for i in range(7) if mask >> i & 1):
                results[ops[0]] = None
            else:
                pr = sum(1 << i for i in range(7) if mask >> i & 1 and bits[i])
                results[ops[0]] = (pr | (b & ~mask)) & _M32
        elif base in ("MOV", "UMOV", "MOV32I") and len(ops) >= 2:
            results[ops[0]] = v(ops[1])
        elif base in ("IMAD", "UIMAD") and not ({"HI", "WIDE", "X"} & set(mods)) and len(ops) == 4:
            a, b, c = v(ops[1]), v(ops[2]), v(ops[3])
            results[ops[0]] = None if None in (a, b, c) else (a * b + c) & _M32
        elif base in ("IADD3", "UIADD3") and "X" not in mods:
            dest, rest = ops[0], ops[1:]
            while rest and _is_pred(rest[0]):
                results[rest[0]] = None  # carry out
                rest = rest[1:]
            vals = [v(o) for o in rest[:3]]
            results[dest] = None if None in vals or len(vals) != 3 else sum(vals) & _M32
        elif base in ("VIADD", "UIADD") and not mods and len(ops) == 3:
            a, b = v(ops[1]), v(ops[2])
            results[ops[0]] = None if None in (a, b) else (a + b) & _M32
        elif base in ("LOP3", "ULOP3") and "LUT" in mods and len(ops) >= 5 and not _is_pred(ops[0]):
            a, b, c, lut = v(ops[1]), v(ops[2]), v(ops[3]), v(ops[4])
            results[ops[0]] = None if None in (a, b, c, lut) else _lut3(lut, a, b, c, 32)
        elif base in ("SHF", "USHF") and len(ops) == 4:
            lo, sh, hi = v(ops[1]), v(ops[2]), v(ops[3])
            if None in (lo, sh, hi):
                results[ops[0]] = None
            else:
                val = (hi << 32) | lo
                sh &= 63
                if "L" in mods:
                    val = (val << sh) & ((1 << 64) - 1)
                else:
                    if ("S32" in mods or "S64" in mods) and hi & 0x80000000:
                        val -= 1 << 64
                    val = (val >> sh) & ((1 << 64) - 1)
                results[ops[0]] = (val >> 32) & _M32 if "HI" in mods else val & _M32
        elif base in ("SEL", "USEL", "FSEL") and len(ops) == 4:
            p = v(ops[3])
            results[ops[0]] = None if p is None else v(ops[1] if p else ops[2])
        elif base in ("ISETP", "UISETP"):
            kind = next(m for m in mods if m in ("EQ", "NE", "LT", "LE", "GT", "GE"))
            bop = next(m for m in mods if m in ("AND", "OR", "XOR"))
            a, b, pc = v(ops[2]), v(ops[3]), v(ops[4])
            r = None
            if a is not None and b is not None:
                if "U32" not in mods:
                    a, b = _s32(a), _s32(b)
                if "EX" in mods:
                    pex = v(ops[5])
                    if pex is not None:
                        if kind == "EQ":
                            r = a == b and pex
                        elif kind == "NE":
                            r = a != b or pex
                        else:
                            strict = {"LT": "LT", "LE": "LT", "GT": "GT", "GE": "GT"}[kind]
                            r = _cmp(strict, a, b) or (a == b and pex)
                else:
                    r = _cmp(kind, a, b)
            results[ops[0]] = None if r is None or pc is None else _bop(bop, r, pc)
            results[ops[1]] = None if r is None or pc is None else _bop(bop, not r, pc)
        elif base in ("PLOP3", "UPLOP3") and "LUT" in mods and len(ops) == 7:
            a, b, c = v(ops[2]), v(ops[3]), v(ops[4])
            lut, lut2 = v(ops[5]), v(ops[6])
            if None in (a, b, c):
                results[ops[0]] = results[ops[1]] = None
            else:
                idx = (int(a) << 2) | (int(b) << 1) | int(c)
                results[ops[0]] = None if lut is None else bool(lut >> idx & 1)
                results[ops[1]] = None if lut2 is None else bool(lut2 >> idx & 1)
        elif base in ("LDC", "ULDC") and len(ops) == 2 and _CBANK.match(ops[1]):
            off = int(_CBANK.match(ops[1]).group(1), 16)
            regs = _regs(ops[0], _width(ins))
            size = {"U8": 1, "S8": 1, "U16": 2, "S16": 2}.get(next((m for m in mods if m[1:] in ("8", "16")), ""), 4)
            for k, r in enumerate(regs):
                results[r] = env.cword(off + 4 * k, size, signed=size < 4 and "S" + str(8 * size) in mods)
        elif base == "FSETP":
            kind = next(m for m in mods if m in _FCMP)
            bop = next(m for m in mods if m in ("AND", "OR", "XOR"))
            a, b, pc = env.fvalue(ops[2], st), env.fvalue(ops[3], st), v(ops[4])
            r = None if a is None or b is None else _FCMP[kind](a, b)
            results[ops[0]] = None if r is None or pc is None else _bop(bop, r, pc)
            results[ops[1]] = None if r is None or pc is None else _bop(bop, not r, pc)
        elif base in ("PRMT", "UPRMT") and not mods and len(ops) == 4:
            a, sel, b = v(ops[1]), v(ops[2]), v(ops[3])
            if None in (a, sel, b):
                results[ops[0]] = None
            else:
                src = (a | (b << 32)).to_bytes(8, "little")
                out = 0
                for k in range(4):
                    nib = sel >> (4 * k) & 0xF
                    byte = src[nib & 7]
                    if nib & 8:
                        byte = 0xFF if byte & 0x80 else 0
                    out |= byte << (8 * k)
                results[ops[0]] = out
        elif base == "CS2R" and len(ops) == 2 and ops[1] == "SRZ":
            for r in _regs(ops[0], _width(ins)):
                results[r] = 0
        elif base == "R2UR" and len(ops) == 2:
            results[ops[0]] = v(ops[1])
        else:
            for d in _generic_dests(ins):
                results[d] = None
    except (IndexError, StopIteration, ValueError, KeyError):
        for d in _generic_dests(ins):
            results[d] = None
    for d, val in results.items():
        d = d.split(".reuse")[0]
        if d in ("PT", "UPT", "RZ", "URZ") or d.startswith("!"):
            continue
        if guard is None and st.get(d) != val:
            val = None
        if val is None:
            st.pop(d, None)
        else:
            st[d] = val


def _propagate(fn: Function, blocks: List[Block], env: _Env) -> Tuple[Set[int], Set[Tuple[int, int]]]:
    """Sparse conditional propagation of launch constants: the blocks and edges that can execute."""
    out: Dict[int, Dict[str, object]] = {}
    edges: Set[Tuple[int, int]] = set()
    preds: Dict[int, List[int]] = {b.id: [] for b in blocks}
    work = [0]
    seen: Set[int] = {0}
    in_state: Dict[int, Dict[str, object]] = {0: {}}
    steps = 0
    while work:
        steps += 1
        if steps > 200 * len(blocks) + 1000:
            raise SassError(f"{fn.name}: launch-constant propagation does not settle")
        b = blocks[work.pop()]
        st = dict(in_state[b.id])
        for i in range(b.start, b.end):
            _transfer(fn.instrs[i], st, env)
        changed_out = out.get(b.id) != st
        out[b.id] = st
        last = fn.instrs[b.end - 1]
        succs = list(b.succs)
        if len(succs) == 2 and (_is_branch(last) or last.base == "EXIT") and last.pred and "DIV" not in last.mods:
            p = env.value(last.pred, st)
            if p is not None:
                succs = [s for s in succs if (s[1] == "taken") == bool(p)]
        for s, _ in succs:
            new_edge = (b.id, s) not in edges
            if new_edge:
                edges.add((b.id, s))
                preds[s].append(b.id)
            if not (new_edge or changed_out):
                continue
            states = [out[p] for p in preds[s] if p in out]
            meet = dict(states[0])
            for o in states[1:]:
                for k in list(meet):
                    if o.get(k) != meet[k]:
                        del meet[k]
            if s not in seen or in_state.get(s) != meet:
                seen.add(s)
                in_state[s] = meet
                if s not in work:
                    work.append(s)
    return seen, edges


# ------------------------------------------------------------------------------------ loops
def _dominators(nodes: Sequence[int], entry: int, preds: Dict[int, List[int]],
                succs: Dict[int, List[int]]) -> Dict[int, int]:
    """Immediate dominators (Cooper, Harvey, Kennedy)."""
    order: List[int] = []
    seen = {entry}
    stack = [(entry, iter(succs.get(entry, ())))]
    while stack:
        n, it = stack[-1]
        for s in it:
            if s not in seen:
                seen.add(s)
                stack.append((s, iter(succs.get(s, ()))))
                break
        else:
            order.append(n)
            stack.pop()
    rpo = order[::-1]
    pos = {n: i for i, n in enumerate(rpo)}
    idom = {entry: entry}

    def intersect(a, b):
        while a != b:
            while pos[a] > pos[b]:
                a = idom[a]
            while pos[b] > pos[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for n in rpo[1:]:
            ps = [p for p in preds.get(n, ()) if p in idom]
            if not ps:
                continue
            new = ps[0]
            for p in ps[1:]:
                new = intersect(p, new)
            if idom.get(n) != new:
                idom[n] = new
                changed = True
    return idom


def _dominates(idom: Dict[int, int], a: int, b: int) -> bool:
    while True:
        if a == b:
            return True
        if idom[b] == b:
            return False
        b = idom[b]


@dataclass
class LoopInfo:
    """A SASS loop as counted: where it maps in the source, its trips, and what it costs."""
    header_addr: int
    end_addr: int
    source: Optional[Loc]  # the annotated source loop
    chain: Tuple[Loc, ...]  # line chain of its back edge
    inlined_at: Tuple[Loc, ...] = ()  # the call sites of the annotated loop, innermost first
    trips: float = 1.0  # iterations per execution of its enclosing code, as counted
    source_trips: float = 1.0  # the annotation's value (before splitting among unrolled copies)
    unroll: int = 1
    body: float = 0.0  # instructions per iteration (its own blocks, nested loops excluded)
    total: float = 0.0  # instructions per thread, nested loops included
    depth: int = 1
    parent: Optional[int] = None  # index in Analysis.loops


@dataclass
class Analysis:
    function: str
    instructions: float  # per thread per launch
    static_instructions: int
    reached_instructions: int
    loops: List[LoopInfo]
    cold: List[dict]  # per cold branch: line, skipped instructions
    calls: List[str]  # subroutines called (not counted)
    load_bits: Optional[int]  # widest LDG of the logits
    load_widths: List[int]
    warnings: List[str]
    counts: Dict[int, float] = field(default_factory=dict)  # instruction index -> executions per thread
    mufu: float = 0.0  # of which MUFU (special-function unit: ex2, lg2, rcp, ...) instructions


_MEMORY = {"LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "ATOMG", "ATOMS", "ATOM", "RED", "REDG"}


def load_bits(ins: Instr) -> int:
    """Width in bits of a load: LDG.E.128 -> 128, .64 -> 64, .U16/.S16 -> 16, .U8/.S8 -> 8, else 32."""
    for m in ins.mods:
        if m in ("128", "64", "32", "16", "8"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


def analyze(fn: Function, annotation: Callable[[Loc], Optional[Annotation]],
            trips: Callable[[str, Loc], float], cbank: Optional[Dict[int, int]] = None,
            unannotated: str = "error") -> Analysis:
    """Instructions one thread of ``fn`` issues per launch.

    ``annotation(loc)``: the ``sm90:`` annotation of a source line or None; ``trips(expr, loc)``: the
    value of a trips expression; ``cbank``: known bytes of constant bank 0 (kernel parameters at their
    offsets) for the launch-constant propagation; ``unannotated``: "error" (raise :class:`SassError`) or
    "warn" (count such a loop once per entry and report it).
    """
    blocks, block_of = _blocks(fn)
    env = _Env(cbank or {})
    reached, edges = _propagate(fn, blocks, env)
    succs: Dict[int, List[int]] = {b: [] for b in reached}
    preds: Dict[int, List[int]] = {b: [] for b in reached}
    for a, b in sorted(edges):
        succs[a].append(b)
        preds[b].append(a)
    idom = _dominators(sorted(reached), 0, preds, succs)
    warnings: List[str] = []

    def chain_of(i: int) -> Tuple[Loc, ...]:
        return fn.instrs[i].chain

    def annotated(chain: Iterable[Loc], what: str) -> Optional[Loc]:
        for loc in chain:
            a = annotation(loc)
            if a is not None and getattr(a, what):
                return loc
        return None

    logits_instr = [ins for ins in fn.instrs if ins.base in ("LDG", "LD") and annotated(ins.chain, "logits")]
    logits_blocks = {block_of[ins.index] for ins in logits_instr}

    # Loops: natural loops of the back edges, merged by header.
    bodies: Dict[int, Set[int]] = {}
    latches: Dict[int, List[int]] = {}
    for a, b in edges:
        if b in reached and _dominates(idom, b, a):
            body = bodies.setdefault(b, {b})
            latches.setdefault(b, []).append(a)
            stack = [a]
            while stack:
                n = stack.pop()
                if n not in body:
                    body.add(n)
                    stack.extend(preds[n])
        elif blocks[b].start <= blocks[a].start:
            # a retreating edge that is not a back edge: the loop has two entries
            raise SassError(f"{fn.name}: irreducible control flow at {fn.instrs[blocks[a].end - 1]}")
    headers = sorted(bodies, key=lambda h: (len(bodies[h]), h))
    parent: Dict[int, Optional[int]] = {}
    for h in headers:
        cands = [g for g in headers if g != h and h in bodies[g] and bodies[h] <= bodies[g]]
        parent[h] = min(cands, key=lambda g: len(bodies[g])) if cands else None

    def ancestors(h):
        p = parent[h]
        while p is not None:
            yield p
            p = parent[p]

    # Source loop of each SASS loop, and the call sites it is inlined at (the chain after the annotated
    # line): copies of one loop inlined at different call sites are different loops, each with its trips.
    source: Dict[int, Optional[Loc]] = {}
    inlined_at: Dict[int, Tuple[Loc, ...]] = {}
    back_chain: Dict[int, Tuple[Loc, ...]] = {}

    def annotated_in(chain: Sequence[Loc], taken: Set[Loc]) -> Tuple[Optional[Loc], Tuple[Loc, ...]]:
        rest = [c for c in chain if c not in taken]
        loc = annotated(rest, "trips")
        return (loc, tuple(rest[rest.index(loc) + 1:])) if loc else (None, ())

    for h in sorted(bodies, key=lambda h: -len(bodies[h])):  # outer loops first
        taken_by_outer = {source[g] for g in ancestors(h) if source.get(g)}
        latch_chains = [chain_of(blocks[a].end - 1) for a in latches[h]]
        back_chain[h] = latch_chains[0] if latch_chains else ()
        loc, sites = None, ()
        for ch in latch_chains + [chain_of(blocks[h].start)]:
            loc, sites = annotated_in(ch, taken_by_outer)
            if loc:
                break
        if loc is None:  # the annotated loop line most of the loop's own instructions carry
            own = Counter()
            for n in bodies[h] - set().union(*[bodies[g] for g in bodies if g != h and bodies[g] < bodies[h]]):
                for i in range(blocks[n].start, blocks[n].end):
                    l2 = annotated_in(chain_of(i), taken_by_outer)
                    if l2[0]:
                        own[l2] += 1
            if own:
                loc, sites = own.most_common(1)[0][0]
        source[h], inlined_at[h] = loc, sites
        if loc is None:
            where = " <- ".join(f"{f}:{n}" for f, n in back_chain[h]) or "no line information"
            msg = (f"{fn.name}: the SASS loop at /*{fn.instrs[blocks[h].start].addr:04x}*/ maps to no source loop "
                   f"annotated 'sm90: trips=...' (back edge at {where})")
            if unannotated == "error":
                raise SassError(msg)
            warnings.append(msg + "; counted with trips=1")

    # Trips, with unrolled copies of one source loop (same parent) sharing the annotation's trips. The
    # unroll factor of each copy is its count of memory instructions over the smallest copy's (each
    # iteration's loads and stores are repeated u times, the loop control is not), or the ratio of the
    # body sizes where the copies access no memory; with a ``mem`` annotation, its count over that (a loop
    # of constant trips unrolled without a remainder is a single copy whose body is u iterations).
    def own_instrs(h) -> List[Instr]:
        inner = set().union(*[bodies[g] for g in bodies if g != h and parent.get(g) == h]) if bodies else set()
        return [fn.instrs[i] for n in bodies[h] - inner for i in range(blocks[n].start, blocks[n].end)]

    def size(h) -> int:
        return len(own_instrs(h))

    def memory(h) -> int:
        return sum(1 for ins in own_instrs(h) if ins.base in _MEMORY)

    loop_trips: Dict[int, float] = {}
    loop_unroll: Dict[int, int] = {}
    loop_src_trips: Dict[int, float] = {}
    groups: Dict[Tuple, List[int]] = {}
    equal_groups: List[tuple] = []
    for h in bodies:
        if source[h] is None:
            loop_trips[h], loop_unroll[h], loop_src_trips[h] = 1.0, 1, 1.0
        else:
            groups.setdefault((parent[h], source[h], inlined_at[h]), []).append(h)
    for (_, loc, _), hs in groups.items():
        T = float(trips(annotation(loc).trips, loc))
        for h in hs:
            loop_src_trips[h] = T
        mem = annotation(loc).mem
        if len(hs) == 1 and mem is None:
            loop_trips[hs[0]], loop_unroll[hs[0]] = T, 1
            continue
        us = {}
        if mem is not None:
            per = float(trips(mem, loc))
            for h in hs:
                u = memory(h) / per if per > 0 else 0.0
                if u < 1 or abs(u - round(u)) > 1e-9:
                    raise SassError(f"{fn.name}: a SASS loop of {loc[0]}:{loc[1]} with {memory(h)} memory "
                                    f"instructions in its own body, not a multiple of its annotated mem={mem} "
                                    f"({per:g})")
                us[h] = int(round(u))
            if len(hs) == 1:
                loop_trips[hs[0]], loop_unroll[hs[0]] = T / us[hs[0]], us[hs[0]]
                continue
        else:
            ref = min(hs, key=size)
            for h in hs:
                if h == ref:
                    us[h] = 1
                elif memory(ref) and memory(h):
                    us[h] = max(1, int(round(memory(h) / memory(ref))))
                else:
                    us[h] = max(1, int(round(size(h) / max(size(ref), 1))))
        if len(set(us.values())) < len(hs):
            equal_groups.append((loc, hs, us))
        left = T
        for u in sorted(set(us.values()), reverse=True):
            if u == 1:
                n = left
            elif abs(left - round(left)) < 1e-9:
                n = float(int(round(left)) // u)
            else:
                n = (left - min(left, (u - 1) / 2)) / u
            for h in hs:
                if us[h] == u:
                    loop_trips[h], loop_unroll[h] = n, u
            left = left - n * u

    def annotated_branches(what: str):
        """(block, branch, annotated line) of every two-way branch on a line annotated with ``what``."""
        for b in sorted(reached):
            last = fn.instrs[blocks[b].end - 1]
            if _is_branch(last) and len(succs[b]) == 2:
                loc = annotated(last.chain, what)
                if loc is not None:
                    yield b, last, loc

    # Cold branches: the side of a branch on an 'sm90: cold' line that loads no logits gets frequency 0.
    zero_edges: Set[Tuple[int, int]] = set()
    cold_report: List[dict] = []
    for b, last, loc in annotated_branches("cold"):
        regions = {}
        for s in succs[b]:
            if preds[s] == [b]:
                regions[s] = {n for n in reached if _dominates(idom, s, n)}
            else:
                regions[s] = set()
        (s1, r1), (s2, r2) = regions.items()
        loads1, loads2 = bool(r1 & logits_blocks), bool(r2 & logits_blocks)
        if loads1 != loads2:  # the side that reads the logits is the hot one
            cold = s2 if loads1 else s1
        elif r1 and not r2:  # the branch skips (or jumps out of line to) code of its own
            cold = s1
        elif r2 and not r1:
            cold = s2
        else:
            warnings.append(f"{fn.name}: cannot tell the cold side of the branch {last} "
                            f"({loc[0]}:{loc[1]}): counted as an ordinary branch")
            continue
        if regions[cold] & logits_blocks:
            warnings.append(f"{fn.name}: the cold side of {last} loads logits")
        zero_edges.add((b, cold))
        cold_report.append({"line": loc, "branch": f"{last.addr:04x}",
                            "skipped": sum(blocks[n].end - blocks[n].start for n in regions[cold])})

    # Shared branches: the side of a branch on an 'sm90: share=<expr>' line with code of its own (the code the
    # branch guards) gets the expression's value as its frequency.
    edge_share: Dict[Tuple[int, int], float] = {}
    for b, last, loc in annotated_branches("share"):
        sides = [s for s in succs[b] if preds[s] == [b]]
        if len(sides) != 1:
            warnings.append(f"{fn.name}: cannot tell the guarded side of the branch {last} ({loc[0]}:{loc[1]}): "
                            f"counted as an ordinary branch")
            continue
        edge_share[(b, sides[0])] = min(max(float(trips(annotation(loc).share, loc)), 0.0), 1.0)

    # Frequencies region by region (the function body, then each loop body), inner loops collapsed.
    children: Dict[Optional[int], List[int]] = {}
    for h in bodies:
        children.setdefault(parent[h], []).append(h)
    weight: Dict[int, float] = {}  # block -> executions per thread
    loop_weight: Dict[int, float] = {}  # header -> executions of the loop's entry per thread
    all_blocks = set(reached)

    def region(h: Optional[int], w: float) -> None:
        members = bodies[h] if h is not None else all_blocks
        entry = h if h is not None else 0
        kids = children.get(h, [])
        node = {}
        for k in kids:
            for n in bodies[k]:
                node[n] = ("L", k)
        for n in members:
            node.setdefault(n, ("B", n))
        dag_preds: Dict[tuple, List[Tuple[tuple, float]]] = {}
        dag_succs: Dict[tuple, Set[tuple]] = {}
        for a in members:
            for s in succs[a]:
                if s not in members or (h is not None and s == h):
                    continue
                na, ns = node[a], node[s]
                if na == ns:
                    continue
                f = 0.0 if (a, s) in zero_edges else edge_share.get((a, s), 1.0)
                dag_preds.setdefault(ns, []).append((na, f))
                dag_succs.setdefault(na, set()).add(ns)
        start = node[entry]
        nodes = set(node.values())
        indeg = {n: 0 for n in nodes}
        for n, ps in dag_preds.items():
            indeg[n] = len({p for p, _ in ps})
        order, ready = [], [start]
        indeg[start] = 0
        done = set()
        while ready:
            n = ready.pop()
            if n in done:
                continue
            done.add(n)
            order.append(n)
            for s in sorted(dag_succs.get(n, ())):
                indeg[s] -= 1
                if indeg[s] == 0:
                    ready.append(s)
        unreached = [n for n in nodes if n not in done and dag_preds.get(n)]
        if unreached:
            raise SassError(f"{fn.name}: a cycle that is not a natural loop (irreducible control flow)")
        dpos = {n: i for i, n in enumerate(order)}
        didom: Dict[tuple, tuple] = {start: start}
        freq: Dict[tuple, float] = {start: 1.0}
        for n in order[1:]:
            ps = [(p, f) for p, f in dag_preds.get(n, []) if p in freq]
            if not ps:
                freq[n] = 0.0
                didom[n] = start
                continue
            d = ps[0][0]
            for p, _ in ps[1:]:
                a, b2 = d, p
                while a != b2:
                    if dpos[a] > dpos[b2]:
                        a = didom[a]
                    else:
                        b2 = didom[b2]
                d = a
            didom[n] = d
            freq[n] = min(sum(freq[p] * f for p, f in ps), freq[d])
        for n in nodes:
            f = freq.get(n, 0.0)
            if n[0] == "B":
                weight[n[1]] = w * f
            else:
                k = n[1]
                loop_weight[k] = w * f
                region(k, w * f * loop_trips[k])

    region(None, 1.0)
    for loc, hs, us in equal_groups:
        live = [h for h in hs if loop_weight.get(h, 0.0) > 0]
        if len({us[h] for h in live}) < len(live):
            warnings.append(f"{fn.name}: {len(hs)} SASS loops of {loc[0]}:{loc[1]} with unroll factors "
                            f"{sorted(us.values(), reverse=True)}: loops with equal factors (versions the "
                            f"launch constants did not tell apart) are each counted with the full trips")

    total = sum(weight[b] * (blocks[b].end - blocks[b].start) for b in reached)
    infos: List[LoopInfo] = []
    idx = {}
    for h in sorted(bodies, key=lambda h: blocks[h].start):
        idx[h] = len(infos)
        own = bodies[h] - set().union(*[bodies[k] for k in children.get(h, [])])
        w_it = loop_weight.get(h, 0.0) * loop_trips[h]
        body = sum(weight.get(n, 0.0) * (blocks[n].end - blocks[n].start) for n in own) / w_it if w_it else 0.0
        tot = sum(weight.get(n, 0.0) * (blocks[n].end - blocks[n].start) for n in bodies[h])
        end = max(blocks[n].end for n in bodies[h])
        infos.append(LoopInfo(fn.instrs[blocks[h].start].addr, fn.instrs[end - 1].addr, source[h], back_chain[h],
                              inlined_at[h], loop_trips[h], loop_src_trips[h], loop_unroll[h], body, tot,
                              1 + sum(1 for _ in ancestors(h))))
    for h, i in idx.items():
        if parent[h] is not None:
            infos[i].parent = idx[parent[h]]
    calls = sorted({fn.instrs[i].target for b in reached for i in range(blocks[b].start, blocks[b].end)
                    if fn.instrs[i].base == "CALL" and fn.instrs[i].target})
    widths = sorted({load_bits(ins) for ins in logits_instr if block_of[ins.index] in reached})
    counts = {i: weight[b] for b in reached for i in range(blocks[b].start, blocks[b].end)}
    return Analysis(fn.name, total, len(fn.instrs), sum(blocks[b].end - blocks[b].start for b in reached), infos,
                    cold_report, calls, max(widths) if widths else None, widths, warnings, counts,
                    sum(n for i, n in counts.items() if fn.instrs[i].base == "MUFU"))


def listing(fn: Function, analysis: Analysis, name: Callable[[Loc], str] = lambda loc: f"{loc[0]}:{loc[1]}") -> str:
    """The function's SASS with each instruction's executions per thread in front ('-': never runs:
    a version of the code the launch constants rule out, cold code, a called slow path, padding), and
    a line-chain comment where it changes: the way to check what the model counted."""
    out, last = [], None
    for ins in fn.instrs:
        if ins.chain != last:
            out.append("        // " + " <- ".join(name(loc) for loc in ins.chain))
            last = ins.chain
        labels = [lab for lab, i in fn.labels.items() if i == ins.index and lab.startswith((".L", "$"))]
        out.extend(f"{lab}:" for lab in labels)
        c = analysis.counts.get(ins.index)
        out.append(f"{'-' if not c else f'{c:g}':>10}  {ins}")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------- resource usage
_RES_FN = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_VALS = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG", "STACK", "SHARED", "LOCAL"}}."""
    out: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = _RES_FN.match(line)
        if m:
            cur = m.group(1).rstrip(":")
            continue
        if cur is not None and "REG:" in line:
            out[cur] = {k: int(v) for k, v in _RES_VALS.findall(line)}
            cur = None
    return out
