"""Build tokenizers from a word list, offline: CLIP's byte-level BPE, T5's unigram, and a
word-level stand-in for the decoder language models' (Gemma, Llama, GLM, Qwen).

Real CLIP vocabularies cannot be downloaded here, so the built-in models use our own: the 512
byte-level base symbols of CLIP's BPE (every byte, bare and word-final), merges that assemble
each word of the given vocabulary, and CLIP's two special tokens. Any text still tokenizes
(unknown words fall back to byte symbols), exactly as with the real CLIP tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5Tokenizer

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "build_clip_tokenizer", "build_t5_tokenizer", "build_word_tokenizer"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol.

    Real BPE training (most frequent pair first) rather than one merge chain per word: applying
    the merges in rank order then reproduces whole-word tokens, which ad-hoc chains do not when
    words share pairs.
    """
    b2u = _bytes_to_unicode()
    segs = []
    for word in words:
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        segs.append(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in pairwise(seg):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for i, seg in enumerate(segs):
            out, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    out.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    out.append(seg[j])
                    j += 1
            segs[i] = out


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path, max_length: int) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config to ``out_dir`` and load it back.

    Args:
        words: lower-case words that should become single tokens where merges allow.
        out_dir: folder to write (created if missing).
        max_length: ``model_max_length``; prompts are padded/truncated to it, BOS and EOS included.
    """
    if max_length < 3:
        raise ValueError(f"max_length must leave room for BOS, a word and EOS (>= 3), got {max_length}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base]
    merges = _learn_merges(sorted(set(words)))
    vocab_list += [a + b for a, b in merges]
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    tok = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab_list)},
        # The tokenizers backend takes (left, right) pairs; transformers' annotation says str.
        merges=list(merges),  # type: ignore[arg-type]
        model_max_length=max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tok.save_pretrained(out)
    return tok


def build_t5_tokenizer(words: Iterable[str], out_dir: str | Path, max_length: int) -> T5Tokenizer:
    """Write and load a T5 (unigram) tokenizer whose pieces are the given words plus single letters.

    Args:
        words: lower-case words, each one piece; other text falls back to letters, then ``<unk>``.
        out_dir: folder to write (created if missing).
        max_length: ``model_max_length``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in sorted(set(words))]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(out)
    return tok


def build_word_tokenizer(words: Iterable[str], max_length: int) -> PreTrainedTokenizerFast:
    """A fast word-level tokenizer that stands in for a decoder language model's (Gemma, Llama,
    GLM, Qwen): ``<pad>`` is id 0, every text starts with ``<bos>`` (as theirs do, so an empty
    negative prompt is one token, never none), each word is one token, other text splits into
    single characters or ``<unk>``. Saved with ``save_pretrained`` as ``tokenizer.json``.

    Args:
        words: lower-case words, each one token.
        max_length: ``model_max_length``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"()-_<>|/")
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *sorted(set(words)), *chars]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)  # fmt: skip
