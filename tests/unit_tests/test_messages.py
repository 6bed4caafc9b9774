"""The pure converters of ``messages.py``: content as text, every role both ways, tool-call text, tool_choice.

No model is loaded: these run in milliseconds.
"""

from __future__ import annotations

import json

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.utils.function_calling import convert_to_openai_tool

from langchain_metaclaw.messages import (
    TOOLS_SYSTEM_TEMPLATE,
    content_text,
    convert_dict_to_message,
    convert_message_to_dict,
    convert_messages,
    create_usage_metadata,
    forced_tool_schema,
    normalize_tool_choice,
    parse_tool_call_json,
    parse_tool_calls,
    render_tool_call,
)


def get_weather(city: str, unit: str = "C") -> str:
    """Weather in a city."""
    return f"sunny in {city}"


def no_args() -> str:
    """A tool without arguments."""
    return "ok"


TOOLS = [convert_to_openai_tool(get_weather), convert_to_openai_tool(no_args)]
NAMES = {"get_weather", "no_args"}


def _without_ids(message: BaseMessage) -> dict:
    """A message's fields with the generated tool-call ids blanked (the chat template does not carry ids)."""
    data = message.model_dump()
    for key in ("tool_calls", "invalid_tool_calls"):
        for call in data.get(key) or []:
            call["id"] = None
    return data


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (SystemMessage("Be brief."), {"role": "system", "content": "Be brief."}),
        (HumanMessage("Hi there"), {"role": "user", "content": "Hi there"}),
        (AIMessage("Hello!"), {"role": "assistant", "content": "Hello!"}),
        (
            ToolMessage("sunny", tool_call_id="call_1"),
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ),
        (ChatMessage(role="developer", content="Use tools."), {"role": "developer", "content": "Use tools."}),
    ],
    ids=["system", "user", "assistant", "tool", "custom-role"],
)
def test_each_role_round_trips(message: BaseMessage, expected: dict) -> None:
    assert convert_message_to_dict(message) == expected
    back = convert_dict_to_message(expected)
    assert type(back) is type(message)
    assert back == message
    assert convert_message_to_dict(back) == expected


def test_assistant_tool_calls_round_trip_as_text() -> None:
    message = AIMessage(
        "Let me check.",
        tool_calls=[
            {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_a", "type": "tool_call"},
            {"name": "no_args", "args": {}, "id": "call_b", "type": "tool_call"},
        ],
    )
    as_dict = convert_message_to_dict(message)
    assert as_dict == {
        "role": "assistant",
        "content": 'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "no_args", "arguments": {}}</tool_call>',
    }
    back = convert_dict_to_message(as_dict, NAMES)
    assert isinstance(back, AIMessage)
    assert _without_ids(back) == _without_ids(message)
    assert all(call["id"].startswith("call_") for call in back.tool_calls)  # fresh ids, one per call
    assert convert_message_to_dict(back) == as_dict


def test_assistant_with_only_a_tool_call_has_no_leading_newline() -> None:
    message = AIMessage("", tool_calls=[{"name": "no_args", "args": {}, "id": "c", "type": "tool_call"}])
    assert convert_message_to_dict(message)["content"] == render_tool_call(message.tool_calls[0])


def test_content_blocks_become_text() -> None:
    message = HumanMessage(content=[{"type": "text", "text": "Hello "}, "world", {"type": "image_url", "image_url": {}}])
    assert convert_message_to_dict(message) == {"role": "user", "content": "Hello world"}


def test_unknown_message_type_and_missing_role_are_errors() -> None:
    class Odd(BaseMessage):
        type: str = "odd"

    with pytest.raises(TypeError, match="Unsupported message type Odd"):
        convert_message_to_dict(Odd(content="x"))
    with pytest.raises(ValueError, match="no role"):
        convert_dict_to_message({"content": "x"})


def test_tools_go_into_the_system_prompt() -> None:
    plain = convert_messages([HumanMessage("hi")], TOOLS)
    assert plain[0]["role"] == "system" and plain[0]["content"].startswith("You can call these tools")
    assert json.dumps(TOOLS[0]["function"]) in plain[0]["content"]
    merged = convert_messages([SystemMessage("Be brief."), HumanMessage("hi")], TOOLS)
    assert len(merged) == 2
    assert merged[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert convert_messages([HumanMessage("hi")]) == [{"role": "user", "content": "hi"}]
    assert "{tools}" in TOOLS_SYSTEM_TEMPLATE


# ---------------------------------------------------------------------------------------------- malformed calls


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par</tool_call>', "invalid JSON"),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}', "invalid JSON"),  # cut off
        ('<tool_call>{"arguments": {"city": "Paris"}}</tool_call>', "needs a string 'name'"),
        ('<tool_call>["get_weather"]</tool_call>', "needs a string 'name'"),
        ('<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>', "'arguments' must be an object"),
        ('<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>', "unknown tool 'launch_rockets'"),
    ],
    ids=["bad-json", "truncated", "no-name", "not-an-object", "args-not-object", "unknown-tool"],
)
def test_malformed_tool_calls_become_invalid_tool_calls(text: str, error: str) -> None:
    content, calls, invalid = parse_tool_calls(f"Sure. {text}", NAMES)
    assert calls == []
    assert len(invalid) == 1
    assert invalid[0]["type"] == "invalid_tool_call"
    assert error in invalid[0]["error"]
    assert invalid[0]["id"].startswith("call_")
    assert content == "Sure."
    # and through the message converter: never an exception
    message = convert_dict_to_message({"role": "assistant", "content": f"Sure. {text}"}, NAMES)
    assert isinstance(message, AIMessage) and message.tool_calls == [] and len(message.invalid_tool_calls) == 1


