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
- ``output_format``: what the CLI prints (``claude_json``, ``droid_json``, ``codex_jsonl``,
  ``text``): the stub agent speaks it, in the shapes the real CLIs print;
- ``stub_version``: what the stub answers to the probe (None: no stub, the agent is its own).

How a real agent is run (``Setup``, made by the wrapper's core from the container's environment:
``CORRAL_PERMISSIONS``, ``CORRAL_MODEL``, ``CORRAL_GATEWAY``/``CORRAL_GATEWAY_PORT``, and the
home directory and PATH additions its driver found):

- ``options(setup)``: the flags every run of the CLI gets (permission mode, model, provider);
- ``env(setup)``: what the agent's environment gets with the model gateway on (base URL,
  placeholder key, switches that keep it from calling anything else); no credential ever: the
  supervisor injects the real one;
- ``files(setup)``: files the wrapper writes under the agent's home before it starts (droid's
  settings), as ``(path relative to the home, bytes)``;
- ``path_hints``: directories, relative to the directory of the CLI's resolved binary, that the
  CLI expects on PATH when they exist (codex's ``codex-path``);
- ``final(event)``: whether a JSON object the CLI printed on a line of its own is its final
  result: the task is answered soon after it even if the CLI lingers (``None`` when the CLI has
  no such line);
- ``sandbox_check(setup)``: an argv that exits 0 when the CLI's own sandbox works here (None:
  nothing to check). codex's sandbox (bubblewrap) needs user namespaces, which a CapDrop-ALL
  container under Docker's seccomp profile does not allow ("bwrap: No permissions to create a
  new namespace"; its legacy Landlock fallback refuses filesystem-restricted execution). Where
  it does not work, workspace-write runs codex with ``danger-full-access`` (the container is
  its sandbox), and read-only is a configuration error: it could not be enforced.

``parse`` returns a ``Result`` (status, output, error, failure, usage): ``failure`` is ``""``,
``"permission_denied"`` or ``"agent_error"``; ``usage`` is ``{"input_tokens", "output_tokens",
"cost_usd"}`` (tokens 0 and cost None when the agent does not say) or None.
"""

import json
import shlex
from collections import namedtuple

PERMISSIONS = ("read-only", "workspace-write", "full")
DEFAULT_PERMISSIONS = "workspace-write"
DEFAULT_GATEWAY_PORT = 8787
PLACEHOLDER_KEY = "corral-gateway"
"""the only key an agent ever holds: the supervisor's gateway drops it and injects the real one"""
FAILURES = ("auth_failed", "rate_limited", "upstream_error", "upstream_unreachable",
            "permission_denied", "stalled", "agent_error")
"""TaskResult.failure: why a task failed while its container stayed healthy"""
DROID_PROVIDERS = ("generic-chat-completion-api", "anthropic", "openai")
DROID_DEFAULT_MODEL = "gpt-5"
DROID_SETTINGS = ".corral/droid-settings.json"
"""droid's settings file, relative to the agent's home"""
ERROR_TAIL = 2000

Result = namedtuple("Result", "status output error failure usage")


class Setup(object):
    """How the agents are run in this container (see the module's docstring)."""

    __slots__ = ("permissions", "model", "gateway_port", "home", "path_dirs", "droid_provider",
                 "sandbox")

    def __init__(self, permissions=DEFAULT_PERMISSIONS, model="", gateway_port=None, home="",
                 path_dirs=(), droid_provider=DROID_PROVIDERS[0], sandbox=None):
        self.permissions = permissions
        self.model = model
        self.gateway_port = gateway_port
        """None: the model gateway is off"""
        self.home = home
        self.path_dirs = tuple(path_dirs)
        self.droid_provider = droid_provider
        self.sandbox = sandbox
        """whether the agent's own sandbox works here (``sandbox_check``); None: not checked"""

    @property
    def gateway(self):
        return self.gateway_port is not None

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.gateway_port

    def __repr__(self):
        return "Setup(%s)" % ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__)


# --- result parsers: the real output formats ---------------------------------------------------

