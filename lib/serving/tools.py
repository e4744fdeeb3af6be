"""Tool calling on any chat model: OpenAI's `tools` and `tool_choice` in, `tool_calls` out.

    plan = ToolPlan.make(tools, tool_choice, tokenizer)    # None: answer as plain chat (no tools, or "none")
    messages, tools_kw = plan.conversation(messages)        # what the chat template renders
    grammar = plan.grammar                                   # None: the model writes freely
    content, calls = plan.parse(reply_text)                  # calls: OpenAI's tool_calls, [] when it answered

Two ways of putting tools before a model, picked by its chat template:
- native: the template renders `tools` itself (Qwen, Llama 3.1+, Mistral, Hermes, SmolLM3 …). Its replies carry calls
  in the model's own markup, parsed back here: <tool_call>{…}</tool_call> (Hermes, Qwen, SmolLM3),
  [TOOL_CALLS][…] (Mistral), or a bare {"name": …, "arguments" or "parameters": …} (Llama 3.1).
- generic (a template that knows nothing of tools, llama-server's answer to the same problem): a system message
  lists the tools, and the reply is constrained to one JSON object, {"tool_call": {"name", "arguments"}} or, with
  "auto", {"response": "the answer"}.
"required" and a named tool constrain the reply of any model to a call of the allowed tool(s), their parameters
following the tool's JSON schema (lib.serving.constrain), so a call always parses and validates.

Not here: the HTTP shapes (lib.serving.api), the grammar engines (lib.serving.constrain).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from lib.serving.constrain import schema_grammar, unsupported_keyword

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}
GENERIC_PROMPT = ("You can call these tools (JSON Schema of each one's arguments):\n{tools}\n\nTo call a tool, reply "
                  'with only {{"tool_call": {{"name": <tool name>, "arguments": <arguments>}}}}.{answer}')
GENERIC_ANSWER = ' To answer without a tool, reply with only {"response": <your answer>}.'
RESPONSE_START = re.compile(r'^\s*\{\s*"response"\s*:\s*"')


class ToolError(ValueError):
    """A malformed `tools` or `tool_choice`: the message names the place (param) and what was expected."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _functions(tools) -> list[dict]:
    """The tools' function specs {"name", "description", "parameters"}, checked."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools", "expected a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(where, 'expected {"type": "function", "function": {"name": ..., "parameters": {...}}} '
                                   "(only function tools exist here)")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name", "expected 1 to 64 letters, digits, '_' or '-'")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"{name!r} is declared twice")
        seen.add(name)
        params = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise ToolError(f"{where}.function.parameters", "expected a JSON Schema object")
        bad = unsupported_keyword(params, f"{where}.function.parameters")
        if bad:
            raise ToolError(bad.split(".parameters")[0] + ".parameters", f"{bad}: this keyword cannot be enforced by "
                            "constrained decoding; leave it out or check it after the call")
        out.append({"name": name, "description": str(fn.get("description") or ""), "parameters": params})
    return out


def _choice(tool_choice, names: list[str]) -> str | None:
    """"auto", "required", a tool's name, or None for "none"."""
    if tool_choice in (None, "auto"):
        return "auto"
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return "required"
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in names:
            raise ToolError("tool_choice", f"names the tool {name!r}, which is not in tools ({', '.join(names)})")
        return name
    raise ToolError("tool_choice", 'expected "none", "auto", "required" or {"type": "function", "function": '
                                   '{"name": ...}}')


def template_knows_tools(tokenizer) -> bool:
    """Whether the model's chat template renders a `tools` list (it mentions the variable)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def _call_schema(fn: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": fn["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _one_of(schemas: list[dict]) -> dict:
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


@dataclass
class ToolPlan:
    functions: list[dict]
    choice: str  # "auto", "required" or a tool's name
    native: bool  # the chat template renders the tools
    grammar: str | None  # what the reply must follow (None: free text, parsed afterwards)

    @classmethod
    def make(cls, tools, tool_choice, tokenizer) -> ToolPlan | None:
        if tools is None:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("tool_choice", "needs tools")
            return None
        functions = _functions(tools)
        choice = _choice(tool_choice, [f["name"] for f in functions])
        if choice is None:
            return None
        native = template_knows_tools(tokenizer)
        allowed = functions if choice in ("auto", "required") else [f for f in functions if f["name"] == choice]
        calls = _one_of([_call_schema(f) for f in allowed])
        if native:
            schema = None if choice == "auto" else calls
        else:
            wrapped = {"type": "object", "properties": {"tool_call": calls}, "required": ["tool_call"],
                       "additionalProperties": False}
            answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                      "additionalProperties": False}
            schema = {"anyOf": [wrapped, answer]} if choice == "auto" else wrapped
        try:
            grammar = schema_grammar(schema) if schema is not None else None
        except ValueError as e:
            raise ToolError("tools", str(e)) from None
        return cls(functions, choice, native, grammar)

    # -- the prompt ----------------------------------------------------------------------------------------

    def conversation(self, messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
        """The messages and the `tools` argument for the chat template: as they are for a template that renders
        tools (arguments as objects, which templates expect); for any other, the tools described in the system
        message and earlier calls and results written out as text in the generic format."""
        if self.native:
            tools = [{"type": "function", "function": f} for f in self.functions]
            return [_native_message(m) for m in messages], tools
        listing = "\n".join(json.dumps(f, ensure_ascii=False) for f in self.functions)
        prompt = GENERIC_PROMPT.format(tools=listing, answer=GENERIC_ANSWER if self.choice == "auto" else "")
        return as_text_messages([{"role": "system", "content": prompt}, *messages]), None

    # -- the reply -----------------------------------------------------------------------------------------

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a reply; a reply holding no call is all content."""
        found = _calls_in(text)
        names = {f["name"] for f in self.functions}
        calls = [c for c in found if c[0] in names]
        if not self.native and not calls and RESPONSE_START.match(text):
            return _response_text(text), []
        if not calls:
            return text, []
        content = _outside_calls(text) if self.native else None
        return content or None, [tool_call(name, args) for name, args in calls]


