"""corral's agent table: the one place that says what each agent is.

Standard library only, Python >= 3.9; shipped into every worker image beside the wrapper
(``/opt/corral/agents.py``). Everything else derives from it: the wrapper's core (command lines,
result parsers, version probe), the stub agent (flavour, version, output format), the host's
registry ``runtime/agents.py`` (install recipes on top) and the image builder (stub CLI names).

For each agent:

- ``name``: what ``WorkerSpec.agent`` says (``claude``, ``factory``, ``codex``, ``shell``);
- ``cli``: the CLI's name on PATH (the stub is installed under it);
- ``probe``: the version probe's argv, run at startup (its first line is the agent_version);
- ``command(prompt, args, indirect)``: the real command line. ``indirect`` is None when the
  prompt goes on the command line, ``"-"`` when it goes on the agent's stdin, or the path of the
  file that holds it (see ``indirect``);
- ``indirect``: how a prompt that cannot go on the command line travels (longer than 64 KiB, or
  starting with "-"): ``"stdin"`` or ``"file"``; ``prompt_suffix`` names that file;
- ``prompt_in(argv) -> (where, value)``: the inverse of ``command`` (argv without argv[0]):
  ``("argv", prompt)``, ``("stdin", None)`` or ``("file", path)``: how the stub agent reads it;
- ``parse(exit_code, stdout, stderr) -> (status, output, error)``: the real output normalised;
- ``output_format``: what the CLI prints (``result_json``, ``codex_jsonl``, ``text``): the
  stub agent speaks it;
- ``stub_version``: what the stub answers to the probe (None: no stub, the agent is its own).
"""

import json
import shlex


# --- result parsers: the real output formats ---------------------------------------------------

def _last_json_object(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except (ValueError, RecursionError):
                continue
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_result_json(exit_code, stdout, stderr):
    """claude -p --output-format json and droid exec -o json: one result object."""
    obj = _last_json_object(stdout)
    if not isinstance(obj, dict):
        err = (stderr.strip() or stdout.strip() or "no JSON result")[-2000:]
        return "error", "", "agent printed no JSON result (exit %s): %s" % (exit_code, err)
    text = obj.get("result")
    if text is None:
        text = obj.get("message", "")
    text = text if isinstance(text, str) else json.dumps(text)
    if exit_code == 0 and not obj.get("is_error", False):
        return "ok", text, ""
    return "error", text, text or stderr.strip()[-2000:] or "exit %s" % exit_code


def parse_codex_jsonl(exit_code, stdout, stderr):
    """codex exec --json: JSON Lines events; the answer is the last agent_message."""
    answer, error = "", ""
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(ev, dict):
            continue
        t = ev.get("type")
        item = ev.get("item")
        if t == "item.completed" and isinstance(item, dict) and item.get("type") == "agent_message":
            answer = item.get("text", "")
            answer = answer if isinstance(answer, str) else json.dumps(answer)
        elif t == "turn.failed":
            err = ev.get("error")
            error = (err.get("message") if isinstance(err, dict) else None) or "turn failed"
        elif t == "error":
            error = ev.get("message") or "error"
        error = error if isinstance(error, str) else json.dumps(error)
    if exit_code == 0 and not error:
        return "ok", answer, ""
    return "error", answer, error or stderr.strip()[-2000:] or "exit %s" % exit_code


def parse_text(exit_code, stdout, stderr):
    """shell: the output is what the command printed."""
    if exit_code == 0:
        return "ok", stdout, ""
    return "error", stdout, stderr.strip()[-2000:] or "exit %s" % exit_code


# --- command lines -------------------------------------------------------------------------------

def _claude_cmd(prompt, args, indirect):
    if indirect is None:
        return ["claude", "-p", prompt, "--output-format", "json"] + args
    return ["claude", "-p", "--output-format", "json"] + args      # the prompt on stdin


def _droid_cmd(prompt, args, indirect):
    if indirect is None:
        return ["droid", "exec", "-o", "json"] + args + [prompt]
    return ["droid", "exec", "-o", "json"] + args + ["-f", indirect]


def _codex_cmd(prompt, args, indirect):
    if indirect is None:
        return ["codex", "exec", "--json"] + args + [prompt]
    return ["codex", "exec", "--json"] + args + ["-"]            # the prompt on stdin


def _shell_cmd(prompt, args, indirect):
    # the script in a file keeps the args the positional parameters, as with sh -c PROMPT ARGS
    if indirect is None:
        return ["/bin/sh", "-c", prompt] + args
    return ["/bin/sh", "-c", ". " + shlex.quote(indirect)] + args


# --- where a command line has its prompt (the inverse of the above: what the stub agent reads) ------

def _claude_prompt(argv):
    # claude -p PROMPT --output-format json ; claude -p --output-format json < PROMPT
    if "-p" in argv:
        i = argv.index("-p")
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            return "argv", argv[i + 1]
        return "stdin", None
    return "argv", ""


def _droid_prompt(argv):
    # droid exec -o json ... PROMPT ; droid exec -o json ... -f FILE
    if "-f" in argv[:-1]:
        return "file", argv[len(argv) - 1 - argv[::-1].index("-f") + 1]
    return "argv", argv[-1] if len(argv) > 1 else ""


def _codex_prompt(argv):
    # codex exec --json ... PROMPT ; codex exec --json ... - < PROMPT
    if len(argv) > 1 and argv[-1] == "-":
        return "stdin", None
    return "argv", argv[-1] if len(argv) > 1 else ""


def _shell_prompt(argv):
    # sh -c SCRIPT ARGS ; sh -c '. FILE' ARGS
    script = argv[1] if argv[:1] == ["-c"] and len(argv) > 1 else ""
    if script.startswith(". "):
        try:
            words = shlex.split(script[2:])
        except ValueError:
            words = []
        if len(words) == 1:
            return "file", words[0]
    return "argv", script


# --- the table -----------------------------------------------------------------------------------

class Agent(object):
    __slots__ = ("name", "cli", "probe", "command", "prompt_in", "indirect", "prompt_suffix", "parse",
                 "output_format", "stub_version")

    def __init__(self, name, cli, probe, command, prompt_in, indirect, prompt_suffix, parse,
                 output_format, stub_version):
        self.name = name
        self.cli = cli
        self.probe = probe
        self.command = command
        self.prompt_in = prompt_in
        self.indirect = indirect
        self.prompt_suffix = prompt_suffix
        self.parse = parse
        self.output_format = output_format
        self.stub_version = stub_version

    @property
    def stubbable(self):
        return self.stub_version is not None

    def __repr__(self):
        return "Agent(%r, cli=%r)" % (self.name, self.cli)


AGENTS = {a.name: a for a in (
    Agent("claude", "claude", ["claude", "--version"], _claude_cmd, _claude_prompt, "stdin", ".txt",
          parse_result_json, "result_json", "2.0.0 (Claude Code) [corral stub]"),
    Agent("factory", "droid", ["droid", "--version"], _droid_cmd, _droid_prompt, "file", ".txt",
          parse_result_json, "result_json", "0.22.0 [corral stub]"),
    Agent("codex", "codex", ["codex", "--version"], _codex_cmd, _codex_prompt, "stdin", ".txt",
          parse_codex_jsonl, "codex_jsonl", "codex-cli 0.50.0 [corral stub]"),
    Agent("shell", "sh", ["/bin/sh", "-c", "echo sh"], _shell_cmd, _shell_prompt, "file", ".sh",
          parse_text, "text", None),
)}

BY_CLI = {a.cli: a for a in AGENTS.values()}
