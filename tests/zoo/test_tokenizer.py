from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

from diffkiln.zoo.shapes.vocab import prompt_words
from diffkiln.zoo.tokenizer import BOS_TOKEN, EOS_TOKEN, build_clip_tokenizer, build_t5_tokenizer


def test_clip_tokenizer_round_trips_and_makes_whole_word_tokens(tmp_path: Path) -> None:
    build_clip_tokenizer(prompt_words(), tmp_path, 16)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for w in prompt_words():
        ids = tok(w).input_ids
        assert len(ids) == 3, (w, tok.convert_ids_to_tokens(ids))  # BOS, word, EOS
    ids = tok("a red circle left of a blue square", padding="max_length", max_length=16).input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == BOS_TOKEN and toks[9] == EOS_TOKEN and len(ids) == 16
    # Text outside the vocabulary still tokenizes into byte-level symbols, as with real CLIP.
    ids = tok("zebra crossing").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).strip() == "zebra crossing"


def test_t5_tokenizer_has_whole_word_pieces(tmp_path: Path) -> None:
    tok = build_t5_tokenizer(prompt_words(), tmp_path, 32)
    ids = tok("a yellow triangle at the bottom").input_ids
    assert len(ids) == 7 and ids[-1] == tok.eos_token_id
