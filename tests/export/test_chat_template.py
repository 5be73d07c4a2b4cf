"""export.chat_template: a hostile chat template is refused in seconds and within a bounded allowance of memory, with
one line naming its file, and the process's limits and SIGALRM handler are as before afterwards."""
from __future__ import annotations

import resource
import signal
import time

import pytest

TURNS = [{"role": "user", "content": "hi"}]


@pytest.fixture
def tok():
    from conftest import make_tokenizer
    return make_tokenizer()


def _refused(tok, template, match):
    from edgequant.errors import EdgequantError
    from edgequant.export.chat_template import render
    tok.chat_template = template
    limits, handler = resource.getrlimit(resource.RLIMIT_AS), signal.getsignal(signal.SIGALRM)
    t0 = time.monotonic()
    with pytest.raises(EdgequantError, match=match) as e:
        render(tok, TURNS, "DIST/tokenizer_config.json", 10_000)
    assert "DIST/tokenizer_config.json" in str(e.value) and "\n" not in str(e.value)
    assert resource.getrlimit(resource.RLIMIT_AS) == limits and signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    return time.monotonic() - t0


@pytest.mark.parametrize("template", ['{{ "x" * 10**10 }}', '{{ "x".ljust(10**10) }}', '{{ ("x" * 10**7) * 10**7 }}',
                                      "{{ [0] * 10**10 }}"])
def test_a_template_allocating_gigabytes_is_refused_at_once(tok, template):
    """Each of these took 4.7 GB and 79 s and then got the generic out-of-memory line naming options `run` and `chat`
    do not have (eighteenth re-run, U6); now the allowance above what the process holds (1 GiB) refuses them."""
    assert _refused(tok, template, "needed more than 1 GiB to render") < 5


def test_a_template_that_runs_for_long_is_refused_by_the_alarm(tok, monkeypatch):
    """Two nested loops of 10^5 steps (each under the sandbox's range cap) print nothing for hours."""
    from edgequant.export import chat_template
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    took = _refused(tok, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                    "did not finish rendering this conversation within 0.5 s")
    assert took < 5


def test_a_text_longer_than_the_context_can_spell_is_refused_before_tokenizing(tok):
    from edgequant.export.chat_template import max_chars
    limit = max_chars(tok, 100)
    assert limit >= 100 * max(len(t) for t in tok.get_vocab())
    from edgequant.errors import EdgequantError
    from edgequant.export.chat_template import render
    tok.chat_template = "{{ 'x' * %d }}" % (limit + 1)
    with pytest.raises(EdgequantError, match=f"renders this conversation to {limit + 1} characters"):
        render(tok, TURNS, "DIST/tokenizer_config.json", limit)
    tok.chat_template = "{{ 'x' * %d }}" % limit
    assert render(tok, TURNS, "DIST/tokenizer_config.json", limit) == "x" * limit


def test_a_real_template_renders_as_transformers_renders_it(tok):
    """The bounds change nothing for a template that behaves."""
    from edgequant.export.chat_template import render
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render(tok, TURNS, "DIST/tokenizer_config.json", 10_000) == \
        tok.apply_chat_template(TURNS, add_generation_prompt=True, tokenize=False) == \
        "<|user|>hi<|endoftext|><|assistant|>"


def test_the_refusal_names_the_file_the_template_came_from(tmp_path, tok):
    """transformers reads chat_template.jinja over tokenizer_config.json's entry: the line names the one in use."""
    from edgequant.errors import EdgequantError
    from edgequant.export.api import _apply_template
    tok.chat_template = "{{ 1/0 }}"
    with pytest.raises(EdgequantError, match=f"chat_template in {tmp_path}/tokenizer_config.json was refused"):
        _apply_template(tok, TURNS, tmp_path, 100)
    (tmp_path / "chat_template.jinja").write_text("{{ 1/0 }}")
    with pytest.raises(EdgequantError, match=f"chat_template in {tmp_path}/chat_template.jinja was refused"):
        _apply_template(tok, TURNS, tmp_path, 100)
