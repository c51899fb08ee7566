"""DeepSeek-R1's chat format, built in for checkpoints that ship no template of their own.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜><think>\\n

- the system prompt (all system messages, joined by blank lines) comes right after BOS;
- earlier assistant turns keep only their answer: whatever precedes </think> is dropped,
  as DeepSeek requires (thinking is not fed back);
- the generation prompt opens the reasoning with "<think>\\n", so R1 always thinks;
- tools are listed in the system prompt with the call format; assistant tool calls and tool
  results are written in R1's markers (tool_calls/formats.py, DeepSeekV3Format).

A checkpoint's own template, when it has one, is used instead.
"""
from __future__ import annotations

ASSISTANT = "<｜Assistant｜>"

R1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='', in_outputs=false) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{%- if tools -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + '## Tools\nYou can call these functions:\n' -%}"
    "{%- for tool in tools -%}"
    "{%- set fn = tool['function'] -%}"
    "{%- set ns.system = ns.system + '\n### ' + fn['name'] + '\n' + (fn['description'] ~ '\n' if fn['description'] else '')"
    " + 'Parameters: ' + (fn['parameters'] | tojson) + '\n' -%}"
    "{%- endfor -%}"
    "{%- set ns.system = ns.system + '\nTo call functions, answer with:\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function"
    "<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>\n"
    "(more calls go before <｜tool▁calls▁end｜>, one per line).' -%}"
    "{%- endif -%}"
    "{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] != 'tool' and ns.in_outputs -%}{{ '<｜tool▁outputs▁end｜>' }}{%- set ns.in_outputs = false -%}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] or '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] | trim -%}{%- endif -%}"
    "{{ '<｜Assistant｜>' + content }}"
    "{%- if m['tool_calls'] -%}"
    "{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in m['tool_calls'] -%}"
    "{{ ('\n' if not loop.first else '') + '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name']"
    " + '\n```json\n' + call['function']['arguments'] + '\n```<｜tool▁call▁end｜>' }}"
    "{%- endfor -%}"
    "{{ '<｜tool▁calls▁end｜>' }}"
    "{%- endif -%}"
    "{{ '<｜end▁of▁sentence｜>' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ ('\n' if ns.in_outputs else '<｜tool▁outputs▁begin｜>') + '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set ns.in_outputs = true -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.in_outputs -%}{{ '<｜tool▁outputs▁end｜>' }}{%- endif -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\n' }}{%- endif -%}"
)


def builtin_template_for(vocab_has) -> str | None:
    """R1's template for vocabularies with R1's chat tokens; None for others."""
    return R1_CHAT_TEMPLATE if vocab_has(ASSISTANT) else None
