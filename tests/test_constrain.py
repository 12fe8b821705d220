"""Structured output's vocabularies: each family's tokens read as the bytes they decode to."""

import pytest
from families import FAMILIES, family_tokenizer

from tuneforge.constrain import end_id, tokens_by_bytes

TEXT = '{"city": "Zürich", "n": 42}\n  ok 日本 '


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen3", "mistral", "gemma3", "phi3"])
def test_a_texts_tokens_read_as_bytes_join_to_the_text_and_the_turns_end_is_left_to_the_guide(family, tmp_path):
    tokenizer = family_tokenizer(FAMILIES[family], tmp_path)
    by_id = {token_id: text for text, ids in tokens_by_bytes(tokenizer).items() for token_id in ids}
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    joined = b"".join(by_id[token_id] for token_id in ids)
    # SentencePiece's normalizer may put a space before the text (Mistral's, Phi-3's): the model writes it too.
    assert joined in (TEXT.encode(), b" " + TEXT.encode())
    # Special tokens (a turn's start) are never in the reply; the turn's end is the guide's own end token.
    assert not set(tokenizer.all_special_ids) & set(by_id)
    assert end_id(tokenizer) == tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