def _response_text(text: str) -> str:
    """The answer inside a generic {"response": "..."}, also when the reply ran out of tokens inside the string."""
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("response"), str):
            return obj["response"]
    except ValueError:
        pass
    body = text[RESPONSE_START.match(text).end():]
    for cut in range(len(body), max(len(body) - 6, -1), -1):  # drop a half-written escape (\, \u00) at the end
        try:
            return json.loads('"' + body[:cut] + '"')
        except ValueError:
            continue
    return body


def tool_call(name: str, arguments) -> dict:
    """One entry of OpenAI's `tool_calls` (arguments as a JSON string, as OpenAI sends them)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _arguments_object(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _native_message(m: dict) -> dict:
    if m.get("tool_calls"):
        calls = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
                 for c in m["tool_calls"]]
        return {**m, "content": m.get("content") or "", "tool_calls": calls}
    return m


def as_text_messages(messages: list[dict]) -> list[dict]:
    """A conversation as plain {"role", "content"} turns for a template that knows nothing of tools: earlier calls
    and their results written out in the generic format, and turns of one role in a row merged (many templates
    want user and assistant to alternate). A conversation without any is returned as it is."""
    if not any(m["role"] in ("tool", "system") or m.get("tool_calls") for m in messages[1:]):
        return messages
    names = {c.get("id"): c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}
    out: list[dict] = []
    for m in messages:
        m = _generic_message(m, names)
        if out and out[-1]["role"] == m["role"] and m["role"] != "assistant":
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(m)
    return out


def _generic_message(m: dict, names: dict) -> dict:
    if m["role"] == "tool":  # plain words: small models answer from these, where a JSON result made them call again
        tool = names.get(m.get("tool_call_id"), m.get("tool_call_id"))
        return {"role": "user", "content": f"Result of {tool}: {m.get('content') or ''}"}
    if m.get("tool_calls"):
        said = [m["content"]] if m.get("content") else []
        said += [json.dumps({"tool_call": {"name": c["function"]["name"],
                                           "arguments": _arguments_object(c["function"]["arguments"])}},
                            ensure_ascii=False) for c in m["tool_calls"]]
        return {"role": "assistant", "content": "\n".join(said)}
    return {"role": m["role"], "content": m.get("content") or ""}


# -- finding calls in text ---------------------------------------------------------------------------------

TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
MISTRAL = "[TOOL_CALLS]"


def _as_call(obj) -> tuple[str, object] | None:
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("tool_call"), dict):
        obj = obj["tool_call"]
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(name, str) and isinstance(args, (dict, str)):
        return name, args
    return None


def _json_values(text: str) -> list:
    """The JSON values in `text` one after another (whitespace between), or [] when it is not only that."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text):
        while at < len(text) and text[at] in " \t\r\n;,":
            at += 1
        if at == len(text):
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError:
            return []
        out.append(value)
    return out


def _calls_in(text: str) -> list[tuple[str, object]]:
    calls = []
    tagged = TAGGED.findall(text)
    if tagged:
        for body in tagged:
            calls += [c for v in _json_values(body) if (c := _as_call(v))]
        return calls
    body = text.split(MISTRAL, 1)[1] if MISTRAL in text else text.strip()
    for value in _json_values(body):
        for v in value if isinstance(value, list) else [value]:
            if c := _as_call(v):
                calls.append(c)
    return calls


def _outside_calls(text: str) -> str:
    """What the model said around its calls (a native reply may think aloud before calling)."""
    if TAGGED.search(text):
        return TAGGED.sub("", text).strip()
    if MISTRAL in text:
        return text.split(MISTRAL, 1)[0].strip()
    return ""
