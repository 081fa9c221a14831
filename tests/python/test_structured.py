"""Structured outputs through the OpenAI SDK on the tiny fixture, whose random weights would
never write JSON by themselves: parsed Pydantic objects, JSON objects, schemas and tool calls,
whole and streamed, with an image in the prompt; and every request field of OpenAI's schema
either served, listed as ignored in docs/api.md, or refused with a 400 naming it."""

import json
import urllib.error
import urllib.request
from typing import Annotated, Literal

import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import BaseModel, ConfigDict, Field

from conftest import API_KEY, ROOT, image_part

MODEL = "tiny-v5"


class Room(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(max_length=8)]
    floor: Annotated[int, Field(ge=0, le=3)]


class Scene(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["cat", "dog", "bird"]
    count: Annotated[int, Field(ge=1, le=12)]
    room: Room
    tags: Annotated[list[Annotated[str, Field(max_length=5)]], Field(max_length=3)]
    indoor: bool


def ask(text="Describe the picture as JSON."):
    return [{"role": "user", "content": [image_part(), {"type": "text", "text": text}]}]


def check_scene(data):
    scene = Scene.model_validate(data)
    assert 1 <= scene.count <= 12 and len(scene.tags) <= 3
    return scene


def test_parse_returns_a_pydantic_object(client):
    parse = client.beta.chat.completions.parse if hasattr(client, "beta") else client.chat.completions.parse
    r = parse(model=MODEL, messages=ask(), response_format=Scene, temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Scene)
    check_scene(json.loads(choice.message.content))
    # Streamed through the SDK's helper, the same parsed object.
    stream_helper = client.beta.chat.completions.stream if hasattr(client, "beta") else client.chat.completions.stream
    with stream_helper(model=MODEL, messages=ask(), response_format=Scene, temperature=0, max_tokens=200) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == choice.message.parsed


def test_json_schema_validates_sampled_with_n_and_seed(client):
    schema = {"name": "scene", "schema": Scene.model_json_schema(), "strict": True}
    kwargs = dict(model=MODEL, messages=ask(), response_format={"type": "json_schema", "json_schema": schema},
                  temperature=1.0, seed=11, n=3, max_tokens=200)
    first = client.chat.completions.create(**kwargs)
    assert [c.finish_reason for c in first.choices] == ["stop"] * 3
    for c in first.choices:
        check_scene(json.loads(c.message.content))
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]


def test_json_object_answers_parse(client):
    # Any object allows strings of any length, and random weights never choose to close one:
    # a bias towards the quote token lets these answers end; the grammar does the rest.
    status, text = post(f"{str(client.base_url).rstrip('/')[:-3]}/tokenize", {"prompt": '"'})
    [quote] = json.loads(text)["tokens"]
    r = client.chat.completions.create(model=MODEL, messages=ask("Answer in JSON."), max_tokens=300, n=3, seed=3,
                                       response_format={"type": "json_object"}, logit_bias={str(quote): 8})
    for c in r.choices:
        assert c.finish_reason == "stop"
        assert isinstance(json.loads(c.message.content), dict)
    # Streamed, the same answers.
    texts = ["", "", ""]
    for chunk in client.chat.completions.create(model=MODEL, messages=ask("Answer in JSON."), max_tokens=300, n=3,
                                                seed=3, response_format={"type": "json_object"},
                                                logit_bias={str(quote): 8}, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in r.choices]


def test_streamed_schema_answer_validates_and_logprobs_come_along(client):
    schema = {"name": "scene", "schema": Scene.model_json_schema()}
    stream = client.chat.completions.create(
        model=MODEL, messages=ask(), response_format={"type": "json_schema", "json_schema": schema},
        temperature=0, max_tokens=200, stream=True, logprobs=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check_scene(json.loads(text))
    assert any(c.choices[0].logprobs for c in chunks if c.choices)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "set_alarm", "parameters": {
    "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hour"], "additionalProperties": False}}}


