"""The static sm_90 model (benchmarks/sm90): the SASS analysis on small hand-written listings, the
annotations and variables, and one Triton kernel compiled end to end (skipped without ptxas/nvdisasm)."""
import textwrap
import types
from pathlib import Path

import pytest
import torch

from benchmarks.sm90 import model, sass, source
from benchmarks.sm90.sass import Annotation, SassError
from hss_kernels import trees

F = "/repo/csrc/k.cu"


def listing(body: str, name: str = "k") -> str:
    """nvdisasm-style text of one function: lines "L<n>: <instr>" get a line comment for source line n,
    "label:" lines stay labels; addresses are added in order."""
    out = [f'\t.section\t.text.{name},"ax",@progbits', f"{name}:", f".text.{name}:"]
    addr = 0
    for raw in textwrap.dedent(body).strip().splitlines():
        raw = raw.strip()
        if raw.endswith(":"):
            out.append(raw)
            continue
        line, ins = raw.split(":", 1)
        chain = [f'//## File "{F}", line {int(n)}' for n in line[1:].split("<")]
        if len(chain) > 1:  # "L5<9": line 5 inlined at line 9
            chain = [f'//## File "{F}", line {line[1:].split("<")[0]} inlined at "{F}", line {line.split("<")[1]}']
        out += ["\t" + c for c in chain]
        out.append(f"        /*{addr:04x}*/                   {ins.strip()} ;")
        addr += 16
    return "\n".join(out) + "\n"


def run(text, notes, cbank=None, unannotated="error", variables=None):
    fn = sass.parse(text)["k"]
    ann = {(F, n): a for n, a in notes.items()}
    return sass.analyze(fn, ann.get, lambda e, loc: source.evaluate(e, variables or {}, f"line {loc[1]}"), cbank,
                        unannotated)


def test_parse_reads_predicates_targets_labels_and_inlined_chains():
    text = listing("""
        L5<9: @!P0 BRA `(.L_x_0)
        L6: LDG.E.128 R4, desc[UR4][R2.64]
        .L_x_0:
        L7: EXIT
    """)
    fn = sass.parse(text)["k"]
    b, ld, ex = fn.instrs
    assert (b.pred, b.base, b.target) == ("!P0", "BRA", ".L_x_0")
    assert b.chain == ((F, 5), (F, 9))
    assert ld.operands == ["R4", "desc[UR4][R2.64]"] and ld.mods == ["E", "128"]
    assert fn.labels[".L_x_0"] == 2 and ex.chain == ((F, 7),)


def test_nested_loops_multiply_their_annotated_trips():
    text = listing("""
        L10: MOV R0, RZ
        .L_x_0:
        L21: IADD3 R1, R1, 0x1, RZ
        .L_x_1:
        L31: FADD R2, R2, R3
        L31: FADD R2, R2, R3
        L30: @P0 BRA `(.L_x_1)
        L21: IADD3 R4, R4, 0x1, RZ
        L20: @P1 BRA `(.L_x_0)
        L40: EXIT
        .L_x_2:
        L40: BRA `(.L_x_2)
        L40: NOP
    """)
    an = run(text, {20: Annotation(trips="n_out"), 30: Annotation(trips="n_in")}, variables={"n_out": 4, "n_in": 3})
    # MOV + 4 * (IADD3 + 3 * 3 + IADD3 + BRA) + EXIT; the padding self-loop never runs
    assert an.instructions == 1 + 4 * (1 + 3 * 3 + 2) + 1
    outer, inner = an.loops
    assert (outer.source, outer.trips, outer.depth) == ((F, 20), 4, 1)
    assert (inner.source, inner.trips, inner.depth, inner.body) == ((F, 30), 3, 2, 3)
    assert inner.parent == 0 and outer.body == 3


def test_mufu_instructions_are_counted_with_their_trips():
    """The special-function unit's instructions (MUFU.EX2, .LG2, .RCP) as executed per thread, and the
    row's MUFU bound: 0.5 warp-instructions per clock per SM."""
    text = listing("""
        L10: MUFU.RCP R0, R1
        .L_x_0:
        L21: MUFU.EX2 R2, R2
        L21: FADD R3, R3, R2
        L21: MUFU.LG2 R4, R3
        L20: @P0 BRA `(.L_x_0)
        L40: EXIT
    """)
    an = run(text, {20: Annotation(trips="n")}, variables={"n": 5})
    assert an.mufu == 1 + 5 * 2 and an.instructions == 1 + 5 * 4 + 1
    a = model.ASSUMPTIONS
    assert model.mufu_ms(1e9) == pytest.approx(1e9 / (0.5 * a["sms"] * a["clock_ghz"] * 1e9) * 1e3)
    assert model.mufu_ms(1e9) == pytest.approx(8 * model.issue_ms(1e9))


def test_unrolled_loop_and_remainder_share_the_trips():
    text = listing("""
        L1: MOV R0, RZ
        .L_x_0:
        L51: LDG.E R4, desc[UR4][R2.64]
        L51: LDG.E R5, desc[UR4][R2.64+0x4]
        L51: LDG.E R6, desc[UR4][R2.64+0x8]
        L51: LDG.E R7, desc[UR4][R2.64+0xc]
        L51: FADD R8, R4, R5
        L51: FADD R9, R6, R7
        L50: IADD3 R0, R0, 0x4, RZ
        L50: ISETP.GT.AND P0, PT, R11, R0, PT
        L50: @P0 BRA `(.L_x_0)
        L50: ISETP.NE.AND P1, PT, R10, RZ, PT
        L50: @!P1 BRA `(.L_x_2)
        .L_x_1:
        L51: LDG.E R4, desc[UR4][R2.64]
        L51: FADD R8, R8, R4
        L50: ISETP.NE.AND P2, PT, R10, RZ, PT
        L50: @P2 BRA `(.L_x_1)
        .L_x_2:
        L60: EXIT
    """)
    an = run(text, {50: Annotation(trips="T")}, variables={"T": 10})
    main, rem = an.loops
    assert (main.unroll, main.trips, rem.unroll, rem.trips) == (4, 2, 1, 2)  # 10 = 2 * 4 + 2
    assert an.instructions == 1 + 2 * 9 + 2 + 2 * 4 + 1
    # a fractional T splits on average: the remainder runs (u - 1) / 2 times
    main, rem = run(text, {50: Annotation(trips="T")}, variables={"T": 9.5}).loops
    assert rem.trips == 1.5 and main.trips == pytest.approx(2.0)


