"""A real CLIP tokenizer built offline from the BPE vocabulary shipped in spm_rt/assets.

The vocabulary (clip_bpe_simple_vocab_16e6.txt.gz, MIT licence, see assets/LICENSE-CLIP-BPE.txt)
is the one OpenAI CLIP and Stable Diffusion use; from it we derive the ``vocab.json`` /
``merges.txt`` pair that ``transformers.CLIPTokenizer`` reads, so token ids match real SD
checkpoints (49,408 tokens, 49406 = start, 49407 = end/pad).
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 merges follow the header line


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE uses for raw bytes, in CLIP's vocabulary order:
    the bytes that are printable as themselves first, then the rest mapped to chr(256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(rest))]


def write_clip_tokenizer_files(out_dir: str | os.PathLike) -> Path:
    """Write vocab.json and merges.txt for the CLIP BPE into ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = resources.files("spm_rt") / "assets" / "clip_bpe_simple_vocab_16e6.txt.gz"
    with src.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> Path:
    cache = Path(os.environ.get("SPM_RT_CACHE", Path(tempfile.gettempdir()) / "spm_rt_cache")) / "clip_tokenizer"
    if not (cache / "vocab.json").exists() or not (cache / "merges.txt").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None))
        write_clip_tokenizer_files(tmp)
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(cache)
        except OSError:  # another process won the race; its files are identical
            pass
    return cache


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built offline.

    Example::

        >>> tok = clip_tokenizer()
        >>> tok("a red circle").input_ids
        [49406, 320, 736, 7117, 49407]
    """
    from transformers import CLIPTokenizer

    d = _tokenizer_dir()
    return CLIPTokenizer(
        vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"),
        model_max_length=model_max_length, pad_token=pad_token,
    )
