"""DeepSeek-R1's chat format, built in for checkpoints that ship no template of their own.

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜><think>\\n

- the system prompt (all system messages, joined by blank lines) comes right after BOS;
- earlier assistant turns keep only their answer: whatever precedes </think> is dropped,
  as DeepSeek requires (thinking is not fed back);
- the generation prompt opens the reasoning with "<think>\\n", so R1 always thinks.

A checkpoint's own template, when it has one, is used instead.
"""
from __future__ import annotations

ASSISTANT = "<｜Assistant｜>"

R1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + m['content'] -%}"
    "{%- endfor -%}"
    "{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{%- set content = m['content'] or '' -%}"
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] | trim -%}{%- endif -%}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\n' }}{%- endif -%}"
)


def builtin_template_for(vocab_has) -> str | None:
    """R1's template for vocabularies with R1's chat tokens; None for others."""
    return R1_CHAT_TEMPLATE if vocab_has(ASSISTANT) else None