def check_call(name, arguments):
    args = json.loads(arguments)
    if name == "get_weather":
        assert args["city"] in ("Paris", "Oslo", "Lima") and 1 <= args["days"] <= 7 and len(args) == 2
    else:
        assert name == "set_alarm" and 0 <= args["hour"] <= 23 and len(args) == 1


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_tool_calls_whole_and_streamed(client, choice):
    kwargs = dict(model=MODEL, messages=ask("What is the weather?"), tools=[WEATHER, CLOCK], tool_choice=choice,
                  temperature=0, max_tokens=300, parallel_tool_calls=False)
    r = client.chat.completions.create(**kwargs)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    [call] = c.message.tool_calls
    assert call.type == "function" and call.id
    check_call(call.function.name, call.function.arguments)
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    # Streamed: the first tool-call delta names the function, the rest add argument text.
    deltas = [d for chunk in client.chat.completions.create(**kwargs, stream=True) if chunk.choices
              for d in (chunk.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == call.function.name
    assert all(d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_auto_tool_choice_answers_in_text_or_in_calls_that_parse(client):
    # What LangChain's bind_tools sends: tools, no tool_choice ("auto").
    kwargs = dict(model=MODEL, messages=ask("What is the weather in Paris?"), tools=[WEATHER, CLOCK],
                  temperature=0, max_tokens=60)
    r = client.chat.completions.create(**kwargs)
    c = r.choices[0]
    # The tiny model's random weights answer in text; any call it opened would parse.
    assert c.finish_reason in ("stop", "length", "tool_calls")
    for call in c.message.tool_calls or []:
        check_call(call.function.name, call.function.arguments)
    assert c.message.content or c.message.tool_calls
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **kwargs, stream=True) if chunk.choices)
    assert streamed == (c.message.content or "")
    # The tools are described in the prompt (Qwen's `# Tools` section): none of that for "none".
    without = client.chat.completions.create(**kwargs, tool_choice="none")
    assert r.usage.prompt_tokens > without.usage.prompt_tokens + 100


def test_required_calls_may_come_several_at_once(client):
    kwargs = dict(model=MODEL, messages=ask("Weather, and an alarm."), tools=[WEATHER, CLOCK],
                  tool_choice="required", temperature=0.9, seed=4, max_tokens=400, n=3)
    for c in client.chat.completions.create(**kwargs).choices:
        if c.finish_reason == "tool_calls":
            assert c.message.tool_calls and len({t.id for t in c.message.tool_calls}) == len(c.message.tool_calls)
            for call in c.message.tool_calls:
                check_call(call.function.name, call.function.arguments)


def cut_call(client, kwargs, max_tokens):
    """The call of an answer cut at `max_tokens`, whole and streamed (which must agree)."""
    cut = client.chat.completions.create(**kwargs, max_tokens=max_tokens).choices[0]
    assert cut.finish_reason == "length" and cut.message.content is None, cut
    [call] = cut.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    chunks = [c for c in client.chat.completions.create(**kwargs, max_tokens=max_tokens, stream=True) if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]
    return call


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_call_cut_off_by_max_tokens_is_still_a_call_whole_and_streamed(client, choice):
    kwargs = dict(model=MODEL, messages=ask("What is the weather?"), tools=[WEATHER, CLOCK], tool_choice=choice,
                  temperature=0, parallel_tool_calls=False)
    full = client.chat.completions.create(**kwargs, max_tokens=300, logprobs=True).choices[0]
    [whole] = full.message.tool_calls
    # Cut halfway through the arguments: a call, as OpenAI returns one, with the arguments
    # written so far.
    tokens = [t.token for t in full.logprobs.content]
    text = "".join(tokens)
    halfway = text.index('"arguments": ') + len('"arguments": ') + len(whole.function.arguments) // 2
    inside = cut_call(client, kwargs, next(k for k in range(len(tokens)) if len("".join(tokens[:k])) >= halfway))
    assert inside.function.name == whole.function.name
    assert inside.function.arguments and whole.function.arguments.startswith(inside.function.arguments)
    assert inside.function.arguments != whole.function.arguments
    if choice == "required":
        # Cut once the name is written, before the arguments begin (what pydantic-ai's
        # `final_result` call hit): the call, with no argument text yet.
        named_at = next(k for k in range(1, len(tokens)) if f'"{whole.function.name}"' in "".join(tokens[:k]))
        header = cut_call(client, kwargs, named_at)
        assert (header.function.name, header.function.arguments) == (whole.function.name, "")


def test_a_call_cut_before_its_name_comes_back_as_content_whole_and_streamed(client):
    # Two tools, and the answer cut before the name tells them apart: no function to name.
    kwargs = dict(model=MODEL, messages=ask("Weather?"), tools=[WEATHER, CLOCK], tool_choice="required",
                  temperature=0, max_tokens=16)
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "length" and not whole.message.tool_calls and whole.message.content
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert not any(c.choices[0].delta.tool_calls for c in chunks)


def test_bad_schemas_and_tool_choices_are_400s_naming_the_field(client):
    cases = [
        (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
        (dict(response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "wat"}}}}}),
         "response_format.json_schema.schema"),
        (dict(extra_body={"structured_outputs": {"regex": "[0-9"}}), "structured_outputs.regex"),
        (dict(extra_body={"structured_outputs": {"grammar": "start: nothing_here"}}), "structured_outputs.grammar"),
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice.function.name"),
        (dict(response_format={"type": "json_object"}, extra_body={"structured_outputs": {"regex": "a"}}),
         "structured_outputs"),
        # strict: true holds a schema to OpenAI's rules: every object closed, every property required.
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}}),
         "response_format.json_schema.schema"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}},
                                                   "additionalProperties": False}},
            "required": ["a"], "additionalProperties": False}}}], tool_choice="required"),
         "tools[0].function.parameters.properties.a"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], **kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)


