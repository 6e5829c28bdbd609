"""Agents on the server, spoken to with the official `openai` client: JSON that always parses
(response_format under a grammar, at temperature 1 on random tiny models, checked with
jsonschema), tool calls in each family's format (Granite / Hermes, Nemotron, Jamba: chat
templates of tests/chat_templates.py) whole and streamed, with a round trip; and the same
grammar from Python and from the command line."""

import concurrent.futures
import functools
import json
import shutil
import subprocess
import sys

import jsonschema
import pytest

import mlx_mamba
from chat_templates import FAMILIES
from mlx_mamba.grammar import Grammar, GrammarError
from mlx_mamba.tool_calls import FORMATS, ToolCallParser, detect_format
from server_fixtures import write_tokenizer
from test_server import ROOT, Server, rendered
from tuning import model_with_tokenizer

FLAGS = ["--max-batch-size", "4", "--prefill-step-size", "16"]
JSON = {"Content-Type": "application/json"}

# Nested objects, an array of objects, enums and required fields; lengths bounded so that a
# random model's replies end.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "owner": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "verified": {"type": "boolean"},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zone": {"enum": [1, 2, 3]}}, "required": ["city", "zone"],
                "additionalProperties": False}},
            "required": ["age", "verified", "address"], "additionalProperties": False},
        "tags": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"label": {"type": "string", "maxLength": 4},
                                             "weight": {"type": "number"}},
            "required": ["label"], "additionalProperties": False}},
    },
    "required": ["name", "kind", "owner", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "maxLength": 5}}, "required": ["zone"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def family_dir(checkpoint, tmp_path_factory):
    """family -> a tiny checkpoint of that family with a tokenizer whose chat template writes
    that family's tool format, and whose tool-call tags are tokens."""
    @functools.cache
    def make(family):
        flavour, template, tags = FAMILIES[family]
        directory = tmp_path_factory.mktemp(f"agent-{family}")
        shutil.copytree(checkpoint(flavour)[0], directory, dirs_exist_ok=True)
        write_tokenizer(directory, template, tags)
        return directory

    return make


@pytest.fixture(scope="module")
def servers(family_dir, tmp_path_factory):
    started = {}

    def get(family):
        if family not in started:
            logs = tmp_path_factory.mktemp(f"agent-server-{family}")
            started[family] = Server(family_dir(family), FLAGS, logs / "log")
        return started[family]

    yield get
    for server in started.values():
        server.stop()


def ask(client, messages=QUESTION, **kwargs):
    return client.chat.completions.create(model="m", messages=messages, **kwargs)


# ---- response_format -------------------------------------------------------------------------

def test_json_schema_replies_always_validate(servers):
    """50 of 50 replies at temperature 1 parse and validate; without the grammar none does."""
    client = servers("hermes").client()
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]

    def reply(seed, response_format, max_tokens):
        return ask(client, messages, temperature=1.0, max_tokens=max_tokens, seed=seed,
                   response_format=response_format).choices[0]

    # (the schema bounds the JSON replies; free ones are bounded by max_tokens: on a loaded
    # machine 4 x 400 random tokens can outlast the client's timeout)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        constrained = list(pool.map(lambda s: reply(s, RESPONSE_FORMAT, 400), range(50)))
        free = list(pool.map(lambda s: reply(s, None, 80), range(10)))
    for choice in constrained:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    assert len({choice.message.content for choice in constrained}) > 40  # sampled, not fixed

    def valid(text):
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            return True
        except (ValueError, jsonschema.ValidationError):
            return False

    assert not any(valid(choice.message.content) for choice in free)


