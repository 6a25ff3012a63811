"""Ahead-of-time compile of the Triton kernels for NVIDIA GPUs, on any machine (no GPU needed).

``triton.compile`` with a ``GPUTarget`` lowers a kernel to PTX and assembles it with
the ``ptxas`` that ships in the triton wheel, so every kernel variant ``triton_fused``
launches can be built for sm_80, sm_86, sm_89 and sm_90 on a CPU-only machine. That
catches what the interpreter (``TRITON_INTERPRET=1``) cannot:

* code the interpreter runs but the compiler rejects;
* shared memory above a GPU's per-block limit (the launch would fail with
  ``OutOfResources`` on that GPU);
* a 16-bit GEMM without tensor-core instructions (``HMMA``/``HGMMA``);
* register spills inside a loop (local-memory stores between a backward branch
  and its target in the SASS, or reloads above 1% of the loop), a speed defect.
  ptxas sometimes parks a loop-invariant value on the stack (``STACK`` 8 B, one
  store before the K loop, at most one reload an iteration); that is reported,
  not failed (see ``LoopSpills.costly``).

Variants are compiled as the JIT would specialize them for real tensors: every
pointer 16-byte aligned, ``N``, ``K``, the row stride (and ``K_PER_SPLIT``)
divisible by 16, and the GEMV's ``M = 1`` a constant; ``--unaligned`` drops the
divisibility hints (a layer whose N is not a multiple of 16). Speed is not
measured here: that needs a GPU (``scripts/gpu_check.py``).

Run it in a process without ``TRITON_INTERPRET=1`` (the kernels must be JIT
functions, not interpreted ones)::

    python -m qalora_runtime.kernels.triton_aot                # all variants, all four targets
    python -m qalora_runtime.kernels.triton_aot --arch 86 --bits 3 --dtypes bfloat16

Exit status 0 when every variant compiles and none of the above is found; 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.errors import TritonError

from . import triton_fused as tf
from . import triton_kernels

#: Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin):
#: A100 163 KB; GA10x / AD10x (A10, A40, L4, L40S, RTX 30/40) 99 KB; H100/H200 227 KB.
SHARED_LIMIT_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_TRITON_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
#: Integer arguments the JIT sees as multiples of 16 for real layers (K % 32 == 0 always).
_ALIGNED_INTS = ("N", "K", "stride_xm", "K_PER_SPLIT")
_RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+)")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_MMA = re.compile(r"\bHG?MMA\.")
_BRANCH = re.compile(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)")


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its constexprs, activation/output dtypes and launch options."""

    kernel: str  # "gemv" or "gemm"
    bits: int
    group_size: int
    dtype: torch.dtype  # activations
    out_dtype: torch.dtype  # the GEMV writes fp32 partials when it splits K, else the activation dtype
    config: tf.LaunchConfig

    def label(self) -> str:
        c = self.config
        out = "" if self.out_dtype == self.dtype else f"->{str(self.out_dtype)[6:]}"
        return (f"{self.kernel} {self.bits}b g{self.group_size} {str(self.dtype)[6:]}{out} "
                f"{c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}")


@dataclass(frozen=True)
class LoopSpills:
    """Local-memory traffic inside the loops of a SASS listing (static instruction counts)."""

    stores: int  # STL in a loop: a value made in the loop evicted for lack of registers
    loads: int  # LDL in a loop; without stores, values spilled before the loop reloaded
    instructions: int  # all instructions inside loops

    def costly(self) -> bool:
        """Register pressure inside a loop: any spill store there, or reloads above 1% of it.

        A loop-invariant value parked on the stack before the loop and reloaded once an
        iteration (ptxas does that with registers to spare) is one L1 hit among hundreds
        of instructions; the spills that matter (fp32 GEMM tiles too large, ~1.6k of
        the loop's instructions) store inside the loop.
        """
        return self.stores > 0 or self.loads * 100 > self.instructions


@dataclass(frozen=True)
class Resources:
    """What one variant needs per block on one target."""

    registers: int  # per thread
    stack_bytes: int  # stack frame per thread
    shared_bytes: int
    loop_spills: LoopSpills
    mma_instructions: int  # tensor-core matrix multiplies (HMMA, or HGMMA on Hopper)


