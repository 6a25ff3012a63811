"""The Triton kernels compile for NVIDIA GPUs, fit their shared memory and spill nothing in a loop.

``qalora_runtime.kernels.triton_aot`` builds cubins for sm_80/86/90 with the ptxas
in the triton wheel, no GPU needed. The compile runs in a child process because
this one decorates the kernels under ``TRITON_INTERPRET=1`` (tests/conftest.py),
and only JIT functions compile. The suite covers the riskiest variants (the
largest GEMM tile of every bit width and dtype at G = 32, the GEMV's two row
blocks); ``python -m qalora_runtime.kernels.triton_aot`` checks all of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _compiler_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's notice; the default
    return env


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=_compiler_env(),
                          capture_output=True, text=True, timeout=timeout)


pytestmark = pytest.mark.skipif(
    not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
    reason=f"this triton wheel has no NVIDIA ptxas/cuobjdump in {NVIDIA_BIN}",
)


def _table_rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| gem")]


@pytest.mark.parametrize(
    "args, variants, targets",
    [
        # The 64x128 bf16 tile and the 32x64 fp32 tile, every bit width, G = 32 (the
        # several-groups-per-tile path), on A100, the 99 KB parts (A10, L4) and Hopper.
        (["--arch", "80,86,90", "--bits", "2,3,4,8", "--groups", "32", "--dtypes", "bfloat16,float32",
          "--m", "64"], 8, 3),
        # The GEMV at M = 1 and M = 8 (both outputs: plain and split-K partials).
        (["--arch", "90", "--bits", "3,4", "--groups", "32,128", "--dtypes", "float16", "--m", "1,8"], 16, 1),
    ],
    ids=["gemm-large-tiles", "gemv"],
)
def test_launched_variants_compile_fit_and_do_not_spill(args: list[str], variants: int, targets: int) -> None:
    run = _run(["-m", "qalora_runtime.kernels.triton_aot", *args])
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _table_rows(run.stdout)
    assert len(rows) == variants * targets, run.stdout
    assert all(row[-1] == "ok" for row in rows), run.stdout
    assert f"{variants} variants x {targets} targets, 0 unfit" in run.stdout


_UNFIT = """
import json, torch
from qalora_runtime.kernels import triton_aot as a, triton_fused as tf
found = {}
for name, dtype, cfg, arch in (
    ("too_big", torch.bfloat16, tf.LaunchConfig(128, 256, 64, 8, 4), 86),
    ("spills", torch.float32, tf.LaunchConfig(64, 64, 32, 4), 90),
):
    v = a.Variant("gemm", 4, 128, dtype, dtype, cfg)
    r = a.compile_variant(v, arch)
    found[name] = {"shared": r.shared_bytes, "loop_stores": r.loop_spills.stores, "mma": r.mma_instructions,
                   "problems": a.problems(v, arch, r)}
print(json.dumps(found))
"""


def test_check_flags_unfit_tiles() -> None:
    """The check can fail: a 128x256 4-stage tile needs more than a GA10x block's 99 KB, and an
    exact fp32 64x64 tile (the FMA path) spills inside its K loop."""
    run = _run(["-c", _UNFIT])
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["too_big"]["shared"] > 101376
    assert any("shared" in p for p in found["too_big"]["problems"])
    assert found["too_big"]["mma"] > 0  # a bf16 tl.dot runs on tensor cores...
    assert found["spills"]["mma"] == 0  # ...an exact fp32 one on FMAs
    assert found["spills"]["loop_stores"] > 0
    assert any("spills in a loop" in p for p in found["spills"]["problems"])


def test_count_loop_spills_reads_backward_branches() -> None:
    from qalora_runtime.kernels.triton_aot import LoopSpills, count_loop_spills

    sass = """
        /*00d0*/                   STL [R1], R10 ;
        /*0540*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0600*/                   LDL R7, [R1+0x8] ;
        /*0700*/                   STL [R1+0x8], R7 ;
        /*24c0*/              @!P4 BRA 0x540 ;
        /*24e0*/                   LDL.LU R2, [R1] ;
        /*2630*/                   BRA 0x2630;
    """
    # Inside 0x540..0x24c0: one load and one store among four instructions; the trap is no loop.
    assert count_loop_spills(sass) == LoopSpills(stores=1, loads=1, instructions=4)
    assert LoopSpills(stores=1, loads=0, instructions=1000).costly()
    assert not LoopSpills(stores=0, loads=1, instructions=458).costly()  # an invariant reloaded
    assert LoopSpills(stores=0, loads=10, instructions=458).costly()
