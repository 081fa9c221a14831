"""OpenAI's Responses API through the OpenAI SDK on the tiny fixture: create with an image,
a follow-up through previous_response_id, the streamed events, parse into a Pydantic model
(whole and streamed), function calls, and refusals naming the Responses field."""

from typing import Annotated

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from conftest import image_part

MODEL = "tiny-v5"


def image_input(text="What is this?"):
    url = image_part()["image_url"]["url"]
    return [{"role": "user", "content": [{"type": "input_text", "text": text},
                                         {"type": "input_image", "image_url": url}]}]


class Room(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(max_length=8)]
    floor: Annotated[int, Field(ge=0, le=3)]


WEATHER = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}},
    "required": ["city"], "additionalProperties": False}}


def test_create_with_an_image_then_continue_it(client):
    r = client.responses.create(model=MODEL, input=image_input(), max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_")
    # Cut by max_output_tokens, as OpenAI says it.
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 729
    # The follow-up sees the first turn (image, question, answer): a longer prompt, mostly cached.
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, input="And the colours?",
                                 max_output_tokens=4, temperature=0)
    assert r2.previous_response_id == r.id
    assert r2.usage.input_tokens > r.usage.input_tokens + 8
    assert r2.usage.input_tokens_details.cached_tokens >= 729
    # Not stored: nothing to continue.
    r3 = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, previous_response_id=r3.id, input="Again")
    assert e.value.body["param"] == "previous_response_id"


def test_streamed_events_add_up_to_the_response(client):
    kwargs = dict(model=MODEL, input=image_input(), max_output_tokens=6, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 6


def test_parse_returns_a_pydantic_object_whole_and_streamed(client):
    kwargs = dict(model=MODEL, input=image_input("The room as JSON."), text_format=Room, max_output_tokens=200,
                  temperature=0)
    parsed = client.responses.parse(**kwargs)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Room)
    with client.responses.stream(**kwargs) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.output_parsed == parsed.output_parsed


def test_function_calls_whole_and_streamed(client):
    kwargs = dict(model=MODEL, input="What is the weather?", tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, max_output_tokens=200, temperature=0)
    r = client.responses.create(**kwargs)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.arguments in ('{"city": "Paris"}', '{"city": "Oslo"}', '{"city": "Lima"}')
    events = list(client.responses.create(**kwargs, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == call.arguments and events[-1].type == "response.completed"
    # The call's result goes back in: the next turn's prompt holds both.
    r2 = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=3,
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": '{"forecast": "sunny"}'}])
    assert r2.usage.input_tokens > r.usage.input_tokens + 10


def test_refusals_name_the_responses_field(client):
    cases = [
        (dict(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0].type"),
        (dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "x"},
                                                  {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]),
         "input[0].content[1].image_url"),
        (dict(input="x", tools=[{"type": "web_search"}]), "tools[0].type"),
        (dict(input="x", text={"format": {"type": "json_schema", "name": "r", "strict": True,
                                          "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}),
         "text.format.schema"),
        (dict(input="x", max_output_tokens=0), "max_output_tokens"),
        (dict(input="x", extra_body={"truncation": "auto"}), "truncation"),
        (dict(input="x", extra_body={"no_such_field": 1}), "no_such_field"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.APIStatusError) as e:
            client.responses.create(model=MODEL, **kwargs)
        assert e.value.status_code in (400, 415) and e.value.body["param"] == param, (kwargs, e.value.body)
