"""The kernel benchmarks' command lines: bad options fail with a clear message, tiny runs print their tables."""

from __future__ import annotations

import pytest
import torch

from qalora_runtime.bench import crossover, kernels
from qalora_runtime.kernels import cpu_fused


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "float32"], "'float32' is not one of fp32, bf16"),
        (["--bits", "5"], "5 is not one of 2, 3, 4, 8"),
        (["--shapes", "64x"], "bad KxN shapes"),
        (["--shapes", "64"], "'64' is not KxN"),
        (["--m", "0"], "0 is not positive"),
        (["--m", ","], "expected a comma list of row counts"),
        (["--kernels", "no_such_kernel"], "unknown kernel(s) no_such_kernel"),
        (["--shapes", "96x64", "--group", "64"], "--group 64 does not divide K=96"),
    ],
)
def test_kernels_bench_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        kernels.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_crossover_m_is_where_gemm_wins_from_then_on():
    ms = [1, 2, 4, 8, 16]
    assert crossover.crossover_m([1, 2, 4, 8, 16], [5, 5, 3, 4, 6], ms) == 4
    # A single win followed by a loss is noise, not a crossover.
    assert crossover.crossover_m([1, 2, 4, 8, 16], [5, 1, 5, 9, 17], ms) is None
    assert crossover.crossover_m([1, 2], [0.5, 1], [1, 2]) == 1


@pytest.mark.skipif(cpu_fused._ext is None, reason="cpu_fused extension not built")
def test_crossover_bench_prints_a_table(capsys):
    assert crossover.main(["--shapes", "64x32", "--m", "1,4", "--bits", "3", "--dtype", "fp32",
                           "--pool-mib", "0", "--min-time", "0"]) == 0
    out = capsys.readouterr().out
    assert "K=64 N=32 3-bit fp32: crossover M = " in out
    switch = cpu_fused.gemm_min_m(cpu_fused.LAYOUT_PLANE, torch.float32)
    assert f"(dispatcher: GEMM_MIN_M = {switch}, gemm, plane layout)" in out  # 3-bit + fp32: plane layout
    assert "gemv us" in out and "dense us" in out


def test_crossover_bench_rejects_unsorted_m(capsys):
    with pytest.raises(SystemExit):
        crossover.main(["--m", "4,1"])
    assert "--m must be ascending" in capsys.readouterr().err


@pytest.mark.skipif(cpu_fused._ext is None, reason="cpu_fused extension not built")
def test_kernels_bench_prints_a_table(capsys, monkeypatch):
    # The bandwidth probe reads 256 MiB; a tiny stand-in keeps this test fast.
    monkeypatch.setattr(kernels, "streaming_read_gbps", lambda: 1.0)
    assert kernels.main(["--shapes", "64x32", "--m", "1", "--bits", "4", "--dtype", "fp32",
                         "--kernels", "cpu_fused", "--pool-mib", "0", "--min-time", "0"]) == 0
    out = capsys.readouterr().out
    assert "K=64 N=32 M=1" in out
    assert "cpu_fused 4b fp32" in out


def test_default_pool_exceeds_the_last_level_cache():
    from qalora_runtime.bench import common
    l3 = common.l3_cache_mib()
    assert common.default_pool_mib() >= max(96.0, 3 * l3 if l3 else 0.0)
