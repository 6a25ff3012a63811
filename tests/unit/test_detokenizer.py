"""Incremental detokenizer: never emits broken UTF-8, and stop strings span tokens."""

import pytest

from qalora_runtime.engine.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """One token per UTF-8 byte: the hardest case for incremental decoding."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


TOK = ByteTokenizer()
TEXT = "Héllo wörld 😀 日本語. STOP and more"


def run(stop=None, include=False):
    d = IncrementalDetokenizer(TOK, TOK.encode("prompt "), stop=stop, include_stop_str_in_output=include)
    parts = []
    for t in TOK.encode(TEXT):
        parts.append(d.add_token(t))
        if d.stop_reason:
            break
    if not d.stop_reason:
        parts.append(d.flush())
    return parts, d


def test_no_broken_characters_and_full_text():
    parts, d = run()
    assert "".join(parts) == TEXT
    assert all("\ufffd" not in p for p in parts)
    assert d.stop_reason is None


def test_stop_string_not_emitted_even_partially():
    parts, d = run(stop=["STOP"])
    assert "".join(parts) == "Héllo wörld 😀 日本語. "
    assert d.stop_reason == "STOP"
    assert not any("S" in p for p in parts)


def test_stop_string_included_when_asked_and_earliest_wins():
    parts, d = run(stop=["and", "語. ST"], include=True)
    assert "".join(parts) == "Héllo wörld 😀 日本語. ST"
    assert d.stop_reason == "語. ST"


@pytest.mark.parametrize("stop", [["xyz"], ["ld 😀 日"]])
def test_held_back_text_is_flushed_or_stopped(stop):
    parts, d = run(stop=stop)
    if stop == ["xyz"]:
        assert "".join(parts) == TEXT
    else:
        assert "".join(parts) == "Héllo wör"
