"""The official `openai` Python client against `anyllama serve` (tests/serve_api.rs starts the
server and passes its URL and API key): chat and completions, streamed and not, models, function
calling, and the errors the client turns into its exception types. Prints OK at the end; any failure raises."""
import sys

import openai

url, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

models = client.models.list()
model = models.data[0].id
assert model == "tiny-chat", models

msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
assert r.object == "chat.completion", r
choice = r.choices[0]
assert choice.message.role == "assistant" and isinstance(choice.message.content, str), r
assert choice.finish_reason in ("stop", "length"), r
assert r.usage.completion_tokens <= 12 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

lp = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=2).choices[0].logprobs
assert len(lp.content) >= 1 and all(len(t.top_logprobs) == 2 for t in lp.content), lp
assert lp.content[0].logprob == lp.content[0].top_logprobs[0].logprob, lp

stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
assert text == choice.message.content, (text, choice.message.content)
assert finish == choice.finish_reason and usage.completion_tokens == r.usage.completion_tokens

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0,
                              seed=7, stop=["\n\n"])
assert c.object == "text_completion" and isinstance(c.choices[0].text, str), c
streamed = "".join(x.choices[0].text for x in client.completions.create(
    model=model, prompt="Once upon a time", max_tokens=10, temperature=0, seed=7, stop=["\n\n"],
    stream=True) if x.choices)
assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
          "properties": {"ok": {"type": "boolean"}}}
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=30, temperature=0.8, seed=1,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "answer", "schema": schema}})
import json
assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool), r

# Function calling: a forced call (required, then a named function, streamed) whose arguments
# follow the schema, then the conversation continued with the call and its result.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}]
ask = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice="required",
                                   parallel_tool_calls=False, max_tokens=100, temperature=0.9, seed=2)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls" and choice.message.content is None, r
(call,) = choice.message.tool_calls
assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_"), r
args = json.loads(call.function.arguments)
assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit"), args
assert isinstance(args["city"], str) and len(args["city"]) <= 12, args

named = {"type": "function", "function": {"name": "get_weather"}}
# The same prompt (parallel_tool_calls is part of it) and seed: the same call, in chunks.
stream = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=named,
                                        parallel_tool_calls=False, max_tokens=100, temperature=0.9,
                                        seed=2, stream=True)
calls, finish = {}, None
for chunk in stream:
    for c in chunk.choices:
        for d in c.delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = c.finish_reason or finish
assert finish == "tool_calls", finish
assert calls == {0: {"name": "get_weather", "arguments": call.function.arguments}}, calls

history = ask + [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
r = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=8,
                                   temperature=0)
assert isinstance(r.choices[0].message.content, str), r
try:
    client.chat.completions.create(model=model, messages=ask, tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    raise AssertionError("an unknown function was accepted")
except openai.UnprocessableEntityError as e:
    assert e.body["param"] == "tool_choice", e.body

try:
    client.chat.completions.create(model=model, messages=msgs, temperature=-1)
    raise AssertionError("temperature -1 was accepted")
except openai.UnprocessableEntityError as e:
    assert e.body["param"] == "temperature", e.body
try:
    client.chat.completions.create(model="no-such-model", messages=msgs)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass
try:
    openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("OK")