def count_loop_spills(sass: str) -> LoopSpills:
    """Count local-memory accesses (``LDL``/``STL``) that lie inside a loop of a SASS listing.

    A loop is the address range between a branch and an earlier target (a branch to
    itself is the trap at the end of every kernel, not a loop).
    """
    instructions = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    loops = []
    for address, text in instructions:
        branch = _BRANCH.search(text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    in_loops = [text for address, text in instructions if any(lo <= address <= hi for lo, hi in loops)]
    return LoopSpills(
        stores=sum(1 for text in in_loops if re.search(r"\bSTL\b", text)),
        loads=sum(1 for text in in_loops if re.search(r"\bLDL\b", text)),
        instructions=len(in_loops),
    )


def launch_variants(
    bits: tuple[int, ...], groups: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
    ms: tuple[int, ...], k: int,
) -> list[Variant]:
    """The distinct variants ``TritonFusedKernel.forward`` launches for these rows and a K."""
    variants: dict[Variant, None] = {}
    for b in bits:
        for g in groups:
            for dtype in dtypes:
                for m in ms:
                    if m <= tf.GEMV_MAX_M:
                        cfg = tf.gemv_config(m, k)
                        for out in (dtype, torch.float32):  # without and with split-K
                            variants[Variant("gemv", b, g, dtype, out, cfg)] = None
                    else:
                        variants[Variant("gemm", b, g, dtype, dtype, tf.gemm_config(m, k, dtype))] = None
    return list(variants)


def _source(v: Variant, aligned: bool) -> ASTSource:
    if v.kernel == "gemv":
        fn = triton_kernels.qlinear_gemv_kernel
        ints = ("M", "N", "K", "K_PER_SPLIT", "stride_xm")
        constants: dict[str, object] = {}
        if v.config.block_m == 1:  # only M = 1 gets one-row blocks; the JIT makes an int == 1 a constant
            ints, constants = ints[1:], {"M": 1}
    else:
        fn = triton_kernels.qlinear_gemm_kernel
        ints = ("M", "N", "K", "stride_xm")
        constants = tf.gemm_constants(v.dtype)
    pointers = {
        "x_ptr": _TRITON_TYPES[v.dtype], "qw_ptr": "*i32", "qh_ptr": "*i32",
        "s_ptr": "*fp32", "z_ptr": "*fp32", fn.arg_names[5]: _TRITON_TYPES[v.out_dtype],
    }  # fmt: skip
    c = v.config
    constants |= {"BITS": v.bits, "GROUP_SIZE": v.group_size,
                  "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k}
    signature = pointers | dict.fromkeys(ints, "i32") | dict.fromkeys(constants, "constexpr")
    if set(signature) != set(fn.arg_names):
        raise RuntimeError(f"{fn.__name__}: arguments {fn.arg_names} changed; update triton_aot._source")
    signature = {name: signature[name] for name in fn.arg_names}
    hinted = [n for n, t in signature.items() if t.startswith("*") or n in _ALIGNED_INTS] if aligned else []
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in hinted}
    return ASTSource(fn, signature, constants, attrs)


def _cuobjdump() -> Path:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this triton wheel ships no NVIDIA tools")
    return path


def compile_variant(v: Variant, arch: int, aligned: bool = True) -> Resources:
    """Compile ``v`` for ``sm_<arch>`` and read its resource usage from the cubin."""
    if type(triton_kernels.qlinear_gemm_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("the kernels were decorated under TRITON_INTERPRET=1; run without it")
    compiled = triton.compile(
        _source(v, aligned), target=GPUTarget("cuda", arch, 32),
        options={"num_warps": v.config.num_warps, "num_stages": v.config.num_stages},
    )  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run([str(_cuobjdump()), "-res-usage", "-sass", f.name],
                                capture_output=True, text=True, check=True).stdout
    match = _RESOURCE_LINE.search(report)
    if match is None or not _SASS_LINE.search(report):
        raise RuntimeError(f"unexpected cuobjdump output:\n{report[:2000]}")
    return Resources(int(match.group(1)), int(match.group(2)), int(compiled.metadata.shared),
                     count_loop_spills(report), len(_MMA.findall(report)))


def problems(v: Variant, arch: int, r: Resources) -> list[str]:
    """Why ``v`` with these resources is unfit for ``sm_<arch>`` (empty when it is fine)."""
    found = []
    if v.kernel == "gemm" and v.dtype != torch.float32 and not r.mma_instructions:
        # A 16-bit tl.dot that fell back to FMAs runs at a fraction of the tensor cores' rate.
        found.append("no tensor-core MMA in a 16-bit GEMM")
    if r.shared_bytes > SHARED_LIMIT_BYTES[arch]:
        found.append(f"shared {r.shared_bytes} B > {SHARED_LIMIT_BYTES[arch]} B")
    if r.loop_spills.costly():
        ls = r.loop_spills
        found.append(f"spills in a loop: {ls.stores} stores, {ls.loads} loads in {ls.instructions} "
                     f"instructions ({r.stack_bytes} B stack)")
    return found


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="80,86,89,90", help="compute capabilities, e.g. 80,90")
    p.add_argument("--bits", default="2,3,4,8")
    p.add_argument("--groups", default="32,64,128")
    p.add_argument("--dtypes", default="float16,bfloat16,float32")
    p.add_argument("--m", default="1,2,4,8,16,32,64", help="rows; each M maps to one GEMV or GEMM variant")
    p.add_argument("--k", type=int, default=4096, help="in_features (only picks BLOCK_K)")
    p.add_argument("--unaligned", action="store_true", help="compile without the divisibility-16 hints")
    args = p.parse_args(argv)
    for arch in _ints(args.arch):
        if arch not in SHARED_LIMIT_BYTES:
            p.error(f"--arch {arch}: known targets are {sorted(SHARED_LIMIT_BYTES)}")
    dtypes = tuple(getattr(torch, name) for name in args.dtypes.split(","))
    variants = launch_variants(_ints(args.bits), _ints(args.groups), dtypes, _ints(args.m), args.k)
    print(f"triton {triton.__version__}, {'un' if args.unaligned else ''}aligned, K={args.k}")
    print("| variant | sm | registers | stack B | loop spill st/ld | shared B | MMA | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for v in variants:
        for arch in _ints(args.arch):
            try:
                r = compile_variant(v, arch, aligned=not args.unaligned)
            except (TritonError, RuntimeError, subprocess.CalledProcessError) as e:
                # a compile error is a finding, reported with the others
                failed += 1
                print(f"| {v.label()} | {arch} | - | - | - | - | - | compile error: {str(e).splitlines()[0][:120]} |")
                continue
            bad = problems(v, arch, r)
            failed += bool(bad)
            print(f"| {v.label()} | {arch} | {r.registers} | {r.stack_bytes} "
                  f"| {r.loop_spills.stores}/{r.loop_spills.loads} | {r.shared_bytes} | {r.mma_instructions} "
                  f"| {'; '.join(bad) or 'ok'} |", flush=True)
    print(f"{len(variants)} variants x {len(_ints(args.arch))} targets, {failed} unfit")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
