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


def test_a_tokenizer_loaded_again_reads_the_byte_table_and_index_of_the_first_and_is_not_kept_alive(tiny_model_dir):
    """serve loads a tokenizer per adapter, and again when an adapter is reloaded: the tables of one vocabulary are
    built once, and no cache entry holds a tokenizer object."""
    import gc
    import weakref

    from tuneforge.constrain import _index, json_index
    from tuneforge.generate import vocabulary_bytes
    from tuneforge.models import load_tokenizer

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = load_tokenizer(str(tiny_model_dir))
    table, index = vocabulary_bytes(first), json_index(first, schema)
    tables, indexes = len(vocabulary_bytes.entries), len(_index.entries)
    again = load_tokenizer(str(tiny_model_dir))
    assert vocabulary_bytes(again) is table and json_index(again, schema) is index
    assert (len(vocabulary_bytes.entries), len(_index.entries)) == (tables, indexes)
    dropped = weakref.ref(again)
    del again
    gc.collect()
    assert dropped() is None
