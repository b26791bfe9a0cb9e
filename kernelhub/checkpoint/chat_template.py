"""Render a Jinja chat template the way transformers does (sandboxed, trim/lstrip blocks).

>>> render_chat("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
...             "{% if add_generation_prompt %}<assistant>{% endif %}",
...             [{"role": "user", "content": "hi"}], add_generation_prompt=True)
'<user>hi<assistant>'
"""

from __future__ import annotations

import datetime
import functools
import json


def _raise(message):
    raise ValueError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # sandboxed: templates come with checkpoints

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson  # transformers' filter: Jinja's own escapes HTML and sorts keys
    return env.from_string(template)


def render_chat(template: str, messages: list, *, add_generation_prompt: bool = False, tools=None, documents=None,
                **variables) -> str:
    """`messages` ([{"role", "content"}, ...]) rendered with `template`; `variables` reach the template
    (special tokens such as `bos_token`, and any extra keyword the template reads)."""
    return _compile(template).render(messages=messages, tools=tools, documents=documents,
                                     add_generation_prompt=add_generation_prompt, **variables)
