"""`edgequant export|run|chat|bench|package` click commands (registered on the main group by `register_commands`).

Importing this module must stay cheap: tvm is imported inside the command functions, so `edgequant --help` is instant.
"""
from __future__ import annotations

import json

import click

from edgequant.clitypes import (MAX_REPEATS, NON_NEGATIVE, NON_NEGATIVE_FLOAT, POSITIVE, POSITIVE_INT_LIST,
                                PROBABILITY, non_empty)

from .targets import target_names


@click.command("export")
@click.argument("checkpoint")
@click.option("--target", "-t", default="cpu", show_default=True,
              help=f"One of: {', '.join(target_names())}.")
@click.option("-o", "--output", default=None, help="DIST folder to write (default: CHECKPOINT-TARGET).")
@click.option("--arch", default=None, help="CUDA architectures, e.g. sm_90 or sm_80,sm_90 (default sm_80,sm_90).")
@click.option("--system-lib-prefix", default=None, help="Symbol prefix of mobile static libraries.")
@click.option("-q", "--quiet", is_flag=True)
def export_cmd(checkpoint, target, output, arch, system_lib_prefix, quiet):
    """Compile CHECKPOINT (quantized, or a Hugging Face folder for fp16) with TVM into a DIST folder."""
    from . import api
    from .targets import get_preset
    out = api.export(checkpoint, target, output, arch=arch, system_lib_prefix=system_lib_prefix, progress=not quiet)
    click.echo(str(out))
    preset = get_preset(target)
    if preset.system_lib and preset.app:  # a static library: nothing here runs it, so say what does
        click.echo(f"next: {out}/{preset.library} links into an app; the steps are in {preset.app} in the edgequant "
                   "repository", err=True)


@click.command("run")
@click.argument("dist")
@click.option("--prompt", "-p", required=True, callback=non_empty)
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--temperature", type=NON_NEGATIVE_FLOAT, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=PROBABILITY, default=1.0, show_default=True)
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
@click.option("--chat-template", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print tokens and speeds as JSON instead of streaming.")
def run_cmd(dist, prompt, max_new_tokens, temperature, top_p, seed, chat_template, as_json):
    """Generate text from PROMPT with an exported DIST folder (TVM runtime only)."""
    from . import api
    started = []

    def sink(s):   # the prompt is echoed with the first text, so an error never follows it on the same line
        if not started:
            started.append(True)
            click.echo(prompt, nl=False)
        click.echo(s, nl=False)
    res = api.run(dist, prompt, max_new_tokens, temperature, top_p, seed, chat_template,
                  on_text=None if as_json else sink)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        if not started:
            click.echo(prompt, nl=False)
        click.echo(f"\n[{res['prompt_tokens']} prompt tokens: {res['prefill_tokens_per_s']:.1f} tok/s prefill; "
                   f"{len(res['tokens'])} new tokens: {res['decode_tokens_per_s']:.1f} tok/s decode; "
                   f"{res['target']}]", err=True)


@click.command("chat")
@click.argument("dist")
@click.option("--max-new-tokens", type=POSITIVE, default=256, show_default=True)
@click.option("--temperature", type=NON_NEGATIVE_FLOAT, default=0.7, show_default=True)
@click.option("--top-p", type=PROBABILITY, default=0.95, show_default=True)
@click.option("--seed", type=NON_NEGATIVE, default=0, show_default=True)
def chat_cmd(dist, max_new_tokens, temperature, top_p, seed):
    """Chat with an exported model (the tokenizer's chat template). An empty line, Ctrl-D or Ctrl-C ends the chat;
    piped input works too (one message per line, replies on stdout, speeds on stderr)."""
    import sys

    from . import api
    if hasattr(sys.stdin, "reconfigure"):   # bytes that are not UTF-8 reach api.user_text instead of raising here
        sys.stdin.reconfigure(errors="surrogateescape")
    api.chat(dist, max_new_tokens, temperature, top_p, seed, read=_read_line, write=_echo,
             note=lambda s: click.echo(s, err=True))


MAX_MESSAGE_CHARS = 4 << 20   # one piped message: far past any context window (a token spells a few characters)


def _read_line(prompt: str) -> str:
    """A line of input: with a prompt and line editing on a terminal, silently from a pipe. A piped line is read up
    to MAX_MESSAGE_CHARS: `chat < /dev/zero` read one endless line until memory ran out (eighteenth re-run, U6)."""
    import sys

    from edgequant.errors import EdgequantError
    if sys.stdin is None:   # started with stdin closed (`<&-`, some service managers): nothing to read
        raise EOFError
    if not sys.stdin.isatty():
        line = sys.stdin.readline(MAX_MESSAGE_CHARS + 1)
        if not line:
            raise EOFError
        if len(line) > MAX_MESSAGE_CHARS:
            raise EdgequantError(f"a message of more than {MAX_MESSAGE_CHARS} characters came in; the model's context "
                                 "holds far less: send shorter messages, one per line")
        return line.rstrip("\r\n")
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        click.echo()  # leave the shell's prompt on a line of its own
        raise


def _echo(s="", end="\n", flush=False):  # noqa: ARG001 - print-like signature for api.chat
    click.echo(s, nl=end == "\n")


@click.command("bench")
@click.argument("dist")
@click.option("--prompt-lengths", type=POSITIVE_INT_LIST, default="32,128,512", show_default=True)
@click.option("--decode-tokens", type=POSITIVE, default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1, MAX_REPEATS), default=1, show_default=True,
              help="Runs per prompt length; the fastest is kept.")
@click.option("--context", type=POSITIVE, default=None,
              help="Tokens of context for the memory plan (default: the KV cache length the runner allocates).")
@click.option("--json", "as_json", is_flag=True)
def bench_cmd(dist, prompt_lengths, decode_tokens, repeats, context, as_json):
    """Prefill/decode tokens per second and memory plan of an exported model."""
    from edgequant.memory import MemoryPlan
    from . import api
    res = api.bench(dist, prompt_lengths, decode_tokens, repeats, context=context)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{res['target']} ({res['device']}), {res['quantization']}: weights {res['weight_bytes'] / 2**20:.1f} MiB, "
               f"KV cache {res['kv_cache_bytes'] / 2**20:.1f} MiB for {res['kv_cache_tokens']} tokens")
    click.echo(f"{'prompt':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for row in res["rows"]:
        click.echo(f"{row['prompt_tokens']:>8} {row['prefill_tokens_per_s']:>14.1f} {row['decode_tokens_per_s']:>13.1f}")
    click.echo("\n".join(MemoryPlan(**res["memory"]).lines()))


@click.command("package")
@click.argument("config")
@click.option("-q", "--quiet", is_flag=True)
def package_cmd(config, quiet):
    """Export the checkpoints of CONFIG (JSON: "targets", "models", "output") for app platforms into one bundle:
    a static library per target, weights per model, and edgequant-app-config.json (export/package.py)."""
    from .package import package
    click.echo(str(package(config, progress=not quiet)))


def register_commands(group: click.Group):
    for cmd in (export_cmd, run_cmd, chat_cmd, bench_cmd, package_cmd):
        group.add_command(cmd)