def _json_lines(text):
    """Every JSON object printed on a line of its own, in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


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


def _int(v):
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _usage(input_tokens, output_tokens, cost_usd=None):
    """None when the agent reported nothing; tokens it does not report count 0, a cost it does
    not report is None."""
    if input_tokens is None and output_tokens is None and cost_usd is None:
        return None
    return {"input_tokens": input_tokens or 0, "output_tokens": output_tokens or 0,
            "cost_usd": cost_usd}


def _tail(text):
    text = text.strip()
    return text[-ERROR_TAIL:]


def _exited_ok(exit_code):
    """0, or None: the wrapper stopped the agent after its final result (it lingered)."""
    return exit_code is None or exit_code == 0


def _denials(obj):
    """claude's ``permission_denials``, as text (empty: none)."""
    denials = obj.get("permission_denials")
    if not isinstance(denials, list) or not denials:
        return ""
    shown = []
    for d in denials[:5]:
        if not isinstance(d, dict):
            shown.append(json.dumps(d)[:200])
            continue
        tool = d.get("tool_name") if isinstance(d.get("tool_name"), str) else "?"
        inp = d.get("tool_input")
        what = ""
        if isinstance(inp, dict):
            for key in ("command", "file_path", "path", "url", "pattern"):
                if isinstance(inp.get(key), str):
                    what = inp[key]
                    break
        shown.append("%s(%s)" % (tool, what[:200]) if what else tool)
    more = " and %d more" % (len(denials) - 5) if len(denials) > 5 else ""
    return ", ".join(shown) + more


def _result_json(exit_code, stdout, stderr, stderr_in_error):
    obj = _last_json_object(stdout)
    if not isinstance(obj, dict):
        err = (_tail(stderr) or _tail(stdout) or "no JSON result")
        return Result("error", "", "agent printed no JSON result (exit %s): %s" % (exit_code, err),
                      "agent_error", None)
    text = obj.get("result")
    if text is None:
        text = obj.get("message", "")
    text = text if isinstance(text, str) else json.dumps(text)
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    usage = _usage(_int(usage.get("input_tokens")), _int(usage.get("output_tokens")),
                   _number(obj.get("total_cost_usd")))
    # Real errors keep subtype "success" and say is_error: true (claude), or subtype "failure"
    # (droid): is_error and the exit code decide, never the subtype.
    if obj.get("is_error") or not _exited_ok(exit_code):
        error = text or _tail(stderr) or "exit %s" % exit_code
        if stderr_in_error and stderr.strip() and error != _tail(stderr):
            error = "%s; stderr: %s" % (error, _tail(stderr))
        return Result("error", text, error, "agent_error", usage)
    denied = _denials(obj)
    if denied:
        # claude exits 0 with is_error false when it was refused the tools it asked for
        return Result("error", text, "permission denied: " + denied, "permission_denied", usage)
    return Result("ok", text, "", "", usage)


def parse_claude(exit_code, stdout, stderr):
    """claude -p --output-format json: one result object."""
    return _result_json(exit_code, stdout, stderr, False)


def parse_droid(exit_code, stdout, stderr):
    """droid exec -o json: one result object; its errors say only "Exec failed", so the error
    keeps the tail of its stderr."""
    return _result_json(exit_code, stdout, stderr, True)


parse_result_json = parse_claude


def parse_codex_jsonl(exit_code, stdout, stderr):
    """codex exec --json: JSON Lines events; the answer is the last agent_message. Top-level
    ``error`` events are transient (its retries say "Reconnecting... n/5"): only ``turn.failed``
    or a non-zero exit is a failure."""
    answer, failed, last_error = "", None, ""
    tin = tout = None
    for ev in _json_lines(stdout):
        t = ev.get("type")
        item = ev.get("item")
        if t == "item.completed" and isinstance(item, dict) and item.get("type") == "agent_message":
            answer = item.get("text", "")
            answer = answer if isinstance(answer, str) else json.dumps(answer)
        elif t == "turn.failed":
            err = ev.get("error")
            msg = err.get("message") if isinstance(err, dict) else None
            failed = msg if isinstance(msg, str) and msg else "turn failed"
        elif t == "error":
            msg = ev.get("message")
            last_error = msg if isinstance(msg, str) else json.dumps(msg)
        elif t == "turn.completed" and isinstance(ev.get("usage"), dict):
            u = ev["usage"]
            i, o = _int(u.get("input_tokens")), _int(u.get("output_tokens"))
            if i is not None:
                tin = (tin or 0) + i
            if o is not None:
                tout = (tout or 0) + o
    usage = _usage(tin, tout)
    if failed is None and _exited_ok(exit_code):
        return Result("ok", answer, "", "", usage)
    error = failed or last_error or _tail(stderr) or "exit %s" % exit_code
    return Result("error", answer, error, "agent_error", usage)