def test_valid_and_invalid_calls_in_one_answer() -> None:
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": </tool_call>'
    )
    content, calls, invalid = parse_tool_calls(text, NAMES)
    assert content == ""
    assert [(c["name"], c["args"]) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert len(invalid) == 1 and invalid[0]["args"] == '{"name": "get_weather", "arguments":'


def test_arguments_given_as_a_json_string_or_as_parameters_are_accepted() -> None:
    as_string = parse_tool_call_json('{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')
    assert as_string["type"] == "tool_call" and as_string["args"] == {"city": "Rome"}
    as_parameters = parse_tool_call_json('{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert as_parameters["type"] == "tool_call" and as_parameters["args"] == {"city": "Rome"}
    missing = parse_tool_call_json('{"name": "no_args"}')
    assert missing["type"] == "tool_call" and missing["args"] == {}


def test_bare_json_call_to_a_bound_tool_is_a_call_and_anything_else_is_text() -> None:
    content, calls, invalid = parse_tool_calls('{"name": "get_weather", "arguments": {"city": "Lima"}}', NAMES)
    assert content == "" and invalid == [] and calls[0]["args"] == {"city": "Lima"}
    # an unknown name, or no tools bound: plain JSON text, not a call
    text = '{"name": "other", "arguments": {}}'
    assert parse_tool_calls(text, NAMES) == (text, [], [])
    assert parse_tool_calls(text, None) == (text, [], [])
    assert parse_tool_calls("Paris is the capital.", NAMES) == ("Paris is the capital.", [], [])


# ---------------------------------------------------------------------------------------------- forced calls


def test_forced_schema_for_one_tool_and_for_any() -> None:
    one = forced_tool_schema(TOOLS, "get_weather")
    assert list(one["properties"]) == ["name", "arguments"]  # order matters: the grammar follows it
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["required"] == ["name", "arguments"] and one["additionalProperties"] is False
    assert one["properties"]["arguments"]["additionalProperties"] is False
    assert one["properties"]["arguments"]["required"] == ["city"]
    anything = forced_tool_schema(TOOLS, "any")
    assert [o["properties"]["name"]["const"] for o in anything["anyOf"]] == ["get_weather", "no_args"]
    assert forced_tool_schema(TOOLS, "required") == anything
    no_args_schema = forced_tool_schema(TOOLS, "no_args")["properties"]["arguments"]
    assert no_args_schema["properties"] == {} and no_args_schema["additionalProperties"] is False


def test_forced_schema_keeps_an_explicit_additional_properties() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {}, "additionalProperties": True}}}
    assert forced_tool_schema([tool], "f")["properties"]["arguments"]["additionalProperties"] is True
    untyped = {"type": "function", "function": {"name": "g", "parameters": {"anyOf": [{"type": "object"}]}}}
    assert "additionalProperties" not in forced_tool_schema([untyped], "g")["properties"]["arguments"]


