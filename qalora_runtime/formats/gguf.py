"""GGUF importer: a llama.cpp GGUF file -> merged QA-LoRA checkpoint (format v1).

The GGUF block formats we accept are already group-wise affine quantization
with 32-wide groups along the input dimension, so they map onto
``W = scales * (q - zeros)`` without changing a dequantized value:

* ``Q4_1`` (``w = d*q + m``): 4-bit, ``scale = d``, ``zero = -m/d``;
* ``Q4_0`` (``w = d*(q - 8)``): 4-bit, ``scale = d``, ``zero = 8``;
* ``Q8_0`` (``w = d*q``, ``q`` int8): 8-bit, ``q' = q + 128``, ``zero = 128``;
* ``F32`` / ``F16`` / ``BF16``: kept as float tensors (2-D linears listed in
  ``modules_not_quantized``).

Scales are an exact float16 copy of ``d``; zeros are float32, so Q4_0/Q8_0 are
bit exact and Q4_1 differs from llama.cpp's own value by the float32 rounding
of ``-m/d`` (about 1 ulp of float32, see docs/FORMAT.md).

llama.cpp permutes the output rows of ``attn_q``/``attn_k`` for its rotary
layout; we undo it exactly like ``transformers``' GGUF loader. GGUF rows are
output features with blocks along the input features, i.e. the transpose of
GPTQ's ``[K, N]`` orientation; a quantized token embedding is stored in that
same linear orientation (in = hidden, out = vocab) so a tied ``lm_head`` uses it
directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..quant.packing import pack_int32
from ..quant.spec import QuantSpec
from .checkpoint import QuantizationConfig, save_checkpoint

logger = logging.getLogger(__name__)

#: Bumped whenever the converter's output changes, so cached conversions are redone.
GGUF_CONVERTER_VERSION = 1
#: Written into every converted directory; records where it came from.
SOURCE_FILE = "qalora_source.json"

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
_BLOCK = 32  # elements per block of every supported quantized type


@dataclass(frozen=True)
class _Arch:
    model_type: str
    architecture: str
    permute_qk: bool  # llama.cpp permutes q/k rows for llama-style rope


SUPPORTED_ARCHS: dict[str, _Arch] = {
    "llama": _Arch("llama", "LlamaForCausalLM", True),
    "mistral": _Arch("mistral", "MistralForCausalLM", True),
    "qwen2": _Arch("qwen2", "Qwen2ForCausalLM", False),  # neox rope: not permuted
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> tuple[str, str]:
    """Map a GGUF tensor name to ``(HF module name, suffix)``, e.g. ``blk.0.attn_q.weight``."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base], suffix
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}", suffix
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known Llama-family equivalent")


