"""The official `openai` client against a running heddle server, used unchanged.

Needs HEDDLE_BASE_URL (e.g. http://127.0.0.1:8080/v1) and HEDDLE_MODEL (a served model
id). Run by crates/heddle-server/tests/api_python_client.rs, which starts the server;
scripts/test-python.sh installs the client and runs that test. Works under pytest too.
"""

import io
import json
import os
import sys
import time
from typing import Literal, Optional

import jsonschema
import openai
import pydantic

BASE_URL = os.environ["HEDDLE_BASE_URL"]
MODEL = os.environ["HEDDLE_MODEL"]
client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=60)


def test_models_list_the_served_model():
    ids = [model.id for model in client.models.list()]
    assert MODEL in ids, ids
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat():
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is a heddle?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert reply.id.startswith("chatcmpl-")
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_with_usage():
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"], finishes
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens <= 6


def test_completions_and_stream():
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 4
    pieces = list(
        client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0, stream=True)
    )
    streamed = "".join(p.choices[0].text for p in pieces)
    assert streamed, pieces
    assert pieces[-1].choices[0].finish_reason == "length"


def test_echo_scores_the_prompt_as_the_generation_did():
    # What lm-evaluation-harness's loglikelihood requests send.
    prompt = "The capital of France is"
    generated = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=1)
    continuation = generated.choices[0].text
    scored = client.completions.create(
        model=MODEL, prompt=prompt + continuation, echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    choice = scored.choices[0]
    assert choice.text == prompt + continuation
    assert choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset)
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    # The continuation's tokens, scored, have the log-probabilities their generation had
    # (when re-tokenizing the text gives back the same tokens, as it does here).
    tail = logprobs.token_logprobs[-len(generated.choices[0].logprobs.token_logprobs) :]
    assert logprobs.tokens[-len(tail) :] == generated.choices[0].logprobs.tokens
    for a, b in zip(tail, generated.choices[0].logprobs.token_logprobs):
        assert abs(a - b) < 1e-4, (tail, generated.choices[0].logprobs.token_logprobs)


def test_errors_become_the_client_exceptions():
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as error:
        assert error.status_code == 404
    else:
        raise AssertionError("an unknown model must fail")
    try:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1)
    except openai.BadRequestError as error:
        assert error.body["param"] == "temperature", error.body
    else:
        raise AssertionError("a negative temperature must fail")


def _batch_file(lines):
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return client.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")


def _wait(batch_id, statuses):
    deadline = time.monotonic() + 60
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def _chat_line(custom_id, content, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0}
    body.update(fields)
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_batches_upload_run_and_download():
    uploaded = _batch_file([_chat_line("hello", "Say hello."), _chat_line("bad", "x", temperature=-1)])
    assert uploaded.id.startswith("file-") and uploaded.purpose == "batch"
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert uploaded.id in [f.id for f in client.files.list()]
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"from": "python"},
    )
    assert batch.status == "validating" and batch.metadata == {"from": "python"}
    done = _wait(batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (2, 1, 1)
    output = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in output] == ["hello"]
    answer = output[0]["response"]["body"]
    interactive = client.chat.completions.create(**_chat_line("x", "Say hello.")["body"])
    assert answer["choices"][0]["message"]["content"] == interactive.choices[0].message.content
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert errors[0]["custom_id"] == "bad"
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "temperature"
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    assert client.files.delete(uploaded.id).deleted
    try:
        client.files.retrieve(uploaded.id)
    except openai.NotFoundError:
        pass
    else:
        raise AssertionError("a deleted file must be gone")


def test_batches_cancel_and_page():
    lines = [_chat_line(f"n{i}", f"Tell story {i}.", max_tokens=48, ignore_eos=True) for i in range(24)]
    uploaded = _batch_file(lines)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling
    cancelled = _wait(batch.id, ("cancelled",))
    assert cancelled.request_counts.completed < 24
    second = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    client.batches.cancel(second.id)
    first_page = client.batches.list(limit=1)
    assert [b.id for b in first_page.data] == [second.id] and first_page.has_more
    assert [b.id for b in client.batches.list(limit=1, after=second.id).data] == [batch.id]
    try:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    except openai.BadRequestError as error:
        assert error.body["param"] == "endpoint", error.body
    else:
        raise AssertionError("an unsupported endpoint must fail")


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "population": {"type": "integer", "minimum": 0},
        "location": {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180},
            },
            "required": ["lat", "lon"],
            "additionalProperties": False,
        },
        "districts": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        "climate": {"enum": ["hot", "mild", "cold"]},
        "mayor": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
    },
    "required": ["city", "code", "population", "location", "districts", "climate", "mayor"],
    "additionalProperties": False,
}


def check_city(text):
    """Validates with jsonschema, an implementation independent of heddle's grammar."""
    jsonschema.Draft202012Validator.check_schema(CITY_SCHEMA)
    jsonschema.validate(json.loads(text), CITY_SCHEMA, cls=jsonschema.Draft202012Validator)


def test_response_format_json_schema():
    for temperature in (0, 1):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a city as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True}},
            max_tokens=200,
            temperature=temperature,
            seed=3,
        )
        assert reply.choices[0].finish_reason == "stop", reply
        check_city(reply.choices[0].message.content)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    species: Literal["cat", "dog", "parrot"]
    age: int
    nickname: Optional[str]


def test_parse_with_a_pydantic_model():
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a pet."}],
        response_format=Pet,
        max_tokens=120,
        temperature=0,
    )
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet), reply
    assert pet.species in ("cat", "dog", "parrot")


def test_invalid_schemas_are_bad_requests():
    try:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
        )
    except openai.BadRequestError as error:
        assert error.body["param"] == "response_format", error.body
    else:
        raise AssertionError("an invalid schema must fail")


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def weather_question(**kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL],
        max_tokens=60,
        temperature=0,
        **kwargs,
    )


def test_tools_with_each_tool_choice():
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        reply = weather_question(tool_choice=choice, parallel_tool_calls=False)
        assert reply.choices[0].finish_reason == "tool_calls", reply
        (call,) = reply.choices[0].message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
    reply = weather_question(tool_choice="none")
    assert not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason in ("stop", "length")
    reply = weather_question(tool_choice="auto")
    message = reply.choices[0].message
    if reply.choices[0].finish_reason == "tool_calls":
        assert message.tool_calls[0].function.name == "get_weather"
    else:
        assert message.content is not None and not message.tool_calls


def test_streamed_tool_calls_and_a_tool_result_turn():
    stream = weather_question(tool_choice="required", parallel_tool_calls=False, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta.id or ""
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    call = calls[0]
    assert call["name"] == "get_weather"
    json.loads(call["arguments"])
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call["id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}
                ],
            },
            {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"},
        ],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=20,
        temperature=0,
    )
    assert reply.choices[0].message.content


if __name__ == "__main__":
    tests = [(name, f) for name, f in sorted(globals().items()) if name.startswith("test_") and callable(f)]
    for name, test in tests:
        test()
        print(f"ok {name}")
    print(f"{len(tests)} passed")
    sys.exit(0)