def test_forced_schema_names_an_unbound_tool() -> None:
    with pytest.raises(ValueError, match=r"tool_choice 'nope' names no bound tool \(bound: \['get_weather', 'no_args'\]\)"):
        forced_tool_schema(TOOLS, "nope")


def test_usage_metadata_holds_only_the_three_counts() -> None:
    assert create_usage_metadata(12, 5) == {"input_tokens": 12, "output_tokens": 5, "total_tokens": 17}


def test_server_parsed_malformed_tool_calls_become_invalid_tool_calls():
    from langchain_core.messages.tool import invalid_tool_call, tool_call

    from langchain_metaclaw.chat_model.backends.base import Completion, CompletionRequest
    from langchain_metaclaw.chat_model.base import MetaClawChatModel

    good = tool_call(name="get_weather", args={"city": "Paris"}, id="c1")
    bad = invalid_tool_call(name="get_weather", args='{"city": Par', id="c2", error="invalid JSON")
    completion = Completion(text="", finish_reason="tool_calls", prompt_token_ids=None, completion_token_ids=None,
                            logprobs=None, adapter_version=None, model_name="m", tool_calls=[good, bad])
    request = CompletionRequest(messages=[], tools=[{"type": "function", "function": {"name": "get_weather"}}])
    message = MetaClawChatModel(backend="openai", base_url="http://127.0.0.1:1/v1")._message(completion, request)
    assert message.tool_calls == [good]
    assert [c["args"] for c in message.invalid_tool_calls] == ['{"city": Par']
    assert message.response_metadata["metaclaw"]["tokens_source"] == "retokenized"


# ------------------------------------------------------------------------------------------ content_text

IMAGE = {"type": "image_url", "image_url": {"url": "x"}}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ""),
        ("plain", "plain"),
        ([], ""),
        (["a", "b"], "ab"),
        ([{"type": "text", "text": "Hello "}, "world"], "Hello world"),
        ([{"text": "untyped"}], "untyped"),
        ([{"type": "text", "text": "see "}, IMAGE, {"type": "tool_use", "id": "t"}], "see "),
        (42, "42"),
    ],
)
def test_content_text_keeps_text_and_skips_other_blocks(content: object, expected: str) -> None:
    assert content_text(content) == expected


def test_content_text_agrees_with_langchain_message_text() -> None:
    blocks = [{"type": "text", "text": "one "}, "two", IMAGE, {"type": "text", "text": " three"}]
    assert content_text(blocks) == AIMessage(content=blocks).text


def test_content_text_marks_non_text_blocks_for_a_reader() -> None:
    assert content_text(["look:", IMAGE, {"type": "reasoning"}], non_text="mark") == "look:[image_url][reasoning]"
    assert content_text([3], non_text="mark") == "[int]"


def test_content_text_raise_names_the_block_type() -> None:
    assert content_text([{"type": "text", "text": "ok"}], non_text="raise") == "ok"
    with pytest.raises(ValueError, match="'image_url' is not supported"):
        content_text(["a", IMAGE], non_text="raise")
    with pytest.raises(ValueError, match="string or a list"):
        content_text({"type": "text", "text": "not in a list"}, non_text="raise")


# ------------------------------------------------------------------------------------------ tool_choice


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", None),
        ("none", "none"),
        (False, "none"),
        ("required", "required"),
        ("any", "required"),
        (True, "required"),
        ("get_weather", "get_weather"),
        ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
        ({"name": "no_args"}, "no_args"),
    ],
)
def test_normalize_tool_choice_spellings(choice: object, expected: str | None) -> None:
    assert normalize_tool_choice(choice, TOOLS) == expected


def test_normalize_tool_choice_without_forcing_needs_no_tools() -> None:
    assert normalize_tool_choice("auto", None) is None
    assert normalize_tool_choice("none", []) == "none"


@pytest.mark.parametrize(
    ("choice", "tools", "error"),
    [
        ({"type": "function", "function": {}}, "TOOLS", "must name a function"),
        (3, "TOOLS", "Invalid tool_choice 3"),
        ("required", None, "`tools` must be set"),
        ("get_weather", [], "`tools` must be set"),
        ("nope", "TOOLS", "names no bound tool"),
    ],
)
def test_normalize_tool_choice_errors(choice: object, tools: object, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        normalize_tool_choice(choice, TOOLS if tools == "TOOLS" else tools)
