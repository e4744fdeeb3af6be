"""Tool calling without a model: what a chat template is given (natively, or the generic way) and how replies are read
back as OpenAI's tool_calls (lib/serving/tools.py). The HTTP round trips with real clients are in test_clients.py."""

import json
from types import SimpleNamespace

import pytest

from lib.chat import encode_chat
from lib.data.tokenizer import load_tokenizer
from lib.serving.tools import ToolError, ToolPlan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "what_time", "parameters": {"type": "object", "properties": {}}}}

# A Hermes-style template written for this test (the shape Qwen's and SmolLM3's take): the tools in a system turn,
# calls inside <tool_call> tags, results in a user turn.
HERMES = """{%- if tools %}<|im_start|>system
You may call these functions:
{%- for t in tools %}
{{ t.function | tojson }}
{%- endfor %}
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

ASKED = [{"role": "user", "content": "Weather in Paris?"}]
CALLED = [*ASKED, {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"}]


@pytest.fixture(scope="module")
def tokenizers(tiny_chat_model):
    plain = load_tokenizer(tiny_chat_model)
    native = load_tokenizer(tiny_chat_model)
    native.chat_template = HERMES
    return plain, native


def test_a_template_without_tools_gets_them_in_a_system_turn_and_a_json_reply(tokenizers):
    plain, _ = tokenizers
    plan = ToolPlan.make([WEATHER, CLOCK], "auto", plain)
    assert not plan.native and plan.grammar  # auto: a call or {"response": ...}, nothing else
    messages, tools = plan.conversation([{"role": "system", "content": "Be brief."}, *CALLED])
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "get_weather" in messages[0]["content"] and messages[0]["content"].endswith("Be brief.")
    assert json.loads(messages[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert messages[3]["content"] == "Result of get_weather: 22 C, sunny"
    text = plain.decode(encode_chat(plain, messages))
    assert "22 C, sunny" in text and "what_time" in text

    reply = '{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}}'
    content, calls = plan.parse(reply)
    assert content is None and len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "c"}
    assert plan.parse('{"response": "It is \\"sunny\\"."}') == ('It is "sunny".', [])
    assert plan.parse('{"response": "Cut off here \\u00') == ("Cut off here ", [])  # ran out of tokens


def test_a_template_with_tools_renders_them_and_its_markup_is_parsed(tokenizers):
    _, native = tokenizers
    plan = ToolPlan.make([WEATHER], "auto", native)
    assert plan.native and plan.grammar is None  # auto: the model writes freely in its own markup
    messages, tools = plan.conversation(CALLED)
    text = native.decode(encode_chat(native, messages, tools=tools))
    assert '"name": "get_weather"' in text and "<tool_response>22 C, sunny</tool_response>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text  # an object

    content, calls = plan.parse('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
                                '\n</tool_call>\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    assert content == "Let me look." and [json.loads(c["function"]["arguments"])["city"] for c in calls] == [
        "Rome", "Oslo"]  # parallel calls; the last one lost its closing tag to max_tokens
    assert plan.parse('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Nice"}}]')[1]  # Mistral
    assert plan.parse('{"name": "get_weather", "parameters": {"city": "Bern"}}')[1]  # Llama 3.1
    assert plan.parse('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>')[1] == []  # not a tool it has
    assert plan.parse("Sunny, 22 C.") == ("Sunny, 22 C.", [])

    forced = ToolPlan.make([WEATHER, CLOCK], {"type": "function", "function": {"name": "what_time"}}, native)
    assert forced.grammar and "what_time" in forced.grammar and "get_weather" not in forced.grammar


def test_none_means_plain_chat_and_bad_tools_are_named():
    tok = SimpleNamespace(chat_template=None)
    assert ToolPlan.make([WEATHER], "none", tok) is None and ToolPlan.make(None, None, tok) is None
    cases = [([WEATHER], {"type": "function", "function": {"name": "fly"}}, "tool_choice", "'fly'"),
             ([WEATHER, WEATHER], "auto", "tools[1].function.name", "twice"),
             ([{"type": "retrieval"}], "auto", "tools[0]", "function"),
             ([{"type": "function", "function": {"name": "a b"}}], "auto", "tools[0].function.name", "letters"),
             ([{"type": "function", "function": {"name": "f", "parameters": {
                 "type": "object", "properties": {"x": {"type": "number", "multipleOf": 2}}}}}], "auto",
              "tools[0].function.parameters", "properties.x.multipleOf"),
             (None, "required", "tool_choice", "needs tools"),
             ([WEATHER], "sometimes", "tool_choice", "expected")]
    for tools, choice, param, words in cases:
        with pytest.raises(ToolError) as e:
            ToolPlan.make(tools, choice, tok)
        assert e.value.param == param and words in str(e.value), (tools, choice, str(e.value))