def parse_text(exit_code, stdout, stderr):
    """shell: the output is what the command printed."""
    if exit_code == 0:
        return Result("ok", stdout, "", "", None)
    return Result("error", stdout, _tail(stderr) or "exit %s" % exit_code, "agent_error", None)


def _is_result(ev):
    return ev.get("type") == "result"


def _is_turn_end(ev):
    return ev.get("type") in ("turn.completed", "turn.failed")


# --- command lines -------------------------------------------------------------------------------
# The flags of ``options(setup)`` go before the task's own args, and the prompt last where the CLI
# takes it last. Long prompts: claude and codex read them on stdin (``-p`` without a prompt,
# ``exec -``); droid from a file (``-f``). Otherwise the agent's stdin is /dev/null: codex with an
# open stdin waits for its end, claude waits 3 s for it.

def _claude_cmd(prompt, args, indirect, setup=None):
    opts = _claude_options(setup) if setup is not None else []
    if indirect is None:
        return ["claude", "-p", prompt, "--output-format", "json"] + opts + args
    return ["claude", "-p", "--output-format", "json"] + opts + args      # the prompt on stdin


def _droid_cmd(prompt, args, indirect, setup=None):
    opts = _droid_options(setup) if setup is not None else []
    if indirect is None:
        return ["droid", "exec", "-o", "json"] + opts + args + [prompt]
    return ["droid", "exec", "-o", "json"] + opts + args + ["-f", indirect]


def _codex_cmd(prompt, args, indirect, setup=None):
    opts = _codex_options(setup) if setup is not None else []
    if indirect is None:
        return ["codex", "exec", "--json"] + opts + args + [prompt]
    return ["codex", "exec", "--json"] + opts + args + ["-"]            # the prompt on stdin


def _shell_cmd(prompt, args, indirect, setup=None):
    # the script in a file keeps the args the positional parameters, as with sh -c PROMPT ARGS
    if indirect is None:
        return ["/bin/sh", "-c", prompt] + args
    return ["/bin/sh", "-c", ". " + shlex.quote(indirect)] + args


# --- how each agent is run: flags, environment, files ----------------------------------------------

CLAUDE_PERMISSION_MODES = {"read-only": "dontAsk", "workspace-write": "acceptEdits",
                           "full": "bypassPermissions"}
"""dontAsk denies every tool that needs a permission (reading is allowed); acceptEdits lets it
edit files and run file-system commands; bypassPermissions allows everything (refused as root
unless IS_SANDBOX=1; workers run as uid 1000)"""
CODEX_SANDBOXES = {"read-only": "read-only", "workspace-write": "workspace-write",
                   "full": "danger-full-access"}
DROID_AUTONOMY = {"read-only": [], "workspace-write": ["--auto", "low"],
                  "full": ["--skip-permissions-unsafe"]}
"""droid's default is read-only; --auto low: file creation and edits, no system changes"""


def _claude_options(setup):
    opts = ["--permission-mode", CLAUDE_PERMISSION_MODES[setup.permissions]]
    if setup.model:
        opts += ["--model", setup.model]
    return opts


def _claude_env(setup):
    env = {"ANTHROPIC_BASE_URL": setup.base_url, "ANTHROPIC_API_KEY": PLACEHOLDER_KEY,
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
           # the gateway reports upstream failures at once: no retries of its own
           "CLAUDE_CODE_MAX_RETRIES": "0"}
    if setup.permissions == "full":
        env["IS_SANDBOX"] = "1"     # the container is the sandbox (bypassPermissions as root)
    return env


def _codex_provider(setup):
    return ('{name="corral",base_url="%s/v1",env_key="OPENAI_API_KEY",wire_api="responses",'
            'request_max_retries=0,stream_max_retries=0}' % setup.base_url)