def test_a_loop_unrolled_without_remainder_is_counted_by_its_mem_annotation():
    """A loop of constant trips that the compiler unrolled by u with no remainder copy is one SASS loop whose body
    is u iterations: with ``mem`` (memory instructions per source iteration) it is counted trips / u times;
    a body that is no multiple of ``mem`` is an error."""
    text = listing("""
        L1: MOV R0, RZ
        .L_x_0:
        L51: LDG.E R4, desc[UR4][R2.64]
        L52: LDG.E.128 R4, desc[UR4][R6.64]
        L51: LDG.E R5, desc[UR4][R2.64+0x4]
        L52: LDG.E.128 R8, desc[UR4][R6.64+0x10]
        L51: LDG.E R6, desc[UR4][R2.64+0x8]
        L52: LDG.E.128 R12, desc[UR4][R6.64+0x20]
        L52: FFMA R8, R4, R5, R8
        L50: IADD3 R0, R0, 0x3, RZ
        L50: ISETP.GT.AND P0, PT, R11, R0, PT
        L50: @P0 BRA `(.L_x_0)
        L60: EXIT
    """)
    body = 10
    counted = run(text, {50: Annotation(trips="KX")}, variables={"KX": 6})  # no mem: 6 passes of the body
    assert (counted.loops[0].trips, counted.loops[0].unroll) == (6, 1)
    assert counted.instructions == 1 + 6 * body + 1
    an = run(text, {50: Annotation(trips="KX", mem="2 * A")}, variables={"KX": 6, "A": 1})
    assert (an.loops[0].trips, an.loops[0].unroll, an.loops[0].source_trips) == (2, 3, 6)
    assert an.instructions == 1 + 2 * body + 1
    with pytest.raises(sass.SassError, match="not a multiple of its annotated mem"):
        run(text, {50: Annotation(trips="KX", mem="4")}, variables={"KX": 6})
    a = source.parse_annotation("for dx in range(0, KX):  # sm90: trips=KX; mem=2 + GB // GS")
    assert (a.trips, a.mem) == ("KX", "2 + GB // GS")
    with pytest.raises(ValueError, match="empty mem"):
        source.parse_annotation("for x in y:  # sm90: trips=3; mem=")


def test_copies_of_a_loop_inlined_at_different_call_sites_each_get_the_trips():
    """A helper's loop inlined twice (upsample_math.h's bisection, called per axis) is two loops, not an
    unrolled loop and its remainder: each runs the annotated trips, whatever its size."""
    text = listing("""
        L1: MOV R0, RZ
        .L_x_0:
        L51<9: LDG.E R4, desc[UR4][R2.64]
        L51<9: FADD R8, R8, R4
        L50<9: @P0 BRA `(.L_x_0)
        .L_x_1:
        L51<12: LDG.E R4, desc[UR4][R2.64]
        L51<12: LDG.E R5, desc[UR4][R2.64+0x4]
        L51<12: FADD R8, R8, R4
        L51<12: FADD R8, R8, R5
        L50<12: @P1 BRA `(.L_x_1)
        L60: EXIT
    """)
    an = run(text, {50: Annotation(trips="T")}, variables={"T": 10})
    first, second = an.loops
    assert (first.trips, first.unroll, second.trips, second.unroll) == (10, 1, 10, 1)
    assert (first.inlined_at, second.inlined_at) == (((F, 9),), ((F, 12),))
    assert an.instructions == 1 + 10 * 3 + 10 * 5 + 1 and not an.warnings


def test_cold_branch_skips_its_region_and_the_hot_side_keeps_counting():
    text = listing("""
        L5: ISETP.NE.AND P0, PT, R2, 0x1, PT
        L6: @P0 BRA `(.L_x_0)
        L7: FADD R1, R1, R2
        L7: FADD R1, R1, R2
        L7: FADD R1, R1, R2
        .L_x_0:
        L8: LDG.E.128 R4, desc[UR4][R2.64]
        L9: EXIT
    """)
    notes = {6: Annotation(cold=True), 8: Annotation(logits=True)}
    an = run(text, notes)
    assert an.instructions == 4
    assert an.cold == [{"line": (F, 6), "branch": "0010", "skipped": 3}]
    assert run(text, {8: Annotation(logits=True)}).instructions == 7  # unannotated: both sides count
    # if/else: the side that loads the logits is the hot one, whichever way the branch goes
    text = listing("""
        L5: ISETP.NE.AND P0, PT, R2, 0x1, PT
        L6: @!P0 BRA `(.L_x_0)
        L7: STG.E desc[UR4][R6.64], RZ
        L7: STG.E desc[UR4][R6.64+0x4], RZ
        L7: EXIT
        .L_x_0:
        L8: LDG.E R4, desc[UR4][R2.64]
        L9: EXIT
    """)
    an = run(text, notes)
    assert an.instructions == 2 + 2 and an.cold[0]["skipped"] == 3


def test_shared_branch_counts_its_guarded_code_at_its_share():
    # `if (threadIdx.y == 0) { ... }` that one warp of CH takes: the guarded code at 1/CH, the rest as before
    text = listing("""
        L5: ISETP.NE.AND P0, PT, R2, RZ, PT
        L6: @P0 BRA `(.L_x_0)
        L7: FADD R1, R1, R2
        L7: FADD R1, R1, R2
        L7: FADD R1, R1, R2
        L7: FADD R1, R1, R2
        .L_x_0:
        L8: FADD R1, R1, R2
        L9: EXIT
    """)
    an = run(text, {6: Annotation(share="1/CH")}, variables={"CH": 4})
    assert an.instructions == 2 + 4 / 4 + 2 and not an.warnings
    assert run(text, {}).instructions == 2 + 4 + 2  # unannotated: both sides count
    assert source.parse_annotation("if (t == 0) x = f();  // sm90: share=1/CH").share == "1/CH"
    with pytest.raises(ValueError, match="empty share"):
        source.parse_annotation("if (t == 0)  // sm90: share=")


def test_called_slow_paths_are_not_counted():
    text = listing("""
        L5: MOV R40, 0x30
        L5: CALL.REL.NOINC `($__internal_0_$__cuda_sm20_div_s64)
        L5: MOV R2, R10
        L6: EXIT
        .L_x_9:
        L6: BRA `(.L_x_9)
        $__internal_0_$__cuda_sm20_div_s64:
        L5: IADD3 R10, R1, R2, RZ
        L5: IADD3 R10, R10, R2, RZ
        L5: IADD3 R10, R10, R2, RZ
        L5: RET.REL.NODEC R40 `(k)
    """)
    an = run(text, {})
    assert an.instructions == 4
    assert an.calls == ["$__internal_0_$__cuda_sm20_div_s64"]


