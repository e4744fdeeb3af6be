"""Constrained output: what `response_format` (OpenAI), `format` (Ollama) and a forced tool call ask for, as one
GBNF grammar that every engine's sampler follows token by token, so a reply is valid JSON (json_object) or valid
against a JSON schema (json_schema) whatever the model would have written.

    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})
    mask = GrammarMask(grammar, tokenizer, vocab_size, end_ids)     # the torch engines (llama.cpp has its own)
    logits = mask.apply(logits); token = sample(logits); mask.accept(token)

The schema goes through llama.cpp's own converter (llama-cpp-python's json_schema_to_gbnf, as llama-server does).
A keyword it cannot express is refused by name (a ValueError the APIs answer with a 400), never silently dropped.
The llama.cpp engine hands the grammar to llama.cpp's grammar sampler (lib.serving.llamacpp); the torch and
transformers engines follow the same schema through llguidance (its JSON compiler, a token mask per step), or a
grammar that came without a schema through its GBNF reader.
Not here: sampling itself (lib.model.generate, lib.serving.llamacpp).
"""

from __future__ import annotations

import json
import weakref

import numpy as np

# JSON Schema keywords llama.cpp's converter does not turn into grammar rules (it would ignore them)
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "patternProperties",
                        "propertyNames", "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "multipleOf",
                        "contains", "minContains", "maxContains", "minimum", "maximum", "exclusiveMinimum",
                        "exclusiveMaximum")


def unsupported_keyword(schema, path: str = "schema", names: bool = False) -> str | None:
    """The first keyword of `schema` the grammar cannot express, as a path; None when there is none. names: the
    keys of this dict are property or definition names, not keywords."""
    if isinstance(schema, list):
        return next((w for i, v in enumerate(schema) if (w := unsupported_keyword(v, f"{path}[{i}]"))), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if not names and key in UNSUPPORTED_KEYWORDS:
            return f"{path}.{key}"
        if not names and key in ("enum", "const", "default", "examples", "description", "title"):
            continue  # values, not schemas
        where = unsupported_keyword(value, f"{path}.{key}", names=not names and key in ("properties", "$defs",
                                                                                       "definitions"))
        if where:
            return where
    return None


class Grammar(str):
    """A GBNF grammar (the string itself, what llama.cpp's sampler takes) that keeps the JSON schema it was made
    from: the torch engines compile the schema with llguidance's own JSON compiler, which takes long strings in
    stride where the GBNF's nested optionals (maxLength: 40 is 40 levels deep) are beyond its Lark reader."""

    schema: dict

    def __new__(cls, gbnf: str, schema: dict):
        self = super().__new__(cls, gbnf)
        self.schema = schema
        return self


def schema_grammar(schema) -> Grammar:
    """The GBNF of JSON documents valid against `schema` (a dict); ValueError naming what cannot be expressed."""
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    where = unsupported_keyword(schema)
    if where:
        raise ValueError(f"{where}: this keyword cannot be enforced by constrained decoding (llama.cpp's JSON "
                         "schema grammar); leave it out or check it after the reply")
    try:
        from llama_cpp.llama_grammar import json_schema_to_gbnf
    except ImportError:
        raise ValueError("a JSON schema is turned into a grammar by llama-cpp-python's converter, which this "
                         "environment lacks (./install.sh builds it)") from None

    try:
        return Grammar(json_schema_to_gbnf(json.dumps(schema)), schema)
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ValueError(f"the schema cannot be turned into a grammar: {e}") from None


def json_grammar() -> Grammar:
    """The GBNF of any JSON object (OpenAI's json_object: an object at the top)."""
    return schema_grammar({"type": "object"})


def grammar_for(response_format: dict | None) -> str | None:
    """The grammar OpenAI's `response_format` asks for; None for text (or none); ValueError when malformed."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_grammar()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ValueError('json_schema: expected {"name": ..., "schema": {...}}')
        return schema_grammar(spec["schema"])
    raise ValueError(f"type {kind!r}: expected text, json_object or json_schema")


def ollama_grammar(fmt) -> str | None:
    """The grammar Ollama's `format` asks for: "json", or a JSON schema object."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return json_grammar()
    if isinstance(fmt, dict):
        return schema_grammar(fmt)
    raise ValueError(f"{fmt!r}: expected \"json\" or a JSON schema object")


# ---------------------------------------------------------------------------------------------------------
# The torch engines: llguidance computes which tokens the grammar allows next.

# JSON as llama.cpp's grammar writes it: ", " and ": " between items, no other whitespace (which a model could
# otherwise pad a reply with until it runs out of tokens); keywords are checked by unsupported_keyword, not here
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
_ll_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(vocab, ends): LLTokenizer}


def _ll_tokenizer(tokenizer, vocab_size: int, end_ids: tuple[int, ...]):
    """llguidance's view of a transformers fast tokenizer (about a second to build, so kept per tokenizer)."""
    from llguidance.hf import from_tokenizer

    per = _ll_tokenizers.setdefault(tokenizer, {})
    key = (vocab_size, end_ids)
    if key not in per:
        per[key] = from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(end_ids))
    return per[key]


class GrammarMask:
    """The tokens a Grammar allows next, for a sampling loop over torch logits: `apply` sets every other
    token's logit to -inf (None when nothing is allowed: the grammar is finished and no end token fits), `accept`
    moves the grammar past the sampled token. The end-of-turn ids are allowed once the grammar is complete."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int, end_ids):
        from llguidance import LLMatcher, grammar_from

        schema = getattr(grammar, "schema", None)
        try:
            lark = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT) if schema is not None \
                else grammar_from("gbnf", grammar)
        except ValueError as e:
            raise ValueError(f"the grammar cannot be read by llguidance: {e}") from None
        self.matcher = LLMatcher(_ll_tokenizer(tokenizer, vocab_size, tuple(sorted(set(end_ids)))), lark, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {self.matcher.get_error()}")

    def apply(self, logits):
        import torch

        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8),
                             bitorder="little")[:logits.shape[-1]]
        if not bits.any():
            return None
        allowed = torch.from_numpy(bits.astype(bool)).to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar rejected token {token}: {self.matcher.get_error()}")
