"""Tool calls in the formats of the families we load: how a model writes them, the grammar that
forces one (tool_choice "required" or a named function), and the parser that turns the text
into OpenAI `tool_calls` as it streams.

Every format is JSON between two tags, `{"name": ..., "arguments": {...}}` for one call or a
list of them:
- hermes: `<tool_call>\\n{...}\\n</tool_call>`, one call per tag pair: Granite 4.0 (its chat
  template's own words), Falcon-H1 instruct (an object, or in the Tiny models a list), and
  Bamba, which has no format of its own; also Qwen and Hermes models.
- nemotron: `<TOOLCALL>[{...}, ...]</TOOLCALL>`: Nemotron-H / Nemotron Nano 2.
- jamba: `<tool_calls>[{...}, ...]</tool_calls>`: AI21 Jamba 1.5 and later.
The format is read from the chat template (the tags it writes), hermes when it names none.
"""

import dataclasses
import json
import uuid

from .grammar import Grammar


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str
    end: str
    listed: bool  # the tags hold a JSON list of calls, not one call


FORMATS = {f.name: f for f in (ToolFormat("hermes", "<tool_call>", "</tool_call>", False),
                               ToolFormat("nemotron", "<TOOLCALL>", "</TOOLCALL>", True),
                               ToolFormat("jamba", "<tool_calls>", "</tool_calls>", True))}


def detect_format(chat_template):
    """The ToolFormat whose tags the chat template (a string, or a dict of named templates)
    writes; hermes when it writes none of them."""
    text = json.dumps(chat_template) if isinstance(chat_template, dict) else str(chat_template)
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
    schema = {"anyOf": calls, "x-guidance": {"whitespace_flexible": False}}
    body = '"[" call "]"' if fmt.listed else r'"\n" call "\n"'
    return Grammar.lark(f"start: {json.dumps(fmt.start)} {body} {json.dumps(fmt.end)}\n"
                        f"call: %json {json.dumps(schema)}")


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

    def __init__(self, fmt):
        self.fmt = fmt
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
            parsed = parse_calls(body)
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
