"""Structured output: decoding constrained to JSON, a schema's or any object's, with outlines-core.

    index = json_index(tokenizer, schema)          # None: any JSON object; raises ConstraintError
    Sampling(..., constraint=index)                 # generate.Row walks its own Guide over it

outlines-core compiles a JSON schema to a regular expression and that, over the model's vocabulary
(each token's bytes), to an index: the tokens allowed after each token, the end token once the text
is a whole match. Before each token is picked, a row's disallowed logits go to -inf (`allowed`), so
greedy decoding and sampling both pick among the allowed ones. Building an index takes from
milliseconds (a flat schema) to seconds (SmolLM2's any-object: about 2 s), so indexes are kept per
(tokenizer, regex) in a small LRU, as the vocabularies are per tokenizer.
"""

from __future__ import annotations

import json

import torch

from .errors import TuneforgeError
from .generate import decoder_kinds, per_tokenizer, vocabulary_bytes

# What `{"type": "json_object"}` allows: an object whose values are strings, numbers, booleans, null, or
# arrays and objects of those. A regular expression nests only as deep as it is written, and outlines-core's
# own any-object (three levels) takes about 30 s to index over SmolLM2's vocabulary; two levels take 2 s.
_SCALAR = {"type": ["string", "number", "boolean", "null"]}
ANY_OBJECT = {
    "type": "object",
    "additionalProperties": {
        "anyOf": [
            _SCALAR,
            {"type": "array", "items": _SCALAR},
            {"type": "object", "additionalProperties": _SCALAR},
        ]
    },
}


# JSON Schema's keywords whose values are schemas a reply's part matches: one, a list of them, or a mapping of names
# to them. `not` and `if` are not among them: a `required` under `not` forbids its keys, one under `if` tests for them.
_SUBSCHEMA = frozenset(
    {"items", "additionalItems", "additionalProperties", "contains", "propertyNames", "then", "else"}
    | {"unevaluatedItems", "unevaluatedProperties"}
)
_SUBSCHEMAS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems", "items"})
_NAMED_SUBSCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


class ConstraintError(TuneforgeError):
    """A schema outlines-core cannot compile, or a tokenizer it cannot read; the message says which and why."""


def json_index(tokenizer, schema: dict | None):
    """The outlines-core `Index` that keeps a reply to `schema` (None: `ANY_OBJECT`) in `tokenizer`'s tokens."""
    outlines_core = _outlines_core()
    for at, part in _subschemas(schema) if schema is not None else ():
        _check_part(".".join(at), part)
    try:
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(ANY_OBJECT if schema is None else schema))
    except (ValueError, TypeError) as err:
        raise ConstraintError(f"the schema cannot be compiled to a JSON grammar: {err}", code="invalid_schema") from err
    return _index(tokenizer, regex)


def _subschemas(schema, path: tuple[str, ...] = ()):
    """(path, schema) for `schema` and each schema within it that a reply's part matches (`items.properties.a`)."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key, value in schema.items():
        if key in _SUBSCHEMA and isinstance(value, dict):
            yield from _subschemas(value, (*path, key))
        elif key in _SUBSCHEMAS and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _subschemas(item, (*path, key, str(i)))
        elif key in _NAMED_SUBSCHEMAS and isinstance(value, dict):
            for name, item in value.items():
                yield from _subschemas(item, (*path, key, str(name)))


def _check_part(at: str, part: dict) -> None:
    """Refuses what outlines-core would compile to a grammar other than the schema's: an empty list of choices (to
    the empty text, so the reply could be "" or hold `{"a":}`) and a `required` name `properties` does not list
    (passed over, so the reply could lack the key)."""
    where = f"{at}." if at else ""
    for key in ("enum", "anyOf", "oneOf", "allOf", "type"):
        if part.get(key) == []:
            raise ConstraintError(
                f"{where}{key} is an empty list, which no JSON value matches: give it at least one entry",
                code="invalid_schema",
            )
    required, listed = part.get("required"), part.get("properties")
    for name in required if isinstance(required, list) else ():
        if not (isinstance(listed, dict) and isinstance(name, str) and name in listed):
            raise ConstraintError(
                f"{where}required names {json.dumps(name)}, which properties does not list: structured output "
                f"requires only the keys properties lists, so the reply could lack {json.dumps(name)}; list it "
                "under properties with its schema, or leave it out of required",
                code="invalid_schema",
            )


def allowed(guide, width: int, device) -> torch.Tensor:
    """A [width] bool mask of the tokens `guide` allows next (ids past its vocabulary are not)."""
    bits = torch.zeros((width + 31) // 32, dtype=torch.int32)
    guide.write_mask_into(bits.data_ptr(), bits.numel(), bits.element_size())
    unpacked = (bits[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return unpacked.flatten()[:width].bool().to(device)


def end_id(tokenizer) -> int:
    """The token a constrained reply ends with once its JSON is whole: the end of an assistant turn."""
    from .generate import reply_end_ids

    return reply_end_ids(None, tokenizer)[0]


@per_tokenizer(maxsize=32)
def _index(tokenizer, regex: str):
    outlines_core = _outlines_core()
    try:
        index = outlines_core.Index(regex, _vocabulary(tokenizer))
    except ValueError as err:
        # outlines-core's words ("Failed to build DFA error building NFA") name no part of the schema.
        raise ConstraintError(
            f"the schema's grammar cannot be built ({err}): look for a `pattern` that is no regular expression "
            "outlines-core reads (a syntax error, lookaround such as (?=...), a backreference) and for minItems over "
            "maxItems",
            code="invalid_schema",
        ) from err
    if not index.get_allowed_tokens(index.get_initial_state()):
        raise ConstraintError(
            "no text in this model's vocabulary can start a reply that matches the schema", code="invalid_schema"
        )
    return index


@per_tokenizer(maxsize=8)
def _vocabulary(tokenizer):
    """outlines-core's `Vocabulary` of a Hugging Face fast tokenizer: `tokens_by_bytes`, and `end_id` as its end."""
    return _outlines_core().Vocabulary(end_id(tokenizer), tokens_by_bytes(tokenizer))


def tokens_by_bytes(tokenizer) -> dict[bytes, list[int]]:
    """The ids of every token of `tokenizer` that is not special nor `end_id`, by the bytes it decodes to
    (`vocabulary_bytes`: byte-level BPE and SentencePiece with byte fallback, the two token processors of
    outlines-core's own `Vocabulary.from_pretrained`, which reads the Hub only)."""
    by_id = vocabulary_bytes(tokenizer)
    if by_id is None:
        kinds = sorted(kind for kind in decoder_kinds(tokenizer) if kind)
        raise ConstraintError(
            f"this model's tokenizer ({type(tokenizer).__name__}, decoder {kinds or 'none'}) is neither "
            "byte-level BPE nor SentencePiece with byte fallback, the kinds structured output reads"
        )
    end, special = end_id(tokenizer), set(tokenizer.all_special_ids)
    added = tokenizer.added_tokens_decoder
    tokens: dict[bytes, list[int]] = {}
    for token_id, text in by_id.items():
        if token_id == end or token_id in special or (token_id in added and added[token_id].special):
            continue
        tokens.setdefault(text, []).append(token_id)
    return tokens


def _outlines_core():
    try:
        import outlines_core
    except ImportError as err:
        raise ConstraintError(
            "structured output needs outlines-core, part of the serve extra: pip install 'tuneforge[serve]'"
        ) from err
    return outlines_core