def test_an_unannotated_loop_is_an_error_naming_the_kernel_and_its_source():
    text = listing("""
        .L_x_0:
        L12<30: FADD R2, R2, R3
        L11<30: @P0 BRA `(.L_x_0)
        L13: EXIT
    """)
    with pytest.raises(SassError, match=r"k: the SASS loop at /\*0000\*/ maps to no source loop.*k.cu:11 <- .*k.cu:30"):
        run(text, {})
    an = run(text, {}, unannotated="warn")
    assert an.instructions == 3 and len(an.warnings) == 1 and "trips=1" in an.warnings[0]
    # the annotation on the loop line of the inlined function is found through the chain
    assert run(text, {11: Annotation(trips="5")}).instructions == 2 * 5 + 1


def test_load_widths_and_the_widest_logits_load():
    widths = {"LDG.E.128": 128, "LDG.E.64.CONSTANT": 64, "LDG.E": 32, "LDG.E.U16.CONSTANT": 16,
              "LDG.E.LTC128B.128": 128, "LDG.E.S8": 8, "LDG.E.EL.64": 64}
    for op, bits in widths.items():
        ins = sass.parse(listing(f"L1: {op} R4, desc[UR4][R2.64]"))["k"].instrs[0]
        assert sass.load_bits(ins) == bits, op
    text = listing("""
        L1: LDG.E.128 R4, desc[UR4][R2.64]
        L2: LDG.E.64 R8, desc[UR4][R6.64]
        L2: LDG.E R9, desc[UR4][R6.64]
        L3: EXIT
    """)
    an = run(text, {2: Annotation(logits=True)})
    assert an.load_bits == 64 and an.load_widths == [32, 64]
    assert run(text, {}).load_bits is None


def test_launch_constants_decide_branches_on_kernel_parameters():
    text = listing("""
        L1: LDC R3, c[0x0][0x210]
        L2: ISETP.GE.AND P0, PT, R3, 0x4, PT
        L2: @P0 BRA `(.L_x_0)
        L3: FADD R1, R1, R2
        L3: FADD R1, R1, R2
        .L_x_0:
        L4: ULDC UR4, c[0x0][0x210]
        L4: UISETP.NE.AND UP0, UPT, UR4, 0x3, UPT
        L4: PLOP3.LUT P1, PT, PT, PT, UP0, 0x80, 0x0
        L4: P2R R5, PR, RZ, 0x2
        L4: ISETP.NE.AND P3, PT, R5, RZ, PT
        L4: @!P3 BRA `(.L_x_1)
        L5: FMUL R1, R1, R2
        L5: FMUL R1, R1, R2
        L5: FMUL R1, R1, R2
        .L_x_1:
        L6: EXIT
    """)
    d3 = {0x210 + k: b for k, b in enumerate((3).to_bytes(4, "little"))}
    assert run(text, {}, cbank=d3).instructions == 12  # D = 3: the FADDs run, the FMULs do not
    d5 = {0x210 + k: b for k, b in enumerate((5).to_bytes(4, "little"))}
    assert run(text, {}, cbank=d5).instructions == 13  # D = 5: the FMULs run, the FADDs do not
    assert run(text, {}).instructions == 15  # unknown: both sides


def test_ptx_lines_repair_a_wrong_file_in_the_line_table():
    ptx = textwrap.dedent("""
        .visible .entry k(
        ) {
        .loc 2 284 5
        .loc 2 250 3, function_name $L__info_string0, inlined_at 1 27 5
        }
        .file 1 "/repo/csrc/cuda/tree_min.cu"
        .file 2 "/repo/csrc/hss_math.h"
    """)
    lines = sass.ptx_lines(ptx)
    assert lines["k"] == {("/repo/csrc/hss_math.h", 284), ("/repo/csrc/hss_math.h", 250),
                          ("/repo/csrc/cuda/tree_min.cu", 27)}
    text = ('\t.section\t.text.k,"ax",@progbits\nk:\n'
            '\t//## File "/other/csrc/cuda/common.cuh", line 284 inlined at "/other/csrc/cuda/tree_min.cu", line 27\n'
            '        /*0000*/  EXIT ;\n')
    fn = sass.parse(text)["k"]
    rel = {"csrc/hss_math.h", "csrc/cuda/common.cuh", "csrc/cuda/tree_min.cu"}
    norm = lambda p: next((r for r in rel if p.endswith("/" + r)), None)  # noqa: E731
    assert sass.repair_lines(fn, lines["k"], norm) == (1, 0)
    assert fn.instrs[0].chain == (("csrc/hss_math.h", 284), ("/other/csrc/cuda/tree_min.cu", 27))