def test_json_object_and_streamed_json(servers):
    client = servers("hermes").client()
    reply = ask(client, temperature=0.7, seed=3, max_tokens=400,
                response_format={"type": "json_schema", "json_schema": {"name": "s",
                                                                        "schema": SCHEMA}})
    chunks = list(ask(client, temperature=0.7, seed=3, max_tokens=400, stream=True,
                      response_format={"type": "json_schema",
                                       "json_schema": {"name": "s", "schema": SCHEMA}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    jsonschema.validate(json.loads(text), SCHEMA)
    # json_object: any object; a schema of one enum keeps the random model's reply short.
    small = {"type": "object", "properties": {"a": {"enum": [True, None]}}, "required": ["a"],
             "additionalProperties": False}
    for _ in range(3):
        whole = ask(client, temperature=1.0, max_tokens=200,
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": "s", "schema": small}})
        assert json.loads(whole.choices[0].message.content) in ({"a": True}, {"a": None})
    reply = ask(client, temperature=0.0, max_tokens=300, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # a greedy random model may write a string without end: the text so far is JSON's
        assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("response_format, says", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frog"}}},
     "frog"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}, "no-such-format"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "xml"}, "response_format"),
])
def test_bad_schemas_are_a_400_naming_the_problem(servers, response_format, says):
    status, body = servers("hermes").raw("POST", "/v1/chat/completions", {
        "messages": QUESTION, "response_format": response_format, "max_tokens": 4}, JSON)
    assert status == 400
    assert says in body["error"]["message"]


# ---- tool calls -------------------------------------------------------------------------------

def arguments_of(call):
    return json.loads(call.function.arguments)


def check_call(call, tools):
    function = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(arguments_of(call), function["parameters"])
    assert call.type == "function" and call.id.startswith("call_")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forced_tool_calls_whole_and_streamed(servers, family):
    client = servers(family).client()
    for choice, names in (("required", {"get_weather", "get_time"}),
                          ({"type": "function", "function": {"name": "get_time"}},
                           {"get_time"})):
        for seed in range(3):
            settings = dict(tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed,
                            max_tokens=200)
            whole = ask(client, **settings).choices[0]
            assert whole.finish_reason == "tool_calls"
            assert whole.message.content is None
            [call] = whole.message.tool_calls
            assert call.function.name in names
            check_call(call, TOOLS)

            chunks = list(ask(client, stream=True, **settings))
            deltas = [c.choices[0].delta for c in chunks if c.choices]
            streamed = [d.tool_calls[0] for d in deltas if d.tool_calls]
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            assert not "".join(d.content or "" for d in deltas)
            assert [(s.index, s.function.name, s.function.arguments) for s in streamed] == \
                [(0, call.function.name, call.function.arguments)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tool_round_trip_and_plain_text(servers, family_dir, family):
    """A call, the tool's answer and the model's next turn: the history is rendered through the
    family's template (the prompt's token count says so), and text that is no call comes out
    untouched: the greedy text of generate on the rendered prompt."""
    server = servers(family)
    client = server.client()
    first = ask(client, tools=TOOLS, tool_choice="required", temperature=0.0, max_tokens=200)
    call = first.choices[0].message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = ask(client, history, tools=TOOLS, temperature=0.0, max_tokens=30)
    model, tokenizer = mlx_mamba.load(family_dir(family))
    local = [dict(m) for m in history]
    local[1] = dict(local[1], content="", tool_calls=[
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": arguments_of(call)}}])
    text = tokenizer.apply_chat_template(local, tools=TOOLS, tokenize=False,
                                         add_generation_prompt=True)
    assert call.function.name in text.split(QUESTION[0]["content"])[1]
    for value in arguments_of(call).values():
        assert str(value) in text.split(QUESTION[0]["content"])[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(ids)
    expected = mlx_mamba.generate(model, tokenizer, ids, max_tokens=30)
    # (the random model may write a tag, never a whole call: an open tag is text too)
    assert answer.choices[0].message.content == expected
    assert not answer.choices[0].message.tool_calls
    streamed = list(ask(client, history, tools=TOOLS, temperature=0.0, max_tokens=30,
                        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    # tool_choice none: the tools are not rendered, nothing is parsed
    plain = ask(client, tools=TOOLS, tool_choice="none", temperature=0.0, max_tokens=12)
    assert plain.usage.prompt_tokens == len(rendered(tokenizer, QUESTION))


def test_bad_tool_requests_are_a_400(servers):
    server = servers("hermes")
    for body, says in (
            ({"tool_choice": "required"}, "no tools"),
            ({"tools": TOOLS, "tool_choice": {"type": "function",
                                              "function": {"name": "nope"}}}, "nope"),
            ({"tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "frog"}}}], "tool_choice": "required"},
             "frog"),
            ({"tools": TOOLS, "tool_choice": "required",
              "response_format": {"type": "json_object"}}, "response_format"),
            ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name")):
        status, reply = server.raw("POST", "/v1/chat/completions",
                                   dict(body, messages=QUESTION, max_tokens=4), JSON)
        assert status == 400, reply
        assert says in reply["error"]["message"]
    assert ask(server.client(), max_tokens=2).choices[0].finish_reason == "length"


def test_parser_finds_calls_at_every_split():
    """Every way of cutting the text into three streamed pieces gives the same content and
    calls; what is not a call (bad JSON, an open tag, a lone "<") comes out as it went in."""
    for name, fmt in FORMATS.items():
        call = '{"name": "f", "arguments": {"x": [1, "<"]}}'
        body = f"[{call}, {call}]" if fmt.listed else f"\n{call}\n"
        if fmt.xml:
            body = '\n<function=f>\n<parameter=x>\n[1, "<"]\n</parameter>\n</function>\n'
        text = f"Sure, < {fmt.start}{body}{fmt.end}\n"
        for cut in range(len(text) + 1):
            for end in range(cut, len(text) + 1, 5):
                parser = ToolCallParser(fmt)
                content, calls = "", []
                for part in (text[:cut], text[cut:end], text[end:]):
                    more, found = parser.feed(part)
                    content, calls = content + more, calls + found
                content += parser.finish()[0]
                assert content == "Sure, <", (name, cut, end)
                assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                        for c in calls] == [("f", {"x": [1, "<"]})] * (2 if fmt.listed else 1)
        for plain in ("no call here \n ", f"{fmt.start}not json{fmt.end} and after",
                      f"open {fmt.start}{call}", f"{fmt.start}{{\"x\": 1}}{fmt.end}"):
            for cut in range(len(plain) + 1):
                parser = ToolCallParser(fmt)
                pieces = [parser.feed(plain[:cut]), parser.feed(plain[cut:]), parser.finish()]
                assert "".join(p[0] for p in pieces) == plain
                assert not any(p[1] for p in pieces)


def test_tool_format_is_read_from_the_template():
    for family, (_, template, tags) in FAMILIES.items():
        assert detect_format(template) == FORMATS[family]
        assert (FORMATS[family].start, FORMATS[family].end) == tags[:2]
    assert detect_format(None).name == "hermes"
    assert detect_format({"default": "x", "tool_use": "<TOOLCALL>"}).name == "nemotron"


# ---- the grammar from Python and the command line --------------------------------------------

@pytest.fixture(scope="module")
def hermes_model(family_dir):
    return family_dir("hermes"), *mlx_mamba.load(family_dir("hermes"))


def test_generate_follows_a_schema_or_grammar(hermes_model):
    _, model, tokenizer = hermes_model
    for seed in range(5):
        text = mlx_mamba.generate(model, tokenizer, "pet:", temp=1.0, seed=seed, max_tokens=400,
                                  response_format=RESPONSE_FORMAT)
        jsonschema.validate(json.loads(text), SCHEMA)
    results = mlx_mamba.batch_generate(model, tokenizer, ["a", "bc", "def"], temp=1.0, seed=1,
                                       max_tokens=400, response_format=Grammar.json_schema(SCHEMA))
    for result in results:
        jsonschema.validate(json.loads(result.text), SCHEMA)
    # Each prompt gets the tokens it gets alone, grammar included.
    assert results[1].text == mlx_mamba.generate(model, tokenizer, "bc", temp=1.0, seed=1,
                                                 max_tokens=400,
                                                 response_format=Grammar.json_schema(SCHEMA))
    assert mlx_mamba.generate(model, tokenizer, "x", temp=1.0, seed=2, max_tokens=40,
                              response_format=Grammar.regex(r"(yes|no)!")) in ("yes!", "no!")
    with pytest.raises(GrammarError, match="frog"):
        mlx_mamba.generate(model, tokenizer, "x", response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "frog"}}})


def test_grammar_over_a_metaspace_tokenizer(checkpoint, tmp_path):
    """A tokenizer whose decoder llguidance does not read (Metaspace: "▁the" is " the" in a
    text, "the" at its start): each token's bytes are taken in context, so the text matches."""
    model, tokenizer = mlx_mamba.load(model_with_tokenizer(checkpoint("mamba2")[0],
                                                           tmp_path / "m"))
    grammar = Grammar.regex(r"(yes|no), (sir|my lady)")
    texts = {mlx_mamba.generate(model, tokenizer, "Is it raining?", temp=1.0, seed=seed,
                                max_tokens=30, response_format=grammar) for seed in range(8)}
    assert texts <= {"yes, sir", "no, sir", "yes, my lady", "no, my lady"}
    assert len(texts) > 1


def test_command_line_json_schema(hermes_model, tmp_path):
    directory = hermes_model[0]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))

    def run(*flags):
        return subprocess.run([sys.executable, "-m", "mlx_mamba.generate", "--model",
                               str(directory), "--prompt", "pet", "--max-tokens", "400", *flags],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)

    done = run("--json-schema", str(schema), "--temp", "1", "--seed", "4")
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)
    schema.write_text('{"type": "frog"}')
    failed = run("--json-schema", str(schema))
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: ") and "frog" in failed.stderr
    assert "Traceback" not in failed.stderr
    failed = run("--json-schema", str(tmp_path / "missing.json"))
    assert failed.returncode == 1 and "missing.json" in failed.stderr


# ---- n choices from one prefill ----------------------------------------------------------------

def test_n_choices_equal_separate_requests_from_one_prefill(servers):
    """n = 3 with seed s: choice i is the text of a request with seed s + i; the prompt was
    prefilled once (the engine's counter) and usage counts it once."""
    server = servers("hermes")
    client = server.client()
    prompt = "Once upon a time, in a state space far away,"
    settings = dict(model="m", prompt=prompt, max_tokens=24, temperature=1.0)
    server.wait_idle()
    before = server.raw("GET", "/health")[1]["prefills"]
    whole = client.completions.create(n=3, seed=11, **settings)
    assert server.raw("GET", "/health")[1]["prefills"] == before + 1
    alone = [client.completions.create(seed=11 + i, **settings).choices[0] for i in range(3)]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [c.text for c in alone]
    assert [c.finish_reason for c in whole.choices] == [c.finish_reason for c in alone]
    assert len({c.text for c in whole.choices}) == 3
    assert whole.usage.prompt_tokens == client.completions.create(
        seed=11, **settings).usage.prompt_tokens
    assert whole.usage.completion_tokens == sum(
        client.completions.create(seed=11 + i, **settings).usage.completion_tokens
        for i in range(3))
    streamed = ["", "", ""]
    for chunk in client.completions.create(n=3, seed=11, stream=True, **settings):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in whole.choices]
    # chat, with a grammar: each choice under its own
    chats = ask(client, n=2, seed=5, temperature=1.0, max_tokens=400,
                response_format=RESPONSE_FORMAT).choices
    for i, choice in enumerate(chats):
        assert choice.message.content == ask(client, seed=5 + i, temperature=1.0, max_tokens=400,
                                             response_format=RESPONSE_FORMAT
                                             ).choices[0].message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    status, reply = server.raw("POST", "/v1/completions", {"prompt": "x", "n": 5}, JSON)
    assert status == 400 and "max-batch-size" in reply["error"]["message"]