def qk_unpermute_index(rows: int, n_heads: int) -> np.ndarray:
    """Row index that undoes llama.cpp's q/k permute: ``hf = gguf[index]``.

    llama.cpp maps HF row ``(h, a, d)`` (head, rotary half, pair) to GGUF row
    ``(h, d, a)``; this is ``transformers``' ``_reverse_permute_weights``.
    """
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"cannot unpermute {rows} rows over {n_heads} heads")
    return np.arange(rows).reshape(n_heads, rows // n_heads // 2, 2).transpose(0, 2, 1).reshape(-1)


# -- block decoding -----------------------------------------------------------
def decode_blocks(raw: np.ndarray, qtype: str, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split raw GGUF rows into ``(q levels [N, K] uint8, d [N, K/32] f16, m [N, K/32] f16)``.

    ``q`` is already unsigned (Q8_0 shifted by 128); ``m`` is the Q4_1 minimum
    (zeros for the other types, unused).
    """
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, k // _BLOCK, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    m = np.zeros_like(d)
    if qtype == "Q8_0":
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    else:
        if qtype == "Q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            qs = blocks[..., 4:]
        else:
            qs = blocks[..., 2:]
        # element j of a block is the low nibble of byte j, element j+16 the high nibble
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return q.reshape(n, k), d, m


def pack_levels(levels: np.ndarray, bits: int) -> torch.Tensor:
    """GPTQ-pack uint8 ``levels [K, N]`` along K; same words as ``pack_int32`` for 4/8 bits.

    For 4 and 8 bits every level sits inside one word, so a vectorized shift-or
    suffices; it is ~20x faster than the general bitstream packer on big layers.
    """
    if bits not in (4, 8):
        return pack_int32(torch.from_numpy(levels).to(torch.int32), bits, dim=0)
    per_word = 32 // bits
    k, n = levels.shape
    x = levels.reshape(k // per_word, per_word, n).astype(np.uint32)
    words = np.zeros((k // per_word, n), dtype=np.uint32)
    for j in range(per_word):
        words |= x[:, j] << np.uint32(bits * j)
    return torch.from_numpy(words.view(np.int32))


def blocks_to_gptq(
    q: np.ndarray, d: np.ndarray, m: np.ndarray, qtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, QuantSpec]:
    """Rows-major GGUF blocks -> GPTQ ``(qweight [K*b/32, N], scales f16, zeros f32 [K/32, N])``."""
    spec = QuantSpec(8 if qtype == "Q8_0" else 4, _BLOCK)
    d64 = d.astype(np.float64)
    scales = d.copy()
    if qtype == "Q4_1":
        dead = d64 == 0  # w = m for the whole block: q=0, scale=1, zero=-m reproduces it exactly
        with np.errstate(divide="ignore", invalid="ignore"):
            zeros = np.where(dead, -m.astype(np.float64), -m.astype(np.float64) / d64)
        scales[dead] = 1.0
        if dead.any():
            q = q.copy()
            q.reshape(*dead.shape, _BLOCK)[dead] = 0
    else:
        zeros = np.full(d.shape, 128.0 if qtype == "Q8_0" else 8.0)
    qweight = pack_levels(np.ascontiguousarray(q.T), spec.bits)
    scales_t = torch.from_numpy(np.ascontiguousarray(scales.T))
    zeros_t = torch.from_numpy(np.ascontiguousarray(zeros.T.astype(np.float32)))
    return qweight, scales_t, zeros_t, spec


def float_tensor(raw: np.ndarray, qtype: str) -> torch.Tensor:
    """A GGUF F32/F16/BF16 tensor (numpy shape, HF orientation) as a torch tensor."""
    if qtype == "BF16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(raw, dtype=np.float32 if qtype == "F32" else np.float16))


# -- metadata -----------------------------------------------------------------
def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, float) and f.types and f.types[0].name == "FLOAT32":
        value = float(str(np.float32(value)))  # shortest decimal of the stored float32 (1e-05, not 9.99e-06)
    return value


def model_config(reader: Any, arch_name: str, tensor_names: set[str], dtype: str) -> dict[str, Any]:
    """HF config dict (Llama/Mistral/Qwen2 fields) from the GGUF metadata."""
    import transformers

    arch = SUPPORTED_ARCHS[arch_name]
    a = arch_name
    heads = int(_field(reader, f"{a}.attention.head_count"))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    scaling = _field(reader, f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported by the importer yet")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{a}.vocab_size", len(tokens.data) if tokens is not None else None)
    rope_theta = float(_field(reader, f"{a}.rope.freq_base", 10000.0))
    kw: dict[str, Any] = dict(
        architectures=[arch.architecture],
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{a}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{a}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{a}.attention.head_count_kv", heads)),
        max_position_embeddings=int(_field(reader, f"{a}.context_length", 2048)),
        rms_norm_eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    head_dim = _field(reader, f"{a}.attention.key_length")
    if arch.model_type != "qwen2":
        kw["head_dim"] = int(head_dim) if head_dim else hidden // heads
    if arch.model_type == "llama":
        kw["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    cls = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}[arch.model_type])
    config = {k: v for k, v in cls(**kw).to_dict().items() if k not in _GENERIC_CONFIG_KEYS}
    # transformers 5 moved rope_theta into rope_parameters and torch_dtype to dtype;
    # write both spellings so v4-style readers find them too
    config["rope_theta"] = rope_theta
    config["torch_dtype"] = config["dtype"] = dtype
    return config


# PretrainedConfig fields that say nothing about a causal LM checkpoint (classification labels etc.)
_GENERIC_CONFIG_KEYS = frozenset({
    "_name_or_path", "transformers_version", "id2label", "label2id", "return_dict", "output_attentions",
    "output_hidden_states", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
})


def _save_tokenizer(gguf_path: Path, out: Path, config: dict[str, Any]) -> None:
    """Tokenizer, chat template, special tokens and generation config from the GGUF metadata."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))
    _check_tokenizer_round_trip(tok, AutoTokenizer.from_pretrained(str(out)))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    GenerationConfig(**gen).save_pretrained(str(out))


_PROBE_TEXT = "Hello, world! 123 ünïcödé 日本語\n\tdef f(x): return x"
_PROBE_CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def _check_tokenizer_round_trip(ref: Any, saved: Any) -> None:
    """Refuse to finish if the saved tokenizer encodes or templates differently (a cheap guard
    against transformers version quirks; the full comparison lives in the integration tests)."""
    if saved.encode(_PROBE_TEXT) != ref.encode(_PROBE_TEXT) or saved.chat_template != ref.chat_template:
        raise ValueError("the tokenizer saved from the GGUF metadata does not reproduce the GGUF tokenizer")
    if ref.chat_template:
        try:
            want = ref.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates may reject this chat (roles, tools); nothing to compare then
            return
        if saved.apply_chat_template(_PROBE_CHAT, tokenize=False, add_generation_prompt=True) != want:
            raise ValueError("the chat template saved from the GGUF metadata renders differently")


# -- conversion ---------------------------------------------------------------
def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not an empty directory; remove it or pick another")


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Convert a GGUF file into a merged checkpoint directory ``out_dir`` and return its path.

    Written into a temporary sibling directory and renamed into place at the
    end, so an interrupted conversion never leaves a directory that looks valid.
    Raises ValueError for unsupported architectures, tensor types or names.
    """
    import gguf

    src, out = Path(gguf_path), Path(out_dir)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    _check_out_dir(out)
    started = time.perf_counter()
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError) as e:
        raise ValueError(f"{src} is not a readable GGUF file: {e}") from None
    arch_name = str(_field(reader, "general.architecture", ""))
    if arch_name not in SUPPORTED_ARCHS:
        raise ValueError(
            f"GGUF architecture {arch_name!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise ValueError(
                f"GGUF tensor {t.name!r} has type {t.tensor_type.name}, which the importer does not "
                f"support; supported types: {', '.join(SUPPORTED_TYPES)}"
            )
        hf_name(t.name)  # fail on unknown names before any work
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch_name}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch_name}.attention.head_count_kv", heads))
    permute = SUPPORTED_ARCHS[arch_name].permute_qk

    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, QuantSpec] = {}
    not_quantized: list[str] = []
    float_types: Counter[str] = Counter()
    for t in tqdm(reader.tensors, desc=f"converting {src.name}", unit="tensor", disable=not progress):
        module, suffix = hf_name(t.name)
        qtype = t.tensor_type.name
        raw = t.data
        index = None
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            index = qk_unpermute_index(raw.shape[0], heads if ".attn_q." in t.name else kv_heads)
        if qtype in QUANT_TYPES:
            if suffix != "weight" or raw.ndim != 2:
                raise ValueError(f"GGUF tensor {t.name!r}: quantized {qtype} is only supported for 2-D weights")
            k = int(t.shape[0])  # GGUF dims are (in, out)
            q, d, m = decode_blocks(raw, qtype, k)
            if index is not None:
                q, d, m = q[index], d[index], m[index]  # permuting output rows of blocks is exact
            qweight, scales, zeros, spec = blocks_to_gptq(q, d, m, qtype)
            tensors.update({f"{module}.qweight": qweight, f"{module}.scales": scales, f"{module}.zeros": zeros})
            specs[module] = spec
        else:
            w = float_tensor(raw, qtype)
            if index is not None:
                w = w[torch.from_numpy(index)]
            tensors[f"{module}.{suffix}"] = w
            if suffix == "weight" and w.dim() == 2:
                not_quantized.append(module)
                float_types[qtype] += w.numel()

    counts = Counter((s.bits, s.group_size) for s in specs.values())
    bits, group = counts.most_common(1)[0][0] if counts else (4, _BLOCK)
    overrides = {
        m: {"bits": s.bits, "group_size": s.group_size}
        for m, s in sorted(specs.items())
        if (s.bits, s.group_size) != (bits, group)
    }
    quant_config = QuantizationConfig(
        bits=bits,
        group_size=group,
        module_overrides=overrides,
        modules_not_quantized=tuple(sorted(not_quantized)),
        source=f"gguf:{src.name}",
    )
    dtype = {"F16": "float16", "BF16": "bfloat16"}.get(
        float_types.most_common(1)[0][0] if float_types else "F32", "float32"
    )
    config = model_config(reader, arch_name, names, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # same fs: rename is atomic
    try:
        save_checkpoint(tmp, config, quant_config, tensors)
        if reader.fields.get("tokenizer.ggml.model") is not None:
            _save_tokenizer(src, tmp, config)
        else:
            logger.warning("%s has no tokenizer metadata; no tokenizer files written", src.name)
        stat = src.stat()
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "source_format": "gguf", "file": src.name, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "converter_version": GGUF_CONVERTER_VERSION,
        }, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        _check_out_dir(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "converted %s -> %s: %d tensors, %d quantized modules, %.1fs",
        src.name, out, len(reader.tensors), len(specs), time.perf_counter() - started,
    )
    return out