def _codex_options(setup):
    # a non-git /workspace fails every task without --skip-git-repo-check; analytics on makes it
    # wait for its telemetry to time out; plugins on make it call github.com and chatgpt.com
    opts = ["--skip-git-repo-check", "-c", "analytics.enabled=false", "-c", "features.plugins=false"]
    if setup.gateway:
        opts += ["-c", "model_provider=corral", "-c", "model_providers.corral=" + _codex_provider(setup)]
    if setup.model:
        opts += ["-m", setup.model]
    sandbox = CODEX_SANDBOXES[setup.permissions]
    if setup.sandbox is False:
        sandbox = "danger-full-access"      # its sandbox cannot work here: the container is it
    return opts + ["--sandbox", sandbox]


def _codex_sandbox_check(setup):
    if setup.permissions == "full":
        return None
    return ["codex", "sandbox", "-c", "sandbox_mode=" + CODEX_SANDBOXES[setup.permissions], "--",
            "true"]


def _codex_env(setup):
    return {"OPENAI_API_KEY": PLACEHOLDER_KEY}


def _droid_options(setup):
    opts = []
    if setup.gateway:
        opts += ["--settings", _join(setup.home, DROID_SETTINGS), "-m", "custom:corral-0"]
    elif setup.model:
        opts += ["-m", setup.model]
    return opts + DROID_AUTONOMY[setup.permissions]


def _droid_env(setup):
    # without it droid asks api.factory.ai and telemetry.factory.ai, and exits 5 s late
    return {"FACTORY_AIRGAP_ENABLED": "1"}


def _droid_files(setup):
    """A BYOK custom model pointing at the gateway; its id is custom:<displayName>-<index>."""
    base = setup.base_url if setup.droid_provider == "anthropic" else setup.base_url + "/v1"
    model = {"model": setup.model or DROID_DEFAULT_MODEL, "displayName": "corral", "baseUrl": base,
             "apiKey": PLACEHOLDER_KEY, "provider": setup.droid_provider}
    data = json.dumps({"customModels": [model]}, indent=2) + "\n"
    return [(DROID_SETTINGS, data.encode("utf-8"))]


def _join(home, rel):
    return home.rstrip("/") + "/" + rel if home else rel


def _none(setup):
    return []


def _no_check(setup):
    return None


def _no_env(setup):
    return {}


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
                 "output_format", "stub_version", "options", "env", "files", "path_hints", "final",
                 "sandbox_check")

    def __init__(self, name, cli, probe, command, prompt_in, indirect, prompt_suffix, parse,
                 output_format, stub_version, options=_none, env=_no_env, files=_none, path_hints=(),
                 final=None, sandbox_check=_no_check):
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
        self.options = options
        self.env = env
        self.files = files
        self.path_hints = path_hints
        self.final = final
        self.sandbox_check = sandbox_check

    @property
    def stubbable(self):
        return self.stub_version is not None

    def __repr__(self):
        return "Agent(%r, cli=%r)" % (self.name, self.cli)


AGENTS = {a.name: a for a in (
    Agent("claude", "claude", ["claude", "--version"], _claude_cmd, _claude_prompt, "stdin", ".txt",
          parse_claude, "claude_json", "2.0.0 (Claude Code) [corral stub]",
          options=_claude_options, env=_claude_env, final=_is_result),
    Agent("factory", "droid", ["droid", "--version"], _droid_cmd, _droid_prompt, "file", ".txt",
          parse_droid, "droid_json", "0.22.0 [corral stub]",
          options=_droid_options, env=_droid_env, files=_droid_files, final=_is_result),
    Agent("codex", "codex", ["codex", "--version"], _codex_cmd, _codex_prompt, "stdin", ".txt",
          parse_codex_jsonl, "codex_jsonl", "codex-cli 0.50.0 [corral stub]",
          options=_codex_options, env=_codex_env, path_hints=("../codex-path",), final=_is_turn_end,
          sandbox_check=_codex_sandbox_check),
    Agent("shell", "sh", ["/bin/sh", "-c", "echo sh"], _shell_cmd, _shell_prompt, "file", ".sh",
          parse_text, "text", None),
)}

BY_CLI = {a.cli: a for a in AGENTS.values()}
