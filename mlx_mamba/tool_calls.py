"""Tool calls in the formats of the families we load: how a model writes them, the grammar that
forces one (tool_choice "required" or a named function), and the parser that turns the text
into OpenAI `tool_calls` as it streams.

Every format but one is JSON between two tags, `{"name": ..., "arguments": {...}}` for one
call or a list of them:
- hermes: `<tool_call>\\n{...}\\n</tool_call>`, one call per tag pair: Granite 4.0 (its chat
  template's own words), Falcon-H1 instruct (an object, or in the Tiny models a list), and
  Bamba, which has no format of its own; also Qwen and Hermes models.
- nemotron: `<TOOLCALL>[{...}, ...]</TOOLCALL>`: Nemotron-H / Nemotron Nano 2.
- jamba: `<tool_calls>[{...}, ...]</tool_calls>`: AI21 Jamba 1.5 and later.
The other is XML: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...
</function>\n</tool_call>`, each value as text (read as JSON unless the function's schema
says string): Nemotron 3 Nano (and Qwen3-Coder).
The format is read from the chat template (the tags it writes), hermes when it names none.
"""

import dataclasses
import json
import re
import uuid

from .grammar import Grammar


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str
    end: str
    listed: bool  # the tags hold a JSON list of calls, not one call
    xml: bool = False  # the tags hold <function=...> elements, not JSON


FORMATS = {f.name: f for f in (ToolFormat("hermes", "<tool_call>", "</tool_call>", False),
                               ToolFormat("nemotron", "<TOOLCALL>", "</TOOLCALL>", True),
                               ToolFormat("jamba", "<tool_calls>", "</tool_calls>", True),
                               ToolFormat("xml", "<tool_call>", "</tool_call>", False, True))}


def detect_format(chat_template):
    """The ToolFormat whose tags the chat template (a string, or a dict of named templates)
    writes; hermes when it writes none of them."""
    text = json.dumps(chat_template) if isinstance(chat_template, dict) else str(chat_template)
    if "<function=" in text:
        return FORMATS["xml"]
    for name in ("nemotron", "jamba", "hermes"):  # "<tool_call>" is a prefix of "<tool_calls>"
        if FORMATS[name].start in text:
            return FORMATS[name]
    return FORMATS["hermes"]


def forced_call_grammar(fmt, tools, name=None):
    """A Grammar for exactly one call in `fmt`: to the function `name`, or to any of `tools`
    (OpenAI tool dicts {"type": "function", "function": {"name", "parameters"}}), with
    arguments that validate against the function's parameters."""
    calls = []
    for tool in tools:
        function = tool["function"]
        if name is None or function["name"] == name:
            calls.append({"type": "object", "properties": {
                "name": {"const": function["name"]},
                "arguments": function.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False})
    if fmt.xml:
        return _xml_call_grammar(fmt, [t["function"] for t in tools
                                       if name is None or t["function"]["name"] == name])
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    body = '"[" call "]"' if fmt.listed else r'"\n" call "\n"'
    return Grammar.lark(f"start: {json.dumps(fmt.start)} {body} {json.dumps(fmt.end)}\n"
                        f"call: %json {json.dumps(schema)}")


def _xml_call_grammar(fmt, functions):
    """One XML call to one of `functions`, with each of its required parameters in order: a
    string as one line of text without "<" (an enum as one of its values), anything else as
    JSON."""
    rules, choices = [], []
    for i, function in enumerate(functions):
        schema = function.get("parameters") or {}
        properties = schema.get("properties", {})
        parts = [json.dumps(f"<function={function['name']}>\n")]
        for j, key in enumerate(k for k in properties if k in schema.get("required", [])):
            value = properties[key]
            if value.get("type") == "string" and "enum" in value:
                text = " | ".join(json.dumps(str(v)) for v in value["enum"])
            elif value.get("type") == "string":
                text = f"/[^<\\n]{{0,{value['maxLength']}}}/" if "maxLength" in value \
                    else "/[^<\\n]*/"
            else:
                text = "%json " + json.dumps(dict(value, **{"x-guidance": {
                    "whitespace_flexible": False}}))
            rules.append(f"v{i}_{j}: {text}")
            parts += [json.dumps(f"<parameter={key}>\n"), f"v{i}_{j}",
                      json.dumps("\n</parameter>\n")]
        rules.append(f"f{i}: " + " ".join(parts + [json.dumps("</function>\n")]))
        choices.append(f"f{i}")
    return Grammar.lark("\n".join([f"start: {json.dumps(fmt.start + chr(10))} call "
                                   f"{json.dumps(fmt.end)}", "call: " + " | ".join(choices),
                                   *rules]))


_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.S)


