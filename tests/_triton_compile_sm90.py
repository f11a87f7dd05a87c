"""Compile the Triton kernels for sm_90 without a GPU (run in a subprocess without TRITON_INTERPRET).

The interpreter runs Python, not the compiler: this catches what only the compiler rejects (type
changes of loop-carried values, float64 layout bugs, ...). Prints one line per kernel variant and
exits 1 on the first failure. Usage: python _triton_compile_sm90.py
"""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hss_kernels.triton import _common as C
from hss_kernels.triton import hierarchical_softmax as hs
from hss_kernels.triton import tree_min as tm

TARGET = GPUTarget("cuda", 90, 32)
ACC = {"fp32": ("fp32", tl.float32), "bf16": ("fp32", tl.float32), "fp64": ("fp64", tl.float64)}


def signature(fn, ptrs, consts, int_ty="i64"):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in ("eps", "gamma"):
            sig[name] = "fp32"
        else:
            sig[name] = int_ty
    return sig


def build(fn, ptrs, consts, warps, int_ty="i64"):
    triton.compile(ASTSource(fn=fn, signature=signature(fn, ptrs, consts, int_ty), constexprs=consts),
                   target=TARGET, options=dict(num_warps=warps))


def main():
    cases = []
    for x in ("fp32", "bf16", "fp64"):
        acc_s, acc = ACC[x]
        bc, bp, warps = C.block_sizes(66, 1 << 20, False)
        ptrs = dict(x_ptr="*" + x, t_ptr="*i64", lg_ptr="*i32", w_ptr="*" + acc_s, stats_ptr="*" + acc_s,
                    loss_ptr="*" + acc_s, part_ptr="*" + acc_s, cnt_ptr="*i32", g_ptr="*" + x, go_ptr="*" + acc_s)
        # forward, backward (scalar and per-pixel grad_output), single pass
        for cs, ws, lm, gm, eps in ((True, True, 2, 0, False), (False, False, 0, 1, False), (False, False, 0, 2, True),
                                    (True, False, 2, 1, True)):
            consts = dict(L=66, D=3, BLOCK_C=bc, BLOCK_P=bp, ACC=acc, HAS_EPS=eps, COMPUTE_STATS=cs, WRITE_STATS=ws,
                          LOSS_MODE=lm, GRAD_MODE=gm)
            if x != "bf16" or gm == 1:  # bf16 differs from fp32 only in loads and stores
                cases.append((f"hsm {x} {consts}", hs._hsm_kernel, ptrs, consts, warps))
        bc, bp, warps = C.block_sizes(147, 1 << 20, False)
        ptrs = dict(x_ptr="*" + x, t_ptr="*i64", tab_ptr="*i32", k_ptr="*" + acc_s, loss_ptr="*" + acc_s,
                    part_ptr="*" + acc_s, cnt_ptr="*i32", g_ptr="*" + x, go_ptr="*" + acc_s)
        for ue, focal, lm, gm, scan in ((True, True, 2, 0, False), (True, True, 0, 2, False),
                                        (True, False, 2, 1, False), (False, True, 1, 1, False),
                                        (True, True, 2, 0, True), (True, False, 0, 2, True)):
            consts = dict(V=147, L=123, D=3, DI=2, I=24, BLOCK_C=bc, BLOCK_P=bp, ACC=acc, USE_EXTREMA=ue, FOCAL=focal,
                          HAS_EPS=focal, LOSS_MODE=lm, GRAD_MODE=gm, SCAN=scan)
            if x != "bf16" or gm == 2:
                cases.append((f"tree {x} {consts}", tm._tree_kernel, ptrs, consts, warps))
    # On a GPU, int arguments below 2**31 (sizes, strides, ignore_index) are passed as i32: the usual case.
    cases += [(f"{name} i32", fn, ptrs, consts, warps, "i32") for name, fn, ptrs, consts, warps in
              (cases[0], cases[1], cases[4], cases[5])]  # fp32: hsm and tree, forward and backward
    from hss_kernels.triton import decode as dk
    for x in ("fp32", "bf16", "fp64"):
        block_c, block_l, block_p, warps = dk._blocks(147, 123, 1 << 20, False)
        ptrs = dict(x_ptr="*" + x, out_ptr="*i64", path_ptr="*i32", plen_ptr="*i32")
        for act, mean in ((0, False), (1, True), (2, False)):
            consts = dict(C=147, L=123, D=3, ACT=act, MEAN=mean, F64=x == "fp64", BLOCK_C=block_c,
                          BLOCK_L=block_l, BLOCK_P=block_p)
            for int_ty in ("i32", "i64") if act == 1 else ("i32",):
                cases.append((f"decode {x} {int_ty} {consts}", dk._decode_kernel, ptrs, consts, warps, int_ty))
    for name, fn, ptrs, consts, warps, *int_ty in cases:
        try:
            build(fn, ptrs, consts, warps, *int_ty)
        except Exception as exc:  # report which variant, then fail
            print("FAIL", name, repr(exc)[-2000:])
            return 1
        print("ok", name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