def test_annotations_parse_and_resolve_by_path_suffix(tmp_path):
    assert source.parse_annotation("for (int j = 0; j < L; ++j) {  // sm90: trips=L") == Annotation(trips="L")
    assert source.parse_annotation("x = tl.load(p)  # sm90: logits") == Annotation(logits=True)
    assert source.parse_annotation("if (a) {  // rare; sm90: cold") == Annotation(cold=True)
    assert source.parse_annotation("  // sm90: trips=WALK / V; cold") == Annotation(trips="WALK / V", cold=True)
    assert source.parse_annotation("int x;  // no annotation") is None
    with pytest.raises(ValueError, match="unknown sm90 annotation"):
        source.parse_annotation("// sm90: hot")
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.h").write_text("int a;\nfor (;;) {  // sm90: trips=2 * D\n")
    ann = source.Annotations(tmp_path, ["csrc/*.h"])
    assert ann(("/elsewhere/checkout/csrc/a.h", 2)) == Annotation(trips="2 * D")
    assert ann(("/elsewhere/checkout/csrc/a.h", 1)) is None and ann(("/usr/include/a.h", 2)) is None
    assert source.evaluate("2 * D + cdiv(L, 4)", {"D": 3, "L": 9}, "x") == 9
    with pytest.raises(SassError, match=r"a.h:2: cannot evaluate trips='2 \* Q'.*variables: D"):
        source.evaluate("2 * Q", {"D": 3}, "a.h:2")


def test_tree_variables_on_a_small_tree():
    from hss_kernels.tree import Tree

    tree = Tree.from_parents([-1, 0, 0, -1])  # A(a1, a2), B: leaves a1, a2, B
    v = source.tree_variables(tree)
    assert (v["L"], v["V"], v["D"], v["I"], v["DI"]) == (3, 4, 2, 1, 1)
    assert v["PATH"] == pytest.approx(5 / 3) and v["PATH_ITERS"] == 2
    assert v["WALK"] == pytest.approx(2 / 3)  # only label B walks A's subtree (3 nodes, 2 besides A)


def test_floor_bytes_follow_math_section_5():
    P, C, D = 10, 66, 3
    assert model.floor_bytes("hierarchical_softmax", "forward", P, C, 4, D) == P * C * 4 + 8 * P + 4 * 4 * P
    assert model.floor_bytes("hierarchical_softmax", "backward", P, C, 2, D) == 2 * P * C * 2 + 8 * P + 4 * 4 * P
    assert model.floor_bytes("tree_min", "backward", P, C, 2, D) == 2 * P * C * 2 + 8 * P
    assert model.floor_bytes("decode", "forward", P, C, 4, D) == P * C * 4 + 8 * P
    assert model.issue_ms(4 * 132 * 1.755e9) == pytest.approx(1e3)


def test_floor_bytes_with_fused_upsampling_read_the_low_resolution_logits():
    P, C, D, s = 8 * 1024 * 1024, 66, 3, 4
    p = P // (s * s)
    assert model.floor_bytes("hierarchical_softmax", "forward", P, C, 4, D, s) == p * C * 4 + 8 * P + 4 * (D + 1) * P
    assert model.floor_bytes("hierarchical_softmax", "backward", P, C, 2, D, s) == \
        2 * p * C * 2 + 8 * P + 4 * (D + 1) * P
    assert model.floor_bytes("tree_bce", "backward", P, 147, 4, D, 8) == 2 * (P // 64) * 147 * 4 + 8 * P
    assert model.floor_bytes("decode", "forward", P, 147, 2, D, s) == p * 147 * 2 + 8 * P
    for op, pass_ in model.FLOOR_FORMULAS:  # every plain formula has its upsampled one, in p
        assert model.floor_formula(op, pass_, 1) == model.FLOOR_FORMULAS[(op, pass_)]
        assert "p·C·b" in model.floor_formula(op, pass_, s) and "P·C·b" not in model.floor_formula(op, pass_, s)


def test_selection_and_not_fused_rows():
    from benchmarks.sm90 import cuda_side, triton_side

    rows = model.selection(["hierarchical_softmax", "decode"], ["cuda"], ["float32"], ["forward", "backward"],
                           ["nchw"], [1, 4])
    assert rows == [("hierarchical_softmax", "cuda", "float32", "forward", "nchw", 1),
                    ("hierarchical_softmax", "cuda", "float32", "backward", "nchw", 1),
                    ("decode", "cuda", "float32", "forward", "nchw", 1),
                    ("hierarchical_softmax", "cuda", "float32", "forward", "nchw", 4),
                    ("hierarchical_softmax", "cuda", "float32", "backward", "nchw", 4),
                    ("decode", "cuda", "float32", "forward", "nchw", 4)]
    assert cuda_side.fuses_upsample("tree_bce", "backward") and cuda_side.fuses_upsample("decode", "forward")
    assert not cuda_side.fuses_upsample("decode", "backward")  # no such pass: the NotFused path
    with pytest.raises(model.NotFused, match="decode"):
        cuda_side.launches("decode", "backward", "float32", "nchw", (8, 147, 1024, 1024), trees.load("vistas_v2"),
                           0.0, 4)
    with pytest.raises(model.NotFused, match="decode"):
        model.Context(Path("/nonexistent"), log=lambda m: None).cuda_row("decode", "float32", "backward", "nchw", 4)
    # Triton: the registry function's takes_upsample decides, and the call is the public API's
    import hss_kernels.triton as T

    assert triton_side.fuses_upsample("hierarchical_softmax") == bool(T.hierarchical_softmax_loss.takes_upsample)
    assert triton_side.fuses_upsample("tree_min") == bool(getattr(T.tree_min_loss, "takes_upsample", False))
    assert triton_side.fuses_upsample("decode")
    calls = []
    fake = lambda *a, **k: calls.append((a, k))  # noqa: E731
    x, t = object(), torch.empty(2, 12, 16)
    triton_side._call("tree_min", fake, x, t, "tree", True)
    triton_side._call("decode", fake, x, t, "tree", True)
    triton_side._call("decode", fake, x, t, "tree", False)
    assert calls == [((x, t, "tree"), {"upsample": "bilinear"}), ((x, "tree"), {"size": (12, 16)}),
                     ((x, "tree"), {})]


def test_each_cuda_launch_names_the_cu_file_that_defines_its_kernel():
    """The model reads each kernel from the cubin of launch.source (csrc/cuda/<source>.cu): the file, or a local
    header it includes, must hold the kernel's __global__ definition (tree_min's kernels are in two files)."""
    import re

    from benchmarks.sm90 import cuda_side

    cuda = Path(__file__).resolve().parents[1] / "csrc" / "cuda"

    def text(path, seen):
        if path in seen or not path.is_file():
            return ""
        seen.add(path)
        t = path.read_text()
        return t + "".join(text(cuda / inc, seen) for inc in re.findall(r'#include "([^"]+\.cuh)"', t))

    tree = trees.load("vistas_v2")
    checked = set()
    for op in ("hierarchical_softmax", "tree_min", "tree_bce", "decode"):
        for pass_ in ("forward", "backward"):
            if op == "decode" and pass_ == "backward":
                continue
            for up in (1, 4):
                if up > 1 and not cuda_side.fuses_upsample(op, pass_):
                    continue
                for dtype in ("float32", "bfloat16"):
                    for layout in ("nchw", "channels_last"):
                        for launch in cuda_side.launches(op, pass_, dtype, layout, (2, tree.num_nodes, 64, 64), tree,
                                                         2.0, up):
                            src = cuda / f"{launch.source}.cu"
                            assert src.is_file(), (op, pass_, up, launch.kernel, src)
                            body = text(src, set())
                            assert re.search(r"__global__[^;{]*?\b" + launch.kernel + r"\s*\(", body), \
                                (op, pass_, up, launch.kernel, src.name)
                            checked.add((launch.source, launch.kernel))
    assert ("tree_min_up", "tree_up_rows_group_kernel") in checked and ("tree_min", "tree_fwd_group_kernel") in checked


def test_cuda_launches_of_the_fused_upsampling():
    import struct

    from benchmarks.sm90 import cuda_side

    vistas, v2 = trees.load("vistas"), trees.load("vistas_v2")
    N, H, W, s = 8, 1024, 1024, 4
    n = N * (H // s) * (W // s)
    fwd, fin = cuda_side.launches("hierarchical_softmax", "forward", "float32", "channels_last", (N, 66, H, W),
                                  vistas, 0.0, s)
    # on the lanes (a tree up to 4 deep, any layout): G = 4 float32 label pixels of a row per thread (W / 4 groups
    # per row), the packed group table; the logits' strides are the low-resolution channels_last ones; kW false
    # (the instantiation without weights)
    assert fwd.pattern == "hierarchical_softmax_fwd_up_lanes_kernelIffLb0EE" and fwd.blocks == N * H * W // 4 // 256
    assert fwd.params[1] == 1 and fwd.params[6:8] == [N * H * W // 4, W // 4] and fwd.dynamic_smem == 66 * 16
    geom = fwd.params[2]
    assert fwd.params[-2:] == [cuda_side.NO_WEIGHTS, 0]  # the (absent) weights and their partials
    assert len(geom) == 88 and struct.unpack("<7q", geom[:56]) == (256, 256, H, W, 66 * n // N, 66 * 256, 66)
    assert struct.unpack("<qf?", geom[56:69]) == (256, 0.25, False) and fin.kernel == "finish_weighted_kernel"
    assert fin.params[3] == fwd.blocks
    assert (fwd.scalars["H"], fwd.scalars["h"], fwd.scalars["n"]) == (H, H // s, n)
    # a tree deeper than 4 levels: kUp, one thread per label pixel
    deep = types.SimpleNamespace(num_leaves=66, depth=5, num_nodes=vistas.num_nodes)
    one, _ = cuda_side.launches("hierarchical_softmax", "forward", "float32", "channels_last", (N, 66, H, W), deep,
                                0.0, s)
    assert one.pattern == "hierarchical_softmax_fwd_kernelIffLb1ELb0EE" and one.blocks == N * H * W // 256
    assert one.params[2] == 1 and one.params[1] == (H // s, W // s, 66 * n // N, 66 * W // s, 66)
    assert one.params[-3] == geom
    plain, _ = cuda_side.launches("hierarchical_softmax", "forward", "float32", "channels_last", (N, 66, H, W), vistas,
                                  0.0)
    assert plain.pattern == "hierarchical_softmax_fwd_kernelIffLb0ELb0EE" and plain.params[-3] is None
    # NCHW at the labels' size: the V-pixel kernel, which never upsamples; upsampled NCHW: the kUp kernel
    lanes, _ = cuda_side.launches("hierarchical_softmax", "forward", "float32", "nchw", (N, 66, H, W), vistas, 0.0)
    assert lanes.kernel == "hierarchical_softmax_fwd_lanes_kernel" and lanes.blocks == N * H * W // 4 // 256
    up_nchw, _ = cuda_side.launches("hierarchical_softmax", "forward", "bfloat16", "nchw", (N, 66, H, W), vistas, 0.0,
                                    s)
    assert up_nchw.pattern == "hierarchical_softmax_fwd_up_lanes_kernelIN3c108BFloat16EfLb0EE"
    assert up_nchw.blocks == N * H * W // 8 // 256 and up_nchw.params[1] == (H // s) * (W // s)
    assert lanes.pattern == "hierarchical_softmax_fwd_lanes_kernelIffLb0EE"
    # the banded backwards: per band a rows kernel (G = 8 bfloat16 label pixels of a row of the band per thread),
    # then the gather
    hb, hg = cuda_side.launches("hierarchical_softmax", "backward", "bfloat16", "nchw", (N, 66, H, W), vistas, 0.0, s)
    rows, hbands, _ = cuda_side.up_bands(N, 66, H // s, H, W, 4, 2)
    assert (hb.kernel, hb.threads, len(hb.params), hb.launches) == \
        ("hierarchical_softmax_up_rows_lanes_kernel", 256, 24, len(hbands))
    assert hb.pattern == "hierarchical_softmax_up_rows_lanes_kernelIN3c108BFloat16EfLb0EE"
    assert hb.params[6:9] == [rows * W // 8, W // 8, N * rows * W // 8] and hb.dynamic_smem == 66 * 16
    assert hg.pattern == "up_gather_kernelIN3c108BFloat16EfE" and hg.source == "hierarchical_softmax"
    assert hb.blocks == sum(-(-(N * (b[1] - b[0]) * W // 8) // 256) for b in hbands)
    # a tree deeper than 4 levels: one thread per label pixel of the band
    ob, _ = cuda_side.launches("hierarchical_softmax", "backward", "bfloat16", "nchw", (N, 66, H, W), deep, 0.0, s)
    assert (ob.pattern, len(ob.params)) == ("hierarchical_softmax_up_rows_kernelIN3c108BFloat16EfLb0EE", 23)
    assert ob.blocks == sum(-(-(N * (b[1] - b[0]) * W) // 256) for b in hbands)
    # the banded tree backward: per band the rows kernel (G = 4 label pixels of a row per thread, the focal mode and
    # extrema of the options) and the gather (32 low-resolution pixels by the fewest channel warps of 8 channels for
    # the fewest passes of at most 10 warps, and a table of each pixel's column weights in shared memory), each
    # kernel's launches merged into one
    tb, tg = cuda_side.launches("tree_min", "backward", "float32", "nchw", (N, 147, H, W), v2, 2.0, 8)
    rows, bands, am = cuda_side.up_bands(N, 147, H // 8, H, W, 4, 4)
    assert (tb.kernel, tb.threads, len(tb.params), tb.launches) == ("tree_up_rows_group_kernel", 128, 24, len(bands))
    assert tb.pattern == "tree_up_rows_group_kernelIffLi2ELb1ELb0EE"
    assert tb.source == tg.source == "tree_min_up"  # csrc/cuda/tree_min_up.cu, not tree_min.cu
    warps = -(-19 // 2)  # 147 channels: 19 warps' worth of 8, in two passes of at most 10 warps
    assert tg.pattern == "up_gather_kernelIffE" and (tg.threads, len(tg.params), tg.launches) == \
        (32 * warps, 19, len(bands))
    xw = max(hi - lo for lo, hi in (cuda_side._up_window(W // 8, W, j) for j in range(W // 8)))
    assert (tg.block_y, tg.scalars["CH"], tg.params[-1], tg.scalars["XW"]) == (warps, warps, xw, xw)
    sizes = [len(v) if isinstance(v, bytes) else 8 for v in tg.params]
    bank = cuda_side.cbank(tg, [(k, sum(sizes[:k]), n) for k, n in enumerate(sizes)])
    assert tg.dynamic_smem == xw * 32 * 4 and (bank[0], bank[4]) == (32, warps)  # blockDim.x, blockDim.y
    assert tb.dynamic_smem == cuda_side.min_bwd_group_smem_bytes(147, v2.depth, 128, 4)
    assert sum(-(-(N * (b[1] - b[0]) * W // 4) // 128) for b in bands) == tb.blocks and tb.scalars["ROWS"] == rows
    tf, _ = cuda_side.launches("tree_bce", "forward", "bfloat16", "nchw", (N, 147, H, W), v2, 0.0, 8)
    assert tf.pattern == "tree_fwd_up_group_kernelIN3c108BFloat16EfLi1ELb0ELb0EE"
    assert tf.source == "tree_min_up"
    assert tf.blocks == -(-(N * H * W // 8) // 256) and tf.params[5:7] == [N * H * W // 8, W // 8]
    # the bands cover the label rows once and every low-resolution row; the scratch stays within 32 MiB
    assert [b[0] for b in bands] == list(range(0, H, rows)) and bands[-1][1] == H
    assert bands[0][2] == 0 and bands[-1][3] == H // 8 and all(b[2] <= c[2] for b, c in zip(bands, bands[1:]))
    assert N * rows * W * 147 * 4 <= 32 << 20 < N * (rows + 1) * W * 147 * 4 and 1 <= am <= rows // 8 + 3
    assert tg.blocks == sum(-(-(N * (b[3] - b[2]) * (W // 8)) // 32) for b in bands)
    # decode with size=: on the lanes, G = 8 bfloat16 label pixels of a row per thread (W / 8 groups per row), 128
    # threads per block, the low-resolution channel stride (channels_last: 1), the geometry last
    (dec,) = cuda_side.launches("decode", "forward", "bfloat16", "channels_last", (N, 147, H, W), v2, 0.0, s)
    assert (dec.pattern, dec.blocks, len(dec.params)) == \
        ("decode_up_lanes_kernelIN3c108BFloat16ELi0ELb1ELb0EE", N * H * W // 8 // 128, 9)
    assert dec.params[3:7] == [N * H * W // 8, W // 8, 147, 1] and len(dec.params[-1]) == 88
    with pytest.raises(ValueError, match="divisor"):
        cuda_side.launches("tree_min", "forward", "float32", "nchw", (N, 147, H, W), v2, 2.0, 3)


def test_cuda_launches_match_the_host_rules():
    from benchmarks.sm90 import cuda_side

    assert cuda_side.setup_nvcc_flags() == ["-O3"]
    tree = trees.load("vistas_v2")
    (bwd,) = cuda_side.launches("tree_min", "backward", "float32", "nchw", (8, 147, 1024, 1024), tree, 2.0)
    # G = 4 float32 pixels a thread: the node table (16 B a node), D + 1 slots of G floats and ceil(V / 16) bit
    # words of G uint32 per thread; 128 threads fit in 48 KiB (bfloat16, G = 8: 64)
    assert (bwd.kernel, bwd.threads, bwd.blocks) == ("tree_min_bwd_group_kernel", 128, 8 * 1024 * 1024 // 4 // 128)
    assert bwd.dynamic_smem == 147 * 16 + (tree.depth + 1) * 128 * 16 + 10 * 128 * 16
    (bwd16,) = cuda_side.launches("tree_min", "backward", "bfloat16", "channels_last", (8, 147, 1024, 1024), tree, 2.0)
    assert (bwd16.pattern, bwd16.threads) == ("tree_min_bwd_group_kernelIN3c108BFloat16EfLi2ELb0ELb0EE", 64)
    assert bwd16.dynamic_smem == 147 * 16 + (tree.depth + 1) * 64 * 32 + 10 * 64 * 32
    (bce,) = cuda_side.launches("tree_bce", "backward", "bfloat16", "channels_last", (8, 147, 1024, 1024), tree, 0.0)
    # the focal mode in the template: kFocalG0 (1) for gamma 0, kFocalG2 (2) for gamma 2; the tree BCE backward
    # G = 8 bfloat16 pixels a thread, per-lane loads on channels_last; kW false (no weights) last
    assert (bce.threads, bce.dynamic_smem, bce.pattern) == (256, 147 * 16,
                                                            "tree_bce_bwd_group_kernelIN3c108BFloat16EfLi1ELb0ELb0EE")
    assert bce.blocks == 8 * 1024 * 1024 // 8 // 256
    assert bwd.template == "ffLi2ELb1ELb0E"
    # the forward: G = 16 / element size pixels a thread, D + 1 slots of G floats a thread (tree-min only), the
    # 16-byte loads on NCHW (kVec), per-lane loads on channels_last
    P = 8 * 1024 * 1024
    fwd, fin = cuda_side.launches("tree_min", "forward", "bfloat16", "nchw", (8, 147, 1024, 1024), tree, 2.0)
    assert fwd.pattern == "tree_fwd_group_kernelIN3c108BFloat16EfLi2ELb1ELb1ELb0EE"
    assert (fwd.blocks, fwd.threads, fwd.dynamic_smem) == (P // 8 // 256, 256, 147 * 16 + (tree.depth + 1) * 256 * 32)
    # unweighted: null weight tables, no class weights' partials; the finish writes the count as the weight sum
    assert fwd.params[-2] == cuda_side.NO_WEIGHTS and fwd.params[-1] == 0
    assert fin.kernel == "finish_weighted_kernel" and fin.params[2] == 0 and fin.params[3] == fwd.blocks
    fwd, _ = cuda_side.launches("tree_bce", "forward", "float32", "channels_last", (8, 147, 1024, 1024), tree, 0.0)
    assert fwd.pattern == "tree_fwd_group_kernelIffLi1ELb0ELb0ELb0EE"
    assert (fwd.blocks, fwd.dynamic_smem) == (P // 4 // 256, 147 * 16)
    with pytest.raises(SassError, match="update benchmarks/sm90/cuda_side.py"):
        cuda_side.cbank(bwd, [(0, 0, 8)])
    vistas = trees.load("vistas")
    # hierarchical softmax, NCHW: V pixels a thread (4 float32, 8 bfloat16), the group ids packed in one
    # int4 a leaf; channels_last: one pixel a thread, the leaf-major table of 8 int32 a leaf
    P = 8 * 1024 * 1024
    fwd, fin = cuda_side.launches("hierarchical_softmax", "forward", "float32", "nchw", (8, 66, 1024, 1024), vistas,
                                  0.0)
    (hbwd,) = cuda_side.launches("hierarchical_softmax", "backward", "bfloat16", "nchw", (8, 66, 1024, 1024), vistas,
                                 0.0)
    assert (fwd.kernel, fwd.blocks, fwd.threads, fwd.dynamic_smem) == (
        "hierarchical_softmax_fwd_lanes_kernel", P // 4 // 256, 256, 66 * 16)
    assert (fin.kernel, fin.params[3]) == ("finish_weighted_kernel", fwd.blocks)
    assert (hbwd.kernel, hbwd.blocks, hbwd.threads, hbwd.dynamic_smem) == (
        "hierarchical_softmax_bwd_lanes_kernel", P // 8 // 256, 256, 66 * 16)
    cl, _ = cuda_side.launches("hierarchical_softmax", "forward", "float32", "channels_last", (8, 66, 1024, 1024),
                               vistas, 0.0)
    assert (cl.kernel, cl.blocks, cl.threads, cl.dynamic_smem) == ("hierarchical_softmax_fwd_kernel", P // 256, 256,
                                                                    66 * 32)
    # decode: the kernels instantiated for the sigmoid, a walk whose leaf ids increase (vistas_v2) or not
    # (vistas), the sum score. NCHW without upsampling: the lanes, V = 16 / element size pixels a thread, 128
    # threads a block, 9 parameters (x, walk, out, groups, HW, C, sN, sC, ignore_index); channels_last: one
    # pixel a thread, 13 parameters (x, walk, out, total, HW, W, C, four strides, ignore_index, the upsampling
    # geometry)
    (dec,) = cuda_side.launches("decode", "forward", "float32", "nchw", (8, 147, 1024, 1024), tree, 0.0)
    assert (dec.pattern, dec.threads, dec.blocks, dec.dynamic_smem, len(dec.params)) == (
        "decode_lanes_kernelIfLi0ELb1ELb0EE", 128, P // 4 // 128, 0, 9)
    assert dec.params[3:8] == [P // 4, 1024 * 1024, 147, 147 * 1024 * 1024, 1024 * 1024]
    (dec,) = cuda_side.launches("decode", "forward", "bfloat16", "nchw", (8, 80, 64, 64), trees.load("vistas"), 0.0)
    assert (dec.pattern, dec.blocks) == ("decode_lanes_kernelIN3c108BFloat16ELi0ELb0ELb0EE", 8 * 64 * 64 // 8 // 128)
    (dec,) = cuda_side.launches("decode", "forward", "float32", "channels_last", (8, 147, 1024, 1024), tree, 0.0)
    assert (dec.pattern, dec.threads, dec.dynamic_smem, len(dec.params)) == ("decode_kernelIfLi0ELb1ELb0ELb0EE", 256,
                                                                             0, 13)


def _need_triton_sm90_tools():
    """Skip unless Triton compiles (not its interpreter) and the CUDA binary tools are there."""
    triton = pytest.importorskip("triton")
    from benchmarks.sm90 import tools

    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreter functions, nothing to compile")
    try:
        for name in ("ptxas", "nvdisasm", "cuobjdump"):
            tools.binary(name)
    except tools.ToolMissing as exc:
        pytest.skip(str(exc))


def test_one_triton_kernel_end_to_end(tmp_path):
    """Compiles the Triton hierarchical softmax forward (float32, NCHW, Vistas sizes) as the runtime would and
    checks the row's fields, its one loop's trip count included (no speed figure is a target here)."""
    _need_triton_sm90_tools()
    ctx = model.Context(tmp_path, log=lambda m: None)
    row = ctx.triton_row("hierarchical_softmax", "float32", "forward", "nchw").as_dict()
    assert (row["op"], row["backend"], row["dtype"], row["pass"], row["layout"]) == \
        ("hierarchical_softmax", "triton", "float32", "forward", "nchw")
    assert 16 <= row["registers"] <= 255 and row["spill_bytes"] >= 0 and row["shared_bytes"] >= 1024
    assert row["global_load_bits"] in (16, 32, 64, 128)
    tree = trees.load("vistas")
    P = 8 * 2 ** 20
    assert row["floor_ms"] == pytest.approx(P * (tree.num_leaves * 4 + 8 + 4 * (tree.depth + 1)) / 3e12 * 1e3)
    assert row["issue_ms"] > 0 and row["sass_per_element"] > 1 and row["ratio"] == row["issue_ms"] / row["floor_ms"]
    assert 0 < row["mufu_ms"] < row["issue_ms"]  # an exponential per leaf
    source = (Path(__file__).resolve().parents[1] / "hss_kernels" / "triton" / "hierarchical_softmax.py").read_text().splitlines()
    loop_line = next(i for i, line in enumerate(source, start=1) if "for c0 in range(0, L, BLOCK_C)" in line)
    (loop,) = [lp for lp in row["loops"] if lp["line"] == f"hss_kernels/triton/hierarchical_softmax.py:{loop_line}"]
    assert loop["trips"] == 9  # cdiv(66 leaves, BLOCK_C = 8)
    assert row["threads"] == P // 4 and not row["warnings"]  # 4 pixels per thread


def test_triton_banded_backward_recorded_as_one_launch_per_kernel(monkeypatch):
    """The upsampled tree-min backward launches its two kernels once per band of rows: the recorder keeps one
    entry per compiled kernel whose programs are the bands' sum and whose launch count is the bands'."""
    from benchmarks.sm90 import triton_side
    from hss_kernels.triton import _upsample

    tree = trees.load("pascal_person_part")
    x = torch.empty((2, tree.num_nodes, 8, 16), device="meta")
    t = torch.empty((2, 32, 64), dtype=torch.int64, device="meta")
    monkeypatch.setattr(_upsample, "up_band_rows", lambda N, V, H, W, a, b: 5)  # 7 bands
    bands, _ = _upsample.up_bands(8, 32, 5, False, torch.float32)
    assert len(bands) == 7
    launches = triton_side.record("tree_min", "backward", x, t, tree, upsample=True)
    assert [la.kernel.fn.__name__ for la in launches] == ["_tree_min_up_rows_kernel", "_up_gather_kernel"]
    assert [la.launches for la in launches] == [len(bands)] * 2 and launches[0].describe()["launches"] == len(bands)
    block_p, block_q = launches[0].constexprs["BLOCK_P"], launches[1].constexprs["BLOCK_Q"]
    assert launches[0].programs == sum(-(-(b[1] - b[0]) * 64 // block_p) * 2 for b in bands)
    assert launches[1].programs == sum(-(-16 // block_q) * (b[3] - b[2]) * 2 for b in bands)
    single = triton_side.coalesce(launches[:1])
    assert single[0] is launches[0]


def test_one_upsampled_triton_kernel_end_to_end(tmp_path):
    """The backward of the Triton hierarchical softmax with logits at 1/4 of the labels' size: one program per
    16 x 16 tile of low-resolution pixels (its first row and column the halo), its run loops at H / h and
    W / w (4 at s = 4) in the full chunks and in the remainder chunk, the floor of the low-resolution logits and
    gradient."""
    _need_triton_sm90_tools()
    ctx = model.Context(tmp_path, log=lambda m: None)
    row = ctx.triton_row("hierarchical_softmax", "float32", "backward", "nchw", 4).as_dict()
    assert (row["upsample"], row["pass"], row["kernel"]) == (4, "backward", "_hierarchical_softmax_up_bwd_kernel")
    tree = trees.load("vistas")
    P, p, C = 8 * 2 ** 20, 8 * 256 * 256, tree.num_leaves
    assert row["floor_bytes"] == 2 * p * C * 4 + 8 * P + 4 * (tree.depth + 1) * P
    assert row["floor_formula"] == model.UP_FLOOR_FORMULAS[("hierarchical_softmax", "backward")]
    tiles = (-(-256 // 15)) ** 2  # 15 x 15 written per 16 x 16 tile
    assert row["threads"] == 8 * tiles * 256  # one low-resolution pixel per thread, 8 warps a program
    trips = sorted(lp["trips"] for lp in row["loops"])
    # runs of 4 rows (columns), 6 in the first of 18 tile rows (columns); 8 chunks of 8 leaves, then the last 2
    # leaves in a chunk of their own, whose run loops are copies of their own (inlined at a second call site)
    assert trips == pytest.approx([4 + 2 / 18] * 4 + [8])
    assert row["issue_ms"] > 0 and not row["warnings"]


def test_update_replaces_only_the_selected_rows(tmp_path):
    # --update: a re-run of a few kernels keeps the other rows of sm90.json as they were, in the model's order,
    # and drops the not-fused notes of the (op, backend, pass) it re-ran.
    import argparse
    import json as _json

    from benchmarks.sm90 import __main__ as cli

    def row(op, backend, dtype, pass_, layout, up, ms):
        return {"op": op, "backend": backend, "dtype": dtype, "pass": pass_, "layout": layout, "upsample": up,
                "issue_ms": ms}

    old = [row("hierarchical_softmax", "triton", "float32", "forward", "nchw", 1, 1.0),
           row("tree_min", "cuda", "float32", "forward", "nchw", 1, 2.0),
           row("tree_min", "cuda", "bfloat16", "forward", "nchw", 1, 3.0)]
    notes = [{"rows": "tree_min triton backward", "reason": "old"}, {"rows": "decode cuda forward", "reason": "kept"}]
    (tmp_path / "sm90.json").write_text(_json.dumps({"kernels": old, "not_fused": notes}))
    args = argparse.Namespace(out=tmp_path, op=["tree_min"], backend=["cuda", "triton"], dtype=["float32"],
                              passes=["forward", "backward"], layout=["nchw"], upsample=[1])
    fresh = [row("tree_min", "cuda", "float32", "forward", "nchw", 1, 0.5)]
    rows, not_fused = cli._updated(args, fresh, {})
    assert [r["issue_ms"] for r in rows] == [1.0, 0.5, 3.0]
    assert not_fused == {"decode cuda forward": "kept"}
    with pytest.raises(SystemExit, match="--update needs"):
        cli._updated(argparse.Namespace(**{**vars(args), "out": tmp_path / "none"}), fresh, {})


def test_weights_option_models_the_fused_weights(tmp_path):
    """--weights: the loss rows' calls pass class_weight / pixel_weight (one per leaf, the target's shape), the
    floor counts a float32 pixel weight per pixel, the parser refuses it for CUDA rows and with --update; end to
    end (with ptxas/nvdisasm), the weighted Triton hierarchical softmax backward compiles its HAS_CW / HAS_PW
    variant."""
    from benchmarks.sm90 import __main__ as cli, triton_side

    P, C, D = 10, 66, 3
    for op, pass_ in model.FLOOR_FORMULAS:
        plain = model.floor_bytes(op, pass_, P, C, 4, D)
        assert model.floor_bytes(op, pass_, P, C, 4, D, 1, "class") == plain
        assert model.floor_bytes(op, pass_, P, C, 4, D, 1, "class+pixel") == plain + (4 * P if op != "decode" else 0)
        assert ("pixel weights" in model.floor_formula(op, pass_, 1, "pixel")) == (op != "decode")
    calls = []

    def fake(*a, **k):
        calls.append((a, k))
    fake.takes_weights = True
    tree = trees.load("cityscapes")
    x, t = object(), torch.empty(2, 12, 16, device="meta")
    triton_side._call("tree_min", fake, x, t, tree, False, "class+pixel")
    triton_side._call("decode", fake, x, t, tree, False, "class+pixel")
    (a, k), (a2, k2) = calls
    assert k["class_weight"].shape == (tree.num_leaves,) and k["pixel_weight"].shape == t.shape and k2 == {}
    with pytest.raises(model.NotFused, match="weights"):
        triton_side._call("tree_min", lambda *a, **k: None, x, t, tree, False, "pixel")
    for argv in (["--weights", "pixel"], ["--weights", "pixel", "--backend", "triton", "--update"]):
        with pytest.raises(SystemExit):
            cli.main(argv + ["--no-write"])
    _need_triton_sm90_tools()
    ctx = model.Context(tmp_path, log=lambda m: None, weights="class+pixel")
    row = ctx.triton_row("hierarchical_softmax", "float32", "backward", "nchw").as_dict()
    plain = model.floor_bytes("hierarchical_softmax", "backward", 8 * 2 ** 20, 66, 4, trees.load("vistas").depth)
    assert row["weights"] == "class+pixel" and row["floor_bytes"] == plain + 4 * 8 * 2 ** 20
    assert row["kernels"][0]["launch"]["HAS_CW"] is True and row["kernels"][0]["launch"]["HAS_PW"] is True


def test_elf_reader_agrees_with_cuobjdump_and_nvdisasm(tmp_path):
    """benchmarks.sm90.elf reads a compiled kernel's parameter layout as ``cuobjdump -elf`` prints it, and its
    symbol index makes ``nvdisasm -fun`` list the same instructions as the whole cubin's listing."""
    _need_triton_sm90_tools()
    import torch

    from benchmarks.sm90 import elf, sass, tools, triton_side

    tree = trees.load("cityscapes")
    x = torch.empty((2, tree.num_leaves, 16, 16), device="meta")
    t = torch.empty((2, 16, 16), dtype=torch.int64, device="meta")
    (launch, *_) = triton_side.record("hierarchical_softmax", "backward", x, t, tree, upsample=False, weights="none")
    comp = triton_side.compile_launch(launch, tmp_path, False)
    params = elf.kparams(comp.cubin)
    assert params == tools.kparams(comp.cubin) and len(params[comp.name]) >= 8
    symbols = elf.functions(comp.cubin)
    assert comp.name in symbols
    whole = sass.parse(tools.disassemble(comp.cubin))[comp.name]
    alone = sass.parse(tools.disassemble(comp.cubin, functions=[symbols[comp.name]]))
    assert list(alone) == [comp.name] and alone[comp.name].instrs == whole.instrs and len(whole.instrs) > 50
    with pytest.raises(elf.ElfError):
        elf.functions(b"\x7fELF\x01\x01" + bytes(64))