def test_vllm_structured_outputs_on_both_endpoints(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick."}], temperature=0,
                                       max_tokens=20, extra_body={"structured_outputs": {"choice": ["red", "green"]}})
    assert r.choices[0].message.content in ("red", "green")
    r = client.completions.create(model=MODEL, prompt="Code:", temperature=0, max_tokens=20,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    text = r.choices[0].text
    assert len(text) == 6 and text[2] == "-" and text[:2].isupper() and text[3:].isdigit(), text


# A plausible value for each request field of OpenAI's schema; a field missing here is sent
# as "x" (a new field of the SDK that Weft does not know must then be refused by name).
SAMPLES = {
    "frequency_penalty": 0.0, "logit_bias": {"5": 1.0}, "logprobs": True, "max_completion_tokens": 2, "max_tokens": 2,
    "metadata": {"k": "v"}, "modalities": ["text"], "n": 1, "parallel_tool_calls": True, "presence_penalty": 0.0,
    "prompt_cache_key": "k", "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "response_format": {"type": "text"}, "safety_identifier": "s", "seed": 1, "service_tier": "auto", "stop": ["zz"],
    "store": False, "temperature": 0.5, "tool_choice": "none", "tools": [WEATHER], "top_logprobs": 0, "top_p": 0.9,
    "user": "u", "verbosity": "low", "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
    "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
    "best_of": 1, "echo": False, "suffix": "end", "stream_options": {"include_usage": True},
}


def post(url, body):
    """Status and JSON body (or SSE text) of a raw POST, past any SDK-side checks."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def walk(path, schema_fields, base, doc):
    served, refused = [], []
    for field in sorted(schema_fields):
        if field in base:
            continue
        body = {**base, field: SAMPLES.get(field, "x")}
        # Fields that only make sense with a companion.
        if field == "stream_options":
            body["stream"] = True
        if field == "tools":
            body["tool_choice"] = "required"
        status, text = post(path, body)
        if status == 200:
            assert f"`{field}`" in doc, f"{field} is accepted but docs/api.md does not say what Weft does with it"
            served.append(field)
        else:
            assert status == 400, (field, status, text)
            assert json.loads(text)["error"]["param"] == field, (field, text)
            refused.append(field)
    return served, refused


def test_every_openai_request_field_is_served_documented_or_refused_by_name(client):
    doc = (ROOT / "docs" / "api.md").read_text()
    base = str(client.base_url).rstrip("/")
    chat_fields = chat_create_params.CompletionCreateParamsBase.__annotations__
    served, refused = walk(f"{base}/chat/completions", chat_fields,
                           {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, doc)
    assert {"audio", "prediction", "web_search_options", "functions", "function_call"} <= set(refused)
    assert {"response_format", "tools", "tool_choice", "metadata", "store"} <= set(served)
    text_fields = completion_create_params.CompletionCreateParamsBase.__annotations__
    served, refused = walk(f"{base}/completions", text_fields, {"model": MODEL, "prompt": "Hi", "max_tokens": 2}, doc)
    assert "suffix" in refused and "best_of" in served


def test_a_tool_result_goes_back_into_the_conversation(client):
    messages = ask("What is the weather?")
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="required",
                                       temperature=0, max_tokens=300)
    call = r.choices[0].message.tool_calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, CLOCK], tool_choice="none",
                                       temperature=0, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content
    # The call is in the prompt as the model wrote it: the second prompt is longer than the first.
    assert r.usage.prompt_tokens > 729 + 20
