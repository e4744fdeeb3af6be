"""Constrained output: what `response_format` (OpenAI) and `format` (Ollama) ask for, as a GBNF grammar that the
llama.cpp engine's sampler follows token by token, so a reply is valid JSON (json_object) or valid against a JSON
schema (json_schema) whatever the model would have written.

    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}})

The schema goes through llama.cpp's own converter (llama-cpp-python's json_schema_to_gbnf, as llama-server does).
A keyword it cannot express is refused by name (a ValueError the APIs answer with a 400), never silently dropped.
Not here: sampling (lib.serving.llamacpp applies the grammar; the torch engines have no grammar sampler yet).
"""

from __future__ import annotations

import json

# JSON Schema keywords llama.cpp's converter does not turn into grammar rules (it would ignore them)
UNSUPPORTED_KEYWORDS = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "patternProperties",
                        "propertyNames", "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "multipleOf",
                        "contains", "minContains", "maxContains", "exclusiveMinimum", "exclusiveMaximum")


def _unsupported_keyword(schema, path: str = "schema", names: bool = False) -> str | None:
    """The first keyword of `schema` the grammar cannot express, as a path; None when there is none. names: the
    keys of this dict are property or definition names, not keywords."""
    if isinstance(schema, list):
        return next((w for i, v in enumerate(schema) if (w := _unsupported_keyword(v, f"{path}[{i}]"))), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if not names and key in UNSUPPORTED_KEYWORDS:
            return f"{path}.{key}"
        if not names and key in ("enum", "const", "default", "examples", "description", "title"):
            continue  # values, not schemas
        where = _unsupported_keyword(value, f"{path}.{key}", names=not names and key in ("properties", "$defs",
                                                                                       "definitions"))
        if where:
            return where
    return None


def schema_grammar(schema) -> str:
    """The GBNF of JSON documents valid against `schema` (a dict); ValueError naming what cannot be expressed."""
    if not isinstance(schema, dict):
        raise ValueError("the schema must be a JSON object")
    where = _unsupported_keyword(schema)
    if where:
        raise ValueError(f"{where}: this keyword cannot be enforced by constrained decoding (llama.cpp's JSON "
                         "schema grammar); leave it out or check it after the reply")
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ValueError(f"the schema cannot be turned into a grammar: {e}") from None


def json_grammar() -> str:
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
