"""Chat templates that write tools, tool calls and tool answers as each family's own template
does (its documented tags and JSON layout), framed by the tiny tokenizer's ChatML tokens. The
tool-call tags are single tokens of the tiny tokenizer (server_fixtures.write_tokenizer's
markers), as they are in the real ones."""

_TURNS = ("{%- for m in messages %}"
          "{%- if m.role == 'tool' %}<|im_start|>{ROLE}\n{ANSWER}<|im_end|>\n"
          "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
          "{{ m.content }}{CALLS}<|im_end|>\n"
          "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
_CALL = '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'


def _template(tools, role, answer, calls):
    turns = _TURNS.replace("{ROLE}", role).replace("{ANSWER}", answer).replace("{CALLS}", calls)
    return "{%- if tools %}<|im_start|>system\n" + tools + "<|im_end|>\n{%- endif %}" + turns


# Granite 4.0: tools listed in <tools>, one JSON object per <tool_call> on lines of its own,
# tool answers in <tool_response> (Falcon-H1 and Hermes write the same).
GRANITE = _template(
    "You are a helpful assistant with access to the following tools.\n<tools>"
    "{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n</tools>\n\nFor each tool call, "
    "return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call>",
    "tool", "<tool_response>\n{{ m.content }}\n</tool_response>",
    "{%- for c in m.tool_calls %}<tool_call>\n" + _CALL + "\n</tool_call>{%- endfor %}")

# Nemotron Nano 2: tools in <AVAILABLE_TOOLS>[...], calls as one JSON list in <TOOLCALL>,
# tool answers as a user turn in <TOOL_RESPONSE>.
NEMOTRON = _template(
    "You can use the following tools to assist the user if required:\n<AVAILABLE_TOOLS>["
    "{%- for t in tools %}{{ t.function | tojson }}{{ ', ' if not loop.last }}{%- endfor %}"
    "]</AVAILABLE_TOOLS>\nIf you decide to call any tool(s), use the following format:\n"
    "<TOOLCALL>[{\"name\": \"tool_name1\", \"arguments\": \"tool_args1\"}]</TOOLCALL>",
    "user", "<TOOL_RESPONSE>[{{ m.content }}]</TOOL_RESPONSE>",
    "<TOOLCALL>[{%- for c in m.tool_calls %}" + _CALL + "{{ ', ' if not loop.last }}"
    "{%- endfor %}]</TOOLCALL>")

# Jamba 1.5+: calls as one JSON list in <tool_calls>, tool answers in a tool turn.
JAMBA = _template(
    "# Tools\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\nTo call tools, write "
    "<tool_calls>[{\"name\": ..., \"arguments\": {...}}]</tool_calls>",
    "tool", "{{ m.content }}",
    "<tool_calls>[{%- for c in m.tool_calls %}" + _CALL + "{{ ', ' if not loop.last }}"
    "{%- endfor %}]</tool_calls>")

# Nemotron 3 Nano (Qwen3-Coder's format): tools described in <tools>, each call in XML, one
# parameter per element, its value as text.
NEMOTRON3 = _template(
    "# Tools\n<tools>{%- for t in tools %}\n<function><name>{{ t.function.name }}</name>"
    "<parameters>{{ t.function.parameters | tojson }}</parameters></function>{%- endfor %}\n"
    "</tools>\nTo call a function, reply with:\n<tool_call>\n<function=example_function>\n"
    "<parameter=example_parameter>\nvalue\n</parameter>\n</function>\n</tool_call>",
    "user", "<tool_response>\n{{ m.content }}\n</tool_response>",
    "{%- for c in m.tool_calls %}<tool_call>\n<function={{ c.function.name }}>\n"
    "{%- for k, v in c.function.arguments.items() %}\n<parameter={{ k }}>\n"
    "{{ v if v is string else v | tojson }}\n</parameter>{%- endfor %}\n</function>\n"
    "</tool_call>{%- endfor %}")

# family -> (tiny checkpoint flavour, chat template, the tool-call tags)
FAMILIES = {
    "hermes": ("granite_dense", GRANITE, ("<tool_call>", "</tool_call>")),
    "nemotron": ("nemotron_h", NEMOTRON, ("<TOOLCALL>", "</TOOLCALL>")),
    "jamba": ("jamba", JAMBA, ("<tool_calls>", "</tool_calls>")),
    "xml": ("mamba2_groups_untied", NEMOTRON3, ("<tool_call>", "</tool_call>", "<function=",
                                                 "</function>", "<parameter=", "</parameter>",
                                                 ">")),
}