def _xml_calls(body, tools):
    """The calls of an XML body, None if it holds anything else; values typed by the tools'
    schemas (a string stays text, anything else is read as JSON when it is JSON)."""
    if _FUNCTION.sub("", body).strip():
        return None
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    calls = []
    for name, inner in _FUNCTION.findall(body):
        if _PARAMETER.sub("", inner).strip():
            return None
        properties = schemas.get(name, {}).get("properties", {})
        arguments = {}
        for key, value in _PARAMETER.findall(inner):
            value = value.removeprefix("\n").removesuffix("\n")
            if properties.get(key, {}).get("type") != "string":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            arguments[key] = value
        calls.append(_call({"name": name, "arguments": arguments}))
    return calls or None


def _call(value):
    """An OpenAI tool call from a parsed {"name", "arguments"} object, None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"], "arguments": arguments}}


def parse_calls(body):
    """The OpenAI tool calls in the text between a format's tags (one call object or a list of
    them), or None if it is not that."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    calls = [_call(v) for v in (value if isinstance(value, list) else [value])]
    return None if not calls or None in calls else calls


class ToolCallParser:
    """Splits streamed text into content and tool calls. `feed(text)` and, at the end,
    `finish()` return (content to send now, calls completed now). Text that may be the start
    of a tag is held until the next text decides; a tagged body that is not a call, or is not
    closed, is content, untouched. Whitespace between content and calls is dropped; text
    without calls comes out exactly as it went in."""

    def __init__(self, fmt, tools=()):
        """tools: the request's tools (OpenAI dicts), whose schemas type the XML format's
        values."""
        self.fmt, self.tools = fmt, tools
        self.buffer = ""  # text not handed out yet
        self.inside = False  # the buffer is a call's body
        self.spaces = ""  # trailing whitespace held back: a call may follow it
        self.called = False
        self.after_call = False  # no content since the last call

    def feed(self, text):
        self.buffer += text
        out, raw, calls = "", "", []
        while True:
            tag = self.fmt.end if self.inside else self.fmt.start
            at = self.buffer.find(tag)
            if at < 0:
                if not self.inside:
                    keep = max((n for n in range(1, len(tag)) if self.buffer.endswith(tag[:n])),
                               default=0)
                    raw += self.buffer[:len(self.buffer) - keep]
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                return out + self._content(raw, False), calls
            if not self.inside:
                raw += self.buffer[:at]
                self.buffer, self.inside = self.buffer[at + len(tag):], True
                continue
            body, self.buffer, self.inside = self.buffer[:at], self.buffer[at + len(tag):], False
            parsed = _xml_calls(body, self.tools) if self.fmt.xml else parse_calls(body)
            if parsed is None:
                raw += self.fmt.start + body + self.fmt.end
                continue
            out += self._content(raw, True)
            raw = ""
            calls += parsed
            self.called = self.after_call = True

    def finish(self):
        rest = (self.fmt.start if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        text = self._content(rest, False)
        if not self.called:
            text += self.spaces
        self.spaces = ""
        return text, []

    def _content(self, raw, call_follows):
        text = self.spaces + raw
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        body = text.rstrip()
        self.spaces = "" if call_follows else text[len(body):]
        return body
