"""The official OpenAI Python SDK against a real `weft serve` on port 0 (tiny fixture)."""

import openai
import pytest

from conftest import image_part


def test_models(client):
    assert [m.id for m in client.models.list()] == ["tiny-v5"]


def test_chat_with_images(client):
    r = client.chat.completions.create(
        model="tiny-v5",
        messages=[{"role": "user", "content": [image_part(), image_part("wide.png"), {"type": "text", "text": "Compare."}]}],
        max_tokens=4, temperature=0, extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4
    assert r.usage.prompt_tokens > 2 * 729


def test_streaming_and_usage(client):
    stream = client.chat.completions.create(
        model="tiny-v5", messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 5


def test_logprobs_and_n(client):
    r = client.chat.completions.create(
        model="tiny-v5", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
        temperature=1.0, seed=3, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    assert len(r.choices) == 2
    assert len(r.choices[0].logprobs.content) == 3
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2


def test_errors_are_typed(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-v5", messages=[{"role": "user", "content": "Hi"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    bad = openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
