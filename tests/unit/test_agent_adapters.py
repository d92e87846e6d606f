"""The agent adapters (runtime/wrapper/agents.py) and how the wrapper's core uses them: each real
CLI's flags, environment and files per permission level and gateway, and the result parsers on
the outputs the real CLIs print (docs/real-agents.md; captured from claude 2.1.332, codex
0.171.0 and droid 0.225.2 against tests/mock_model_api.py). Each row marked "misreport" was
misread by the adapters before issue 11 (and the old stub's claude error had another subtype)."""

import json

import pytest

from runtime.wrapper import agents as table
from runtime.wrapper import core as c
from runtime.wrapper.stub_agent import render, stub_plan

from .test_wrapper_core import Clock, frames

PORT = 8787
BASE = f"http://127.0.0.1:{PORT}"
KEY = table.PLACEHOLDER_KEY


def setup(permissions="workspace-write", model="", gateway=True, home="/home/worker",
          path_dirs=(), provider="generic-chat-completion-api"):
    return table.Setup(permissions=permissions, model=model, gateway_port=PORT if gateway else None,
                       home=home, path_dirs=path_dirs, droid_provider=provider)


# --- command lines, environments and files ---------------------------------------------------------

CODEX_BASE = ["--skip-git-repo-check", "-c", "analytics.enabled=false", "-c", "features.plugins=false"]
CODEX_GATEWAY = ["-c", "model_provider=corral", "-c",
                 'model_providers.corral={name="corral",base_url="http://127.0.0.1:8787/v1",'
                 'env_key="OPENAI_API_KEY",wire_api="responses",request_max_retries=0,'
                 'stream_max_retries=0}']
DROID_GATEWAY = ["--settings", "/home/worker/.corral/droid-settings.json", "-m", "custom:corral-0"]


@pytest.mark.parametrize("agent,permissions,model,argv", [
    ("claude", "read-only", "", ["claude", "-p", "P", "--output-format", "json",
                                 "--permission-mode", "dontAsk"]),
    ("claude", "workspace-write", "", ["claude", "-p", "P", "--output-format", "json",
                                       "--permission-mode", "acceptEdits"]),
    ("claude", "full", "opus", ["claude", "-p", "P", "--output-format", "json",
                                "--permission-mode", "bypassPermissions", "--model", "opus"]),
    ("codex", "read-only", "", ["codex", "exec", "--json", *CODEX_BASE, *CODEX_GATEWAY,
                                "--sandbox", "read-only", "P"]),
    ("codex", "workspace-write", "gpt-5", ["codex", "exec", "--json", *CODEX_BASE, *CODEX_GATEWAY,
                                           "-m", "gpt-5", "--sandbox", "workspace-write", "P"]),
    ("codex", "full", "", ["codex", "exec", "--json", *CODEX_BASE, *CODEX_GATEWAY,
                           "--sandbox", "danger-full-access", "P"]),
    ("factory", "read-only", "", ["droid", "exec", "-o", "json", *DROID_GATEWAY, "P"]),
    ("factory", "workspace-write", "m", ["droid", "exec", "-o", "json", *DROID_GATEWAY,
                                         "--auto", "low", "P"]),
    ("factory", "full", "", ["droid", "exec", "-o", "json", *DROID_GATEWAY,
                             "--skip-permissions-unsafe", "P"]),
    ("shell", "full", "m", ["/bin/sh", "-c", "P"]),
])
def test_command_line_per_permission_level_with_the_gateway(agent, permissions, model, argv):
    a = table.AGENTS[agent]
    assert a.command("P", [], None, setup(permissions, model)) == argv
    # the task's own args come after corral's flags, the prompt stays where the CLI takes it
    with_args = a.command("P", ["--x", "1"], None, setup(permissions, model))
    assert with_args[:len(argv) - 1] == argv[:-1] or agent == "claude"
    assert a.prompt_in(with_args[1:]) == ("argv", "P")


@pytest.mark.parametrize("agent,argv", [
    ("claude", ["claude", "-p", "P", "--output-format", "json", "--permission-mode", "acceptEdits",
                "--model", "m"]),
    ("codex", ["codex", "exec", "--json", *CODEX_BASE, "-m", "m", "--sandbox", "workspace-write",
               "P"]),
    ("factory", ["droid", "exec", "-o", "json", "-m", "m", "--auto", "low", "P"]),
])
def test_without_the_gateway_no_provider_and_no_settings(agent, argv):
    assert table.AGENTS[agent].command("P", [], None, setup(model="m", gateway=False)) == argv
    assert "corral" not in " ".join(argv)


@pytest.mark.parametrize("agent,env", [
    ("claude", {"ANTHROPIC_BASE_URL": BASE, "ANTHROPIC_API_KEY": KEY,
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
                "CLAUDE_CODE_MAX_RETRIES": "0"}),
    ("codex", {"OPENAI_API_KEY": KEY}),
    ("factory", {"FACTORY_AIRGAP_ENABLED": "1"}),
    ("shell", {}),
])
def test_gateway_environment_holds_only_a_placeholder_key(agent, env):
    a = table.AGENTS[agent]
    assert a.env(setup()) == env
    assert a.env(setup("read-only")) == env
    if agent == "claude":       # bypassPermissions: the container is the sandbox (also as root)
        assert a.env(setup("full")) == {**env, "IS_SANDBOX": "1"}


@pytest.mark.parametrize("provider,base", [
    ("generic-chat-completion-api", BASE + "/v1"),
    ("openai", BASE + "/v1"),
    ("anthropic", BASE),        # droid adds /v1/messages itself
])
def test_droid_settings_point_a_byok_model_at_the_gateway(provider, base):
    (rel, data), = table.AGENTS["factory"].files(setup(model="mock-model", provider=provider))
    assert rel == table.DROID_SETTINGS
    assert json.loads(data) == {"customModels": [{
        "model": "mock-model", "displayName": "corral", "baseUrl": base, "apiKey": KEY,
        "provider": provider}]}
    (_, data), = table.AGENTS["factory"].files(setup(provider=provider))
    assert json.loads(data)["customModels"][0]["model"] == table.DROID_DEFAULT_MODEL
    assert table.AGENTS["claude"].files(setup()) == [] == table.AGENTS["codex"].files(setup())


# --- the core: setup from the environment, env and argv of the agent --------------------------------

ENV = {"CORRAL_WORKER_ID": "w-1", "CORRAL_HEARTBEAT_S": "1", "CORRAL_WORKSPACE": "/ws",
       "HOME": "/home/worker", "PATH": "/usr/bin:/bin"}


def of(actions, cls):
    return [a for a in actions if isinstance(a, cls)]


def ready_core(agent, home="/home/worker", path_dirs=(), port=PORT, **env):
    """A core with the gateway on, made ready: -> (core, every action of its startup)."""
    core = c.WrapperCore({**ENV, "CORRAL_AGENT": agent, "CORRAL_GATEWAY": "1", **env}, clock=Clock())
    acts = core.handle(c.Boot())
    acts += core.handle(c.WorkspaceChecked(None))
    acts += core.handle(c.GatewayStarted(port))
    acts += core.handle(c.AgentPrepared(home, tuple(path_dirs)))
    while core.state != "serving":          # codex: its sandbox check, then the version probe
        acts += core.handle(c.ProbeDone(0, b"1.0\n"))
    assert [f["kind"] for f in frames(acts)] == ["ready"]
    return core, acts


def test_startup_with_the_gateway_serves_it_prepares_the_agent_then_probes_with_its_env():
    core, acts = ready_core("factory", CORRAL_MODEL="mock-model", CORRAL_PERMISSIONS="full")
    assert of(acts, c.StartGateway) == [c.StartGateway(PORT)]
    (prep,) = of(acts, c.PrepareAgent)
    assert (prep.cli, prep.home, prep.path) == ("droid", "/home/worker", "/usr/bin:/bin")
    assert [rel for rel, _ in prep.files] == [table.DROID_SETTINGS]
    assert json.loads(prep.files[0][1])["customModels"][0]["model"] == "mock-model"
    (probe,) = of(acts, c.RunProbe)
    assert probe.argv == ["droid", "--version"] and probe.env["FACTORY_AIRGAP_ENABLED"] == "1"
    (start,) = of(core.handle(c.StdinData(b'{"kind":"run_task","task_id":"t","prompt":"hi"}\n')),
                  c.StartAgent)
    assert start.argv == ["droid", "exec", "-o", "json", *DROID_GATEWAY, "--skip-permissions-unsafe",
                          "hi"]
    assert start.env == {**ENV, "CORRAL_AGENT": "factory", "CORRAL_GATEWAY": "1",
                         "CORRAL_MODEL": "mock-model", "CORRAL_PERMISSIONS": "full",
                         "FACTORY_AIRGAP_ENABLED": "1"}
    assert start.stdin is None       # /dev/null: codex waits for an open stdin's end, claude 3 s


def test_the_bound_port_a_fallback_home_and_path_dirs_reach_the_agent():
    core, acts = ready_core("codex", home="/tmp/corral-home-x", path_dirs=["/opt/codex/codex-path"],
                            port=40123, CORRAL_GATEWAY_PORT="0")
    assert of(acts, c.StartGateway) == [c.StartGateway(0)]
    (prep,) = of(acts, c.PrepareAgent)
    assert prep.path_hints == ("../codex-path",) and prep.files == ()
    (start,) = of(core.handle(c.StdinData(b'{"kind":"run_task","task_id":"t","prompt":"hi"}\n')),
                  c.StartAgent)
    assert start.env["HOME"] == "/tmp/corral-home-x"
    assert start.env["PATH"] == "/opt/codex/codex-path:/usr/bin:/bin"
    assert start.env["OPENAI_API_KEY"] == KEY
    assert 'base_url="http://127.0.0.1:40123/v1"' in " ".join(start.argv)


BWRAP = (b"bwrap: No permissions to create a new namespace, likely because the kernel does not "
         b"allow non-privileged user namespaces.\n")


@pytest.mark.parametrize("permissions,works,sandbox", [
    ("workspace-write", True, "workspace-write"),
    ("workspace-write", False, "danger-full-access"),     # the container is its sandbox
    ("read-only", True, "read-only"),
])
def test_codex_s_own_sandbox_is_checked_and_used_where_it_works(permissions, works, sandbox):
    core = c.WrapperCore({**ENV, "CORRAL_AGENT": "codex", "CORRAL_GATEWAY": "1",
                          "CORRAL_PERMISSIONS": permissions}, clock=Clock())
    for ev in (c.Boot(), c.WorkspaceChecked(None), c.GatewayStarted(PORT)):
        core.handle(ev)
    (check,) = of(core.handle(c.AgentPrepared("/home/worker", ())), c.RunProbe)
    assert check.argv == ["codex", "sandbox", "-c", "sandbox_mode=" + permissions, "--", "true"]
    assert check.env["HOME"] == "/home/worker" and check.cwd == "/ws"
    acts = core.handle(c.ProbeDone(0 if works else 1, b"", b"" if works else BWRAP))
    assert of(acts, c.RunProbe)[0].argv == ["codex", "--version"]
    if not works:
        assert c.Log("codex's sandbox does not work here (exit 1: bwrap: No permissions to create a "
                     "new namespace, likely because the kernel does not allow non-privileged user "
                     "namespaces.): it runs without it, the container is its sandbox") in acts
    core.handle(c.ProbeDone(0, b"codex-cli 0.171.0\n"))
    (start,) = of(core.handle(c.StdinData(b'{"kind":"run_task","task_id":"t","prompt":"hi"}\n')),
                  c.StartAgent)
    assert start.argv[-3:] == ["--sandbox", sandbox, "hi"]


def test_codex_read_only_where_its_sandbox_cannot_work_is_a_configuration_error():
    core = c.WrapperCore({**ENV, "CORRAL_AGENT": "codex", "CORRAL_GATEWAY": "1",
                          "CORRAL_PERMISSIONS": "read-only"}, clock=Clock())
    for ev in (c.Boot(), c.WorkspaceChecked(None), c.GatewayStarted(PORT), c.AgentPrepared("/h", ())):
        core.handle(ev)
    acts = core.handle(c.ProbeDone(1, b"", BWRAP))
    assert frames(acts) == [{"kind": "fatal", "reason": (
        "CORRAL_PERMISSIONS=read-only cannot be enforced: codex's sandbox does not work here (exit 1: "
        "bwrap: No permissions to create a new namespace, likely because the kernel does not allow "
        "non-privileged user namespaces.)")}]
    assert acts[-1] == c.Exit(78)


def test_full_permissions_check_no_sandbox():
    core, acts = ready_core("codex", CORRAL_PERMISSIONS="full")
    assert [p.argv for p in of(acts, c.RunProbe)] == [["codex", "--version"]]


@pytest.mark.parametrize("env,events,reason", [
    ({"CORRAL_PERMISSIONS": "admin"}, [],
     "CORRAL_PERMISSIONS must be one of read-only, workspace-write, full, not 'admin'"),
    ({"CORRAL_GATEWAY": "maybe"}, [], "CORRAL_GATEWAY must be 1 or 0, not 'maybe'"),
    ({"CORRAL_GATEWAY": "1", "CORRAL_GATEWAY_PORT": "http"}, [],
     "CORRAL_GATEWAY_PORT must be a port number (0 to 65535), not 'http'"),
    ({"CORRAL_GATEWAY": "1", "CORRAL_GATEWAY_PORT": "70000"}, [],
     "CORRAL_GATEWAY_PORT must be a port number (0 to 65535), not '70000'"),
    ({"CORRAL_DROID_PROVIDER": "bedrock"}, [],
     "CORRAL_DROID_PROVIDER must be one of generic-chat-completion-api, anthropic, openai, not 'bedrock'"),
    ({"CORRAL_GATEWAY": "1"}, [c.WorkspaceChecked(None), c.GatewayStarted(0, "Address already in use")],
     "cannot serve the model gateway on 127.0.0.1:8787: Address already in use"),
    ({"CORRAL_GATEWAY": "1"}, [c.WorkspaceChecked(None), c.GatewayStarted(PORT),
                               c.AgentPrepared(error="HOME '/home/worker' is not writable, and no "
                                                     "temporary directory is (/tmp)")],
     "cannot prepare the agent's home: HOME '/home/worker' is not writable, and no temporary "
     "directory is (/tmp)"),
])
def test_a_bad_setup_is_a_configuration_error(env, events, reason):
    core = c.WrapperCore({**ENV, "CORRAL_AGENT": "claude", **env}, clock=Clock())
    acts = core.handle(c.Boot())
    for ev in events:
        acts = core.handle(ev)
    assert frames(acts) == [{"kind": "fatal", "reason": reason}]
    assert acts[-1] == c.Exit(78)


# --- result parsers: the real outputs --------------------------------------------------------------

def claude_result(**fields):
    """Real claude 2.1.332's result object (trimmed of keys no adapter reads)."""
    obj = {"type": "result", "subtype": "success", "is_error": False, "api_error_status": None,
           "duration_ms": 238, "duration_api_ms": 55, "num_turns": 1,
           "result": "MOCK-ANSWER: the mock model says hello", "stop_reason": "end_turn",
           "session_id": "3035871a", "total_cost_usd": 0.00018399999999999997,
           "usage": {"input_tokens": 11, "cache_creation_input_tokens": 0,
                     "cache_read_input_tokens": 0, "output_tokens": 7,
                     "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
                     "service_tier": "standard"},
           "modelUsage": {}, "permission_denials": [], "terminal_reason": "completed", "uuid": "d8b9"}
    obj.update(fields)
    return json.dumps(obj) + "\n"


CLAUDE_401 = claude_result(
    is_error=True, api_error_status=401, terminal_reason="api_error", total_cost_usd=0,
    result="Failed to authenticate. API Error: 401 mock 401", stop_reason="stop_sequence",
    usage={"input_tokens": 0, "output_tokens": 0})
CLAUDE_DENIED = claude_result(num_turns=2, total_cost_usd=0.000368,
                              usage={"input_tokens": 22, "output_tokens": 14},
                              permission_denials=[{"tool_name": "Bash", "tool_use_id": "toolu_mock",
                                                   "tool_input": {"command": "touch corral-probe.txt",
                                                                  "description": "x"}}])
CODEX_OK = (
    '{"type":"thread.started","thread_id":"01a2"}\n'
    '{"type":"item.completed","item":{"id":"item_0","type":"error","message":"Model metadata for '
    '`mock-model` not found. Defaulting to fallback metadata; this can degrade performance and '
    'cause issues."}}\n'
    '{"type":"turn.started"}\n'
    '{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"MOCK-ANSWER: the '
    'mock model says hello"}}\n'
    '{"type":"turn.completed","usage":{"input_tokens":11,"cached_input_tokens":0,'
    '"cache_write_input_tokens":0,"output_tokens":7,"reasoning_output_tokens":0}}\n')
CODEX_RETRIED_OK = (
    '{"type":"thread.started","thread_id":"01a2"}\n{"type":"turn.started"}\n'
    '{"type":"error","message":"Reconnecting... 1/5 (stream disconnected before completion)"}\n'
    '{"type":"error","message":"Reconnecting... 2/5 (stream disconnected before completion)"}\n'
    '{"type":"item.completed","item":{"id":"item_1","type":"agent_message","text":"done"}}\n'
    '{"type":"turn.completed","usage":{"input_tokens":30,"cached_input_tokens":0,"output_tokens":2}}\n')
CODEX_401 = (
    '{"type":"thread.started","thread_id":"01a2"}\n{"type":"turn.started"}\n'
    '{"type":"error","message":"unexpected status 401 Unauthorized: mock 401, url: '
    'http://127.0.0.1:41607/v1/responses"}\n'
    '{"type":"turn.failed","error":{"message":"unexpected status 401 Unauthorized: mock 401, url: '
    'http://127.0.0.1:41607/v1/responses"}}\n')
DROID_OK = ('{"type":"result","subtype":"success","is_error":false,"duration_ms":265,"num_turns":1,'
            '"result":"MOCK-ANSWER: the mock model says hello","session_id":"6ee3","usage":'
            '{"input_tokens":11,"output_tokens":7,"cache_read_input_tokens":0,'
            '"cache_creation_input_tokens":0,"factory_credits":0,"ttft_ms":16}}\n')
DROID_FAILED = ('{"type":"result","subtype":"failure","is_error":true,"duration_ms":359,"num_turns":0,'
                '"result":"Exec failed","session_id":"67d4","usage":{"input_tokens":0,'
                '"output_tokens":0,"cache_read_input_tokens":0,"cache_creation_input_tokens":0,'
                '"factory_credits":0}}\n')
ANSWER = "MOCK-ANSWER: the mock model says hello"


@pytest.mark.parametrize("agent,code,stdout,stderr,expected", [
    ("claude", 0, claude_result(), "",
     ("ok", ANSWER, "", "", {"input_tokens": 11, "output_tokens": 7, "cost_usd": 0.00018399999999999997})),
    # real errors keep subtype "success" and say is_error (the stub used another subtype: see
    # test_stub_result_objects_have_the_real_keys_and_types)
    ("claude", 1, CLAUDE_401, "",
     ("error", "Failed to authenticate. API Error: 401 mock 401",
      "Failed to authenticate. API Error: 401 mock 401", "agent_error",
      {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0})),
    # misreport: exit 0, is_error false, but the tools it asked for were refused
    ("claude", 0, CLAUDE_DENIED, "",
     ("error", ANSWER, "permission denied: Bash(touch corral-probe.txt)", "permission_denied",
      {"input_tokens": 22, "output_tokens": 14, "cost_usd": 0.000368})),
    ("claude", 1, "", "Not logged in · Please run /login\n",
     ("error", "", "agent printed no JSON result (exit 1): Not logged in · Please run /login",
      "agent_error", None)),
    ("codex", 0, CODEX_OK, "Reading additional input from stdin...\n",
     ("ok", ANSWER, "", "", {"input_tokens": 11, "output_tokens": 7, "cost_usd": None})),
    # misreport: top-level error events are its transient retries; it succeeded
    ("codex", 0, CODEX_RETRIED_OK, "",
     ("ok", "done", "", "", {"input_tokens": 30, "output_tokens": 2, "cost_usd": None})),
    ("codex", 1, CODEX_401, "",
     ("error", "", "unexpected status 401 Unauthorized: mock 401, url: "
                   "http://127.0.0.1:41607/v1/responses", "agent_error", None)),
    ("codex", 1, '{"type":"error","message":"Reconnecting... 5/5"}\n', "boom\n",
     ("error", "", "Reconnecting... 5/5", "agent_error", None)),
    ("codex", 101, "", "thread 'main' panicked\n",
     ("error", "", "thread 'main' panicked", "agent_error", None)),
    ("factory", 0, DROID_OK, "",
     ("ok", ANSWER, "", "", {"input_tokens": 11, "output_tokens": 7, "cost_usd": None})),
    # misreport: droid's errors say only "Exec failed": its stderr is kept
    ("factory", 1, DROID_FAILED, "Error: 401 Unauthorized from the custom model\n",
     ("error", "Exec failed", "Exec failed; stderr: Error: 401 Unauthorized from the custom model",
      "agent_error", {"input_tokens": 0, "output_tokens": 0, "cost_usd": None})),
    ("factory", 1, DROID_FAILED, "", ("error", "Exec failed", "Exec failed", "agent_error",
                                      {"input_tokens": 0, "output_tokens": 0, "cost_usd": None})),
    # stopped by the wrapper after its final result (exit code None): the result decides
    ("factory", None, DROID_OK, "", ("ok", ANSWER, "", "", {"input_tokens": 11, "output_tokens": 7,
                                                            "cost_usd": None})),
    ("factory", None, DROID_FAILED, "", ("error", "Exec failed", "Exec failed", "agent_error",
                                         {"input_tokens": 0, "output_tokens": 0, "cost_usd": None})),
    ("codex", None, CODEX_401, "", ("error", "", "unexpected status 401 Unauthorized: mock 401, url: "
                                                 "http://127.0.0.1:41607/v1/responses", "agent_error", None)),
    ("shell", 2, "out", "bad\n", ("error", "out", "bad", "agent_error", None)),
])
def test_parsers_read_the_real_outputs(agent, code, stdout, stderr, expected):
    assert tuple(table.AGENTS[agent].parse(code, stdout, stderr)) == expected


@pytest.mark.parametrize("agent,stdout,final", [
    ("claude", claude_result(), True),
    ("factory", DROID_OK, True),
    ("codex", CODEX_OK, True),
    ("codex", CODEX_401, True),
    ("codex", CODEX_RETRIED_OK.split('{"type":"item')[0], False),
])
def test_the_final_result_is_recognised(agent, stdout, final):
    a = table.AGENTS[agent]
    assert any(a.final(json.loads(line)) for line in stdout.splitlines()) == final


# --- the stubs print the real shapes ----------------------------------------------------------------

def shape(v):
    if isinstance(v, dict):
        return {k: shape(x) for k, x in v.items()}
    if isinstance(v, bool) or v is None:
        return type(v).__name__
    if isinstance(v, (int, float)):
        return "number"
    return type(v).__name__


@pytest.mark.parametrize("fmt,real,is_error", [
    ("claude_json", claude_result(), False),
    ("claude_json", CLAUDE_401, True),
    ("droid_json", DROID_OK, False),
    ("droid_json", DROID_FAILED, True),
])
def test_stub_result_objects_have_the_real_keys_and_types(fmt, real, is_error):
    real = json.loads(real)
    stub = json.loads(render(fmt, "text", is_error)[0])
    for key in ("type", "subtype", "is_error", "result", "num_turns", "session_id", "duration_ms"):
        assert shape(stub[key]) == shape(real[key]), key
    assert {"input_tokens", "output_tokens"} <= set(stub["usage"]) & set(real["usage"])
    assert stub["subtype"] == real["subtype"] and stub["is_error"] == real["is_error"]
    if fmt == "claude_json":
        for key in ("permission_denials", "total_cost_usd", "api_error_status", "terminal_reason"):
            assert key in stub
    if fmt == "droid_json" and is_error:
        assert stub["result"] == "Exec failed"


def test_stub_codex_events_are_the_real_ones():
    def types(text):
        return [(e["type"], e.get("item", {}).get("type")) for e in map(json.loads, text.splitlines())]
    ok = render("codex_jsonl", "hi", False)[0].decode()
    assert types(ok) == [t for t in types(CODEX_OK) if t != ("item.completed", "error")]
    failed = render("codex_jsonl", "boom", True)[0].decode()
    assert types(failed) == types(CODEX_401)
    real_usage = json.loads(CODEX_OK.splitlines()[-1])["usage"]
    assert set(json.loads(ok.splitlines()[-1])["usage"]) == set(real_usage)


@pytest.mark.parametrize("agent", ["claude", "factory", "codex"])
def test_stub_errors_are_parsed_as_the_real_ones(agent):
    a = table.AGENTS[agent]
    plan = stub_plan(a.cli, a.command("!exit 3", [], None, setup())[1:], {})
    result = a.parse(plan.exit_code, plan.stdout.decode(), plan.stderr.decode())
    assert (result.status, result.failure) == ("error", "agent_error")
    assert "exiting with 3" in result.error     # droid: from its stderr, as the real one's cause


# --- the core: early result, cancel with a reason, task_done's failure and usage --------------------

class W:
    def __init__(self, agent):
        self.core = c.WrapperCore({**ENV, "CORRAL_AGENT": agent}, clock=Clock())
        self.core.handle(c.Boot())
        self.core.handle(c.WorkspaceChecked(None))
        self.core.handle(c.ProbeDone(0, b"1\n"))

    def __call__(self, ev):
        return self.core.handle(ev)

    def start(self, prompt="hi"):
        self(c.StdinData(json.dumps({"kind": "run_task", "task_id": "t", "prompt": prompt}).encode() + b"\n"))
        self(c.AgentStarted("t", 42))


def done(actions):
    """The task_done among ``actions`` (frames() decoded it as the actor does: failure, usage)."""
    (d,) = [f for f in frames(actions) if f["kind"] == "task_done"]
    return d


def test_a_cli_that_lingers_after_its_result_is_stopped_and_answered_from_it():
    """droid printed its result at +1 s and exited at +6 s: the task is answered at +1.5 s."""
    w = W("factory")
    w.start()
    acts = w(c.AgentOutput("t", "stdout", DROID_OK.encode()[:40]))
    assert not of(acts, c.StartTimer)
    acts = w(c.AgentOutput("t", "stdout", DROID_OK.encode()[40:]))
    assert c.StartTimer("linger", c.RESULT_LINGER_S) in acts
    acts = w(c.TimerFired("linger"))
    assert of(acts, c.KillAgent) == [c.KillAgent("t")]
    acts = w(c.AgentExited("t", -9))
    acts += w(c.AgentOutput("t", "stdout", b""))
    acts += w(c.AgentOutput("t", "stderr", b""))
    assert c.Cleanup("t") in acts
    d = done(w(c.CleanupDone("t")))
    assert (d["status"], d["exit_code"], d["output"], d["failure"]) == ("ok", None, ANSWER, "")
    assert d["usage"] == {"input_tokens": 11, "output_tokens": 7, "cost_usd": None}


def test_a_cli_that_exits_right_after_its_result_keeps_its_exit_code():
    w = W("claude")
    w.start()
    w(c.AgentOutput("t", "stdout", CLAUDE_DENIED.encode()))
    w(c.AgentOutput("t", "stdout", b""))
    w(c.AgentOutput("t", "stderr", b""))
    acts = w(c.AgentExited("t", 0))
    assert c.CancelTimer("linger") in acts and c.Cleanup("t") in acts
    d = done(w(c.CleanupDone("t")))
    assert (d["status"], d["exit_code"], d["failure"]) == ("error", 0, "permission_denied")
    assert d["error"] == "permission denied: Bash(touch corral-probe.txt)"
    assert d["usage"] == {"input_tokens": 22, "output_tokens": 14, "cost_usd": 0.000368}


def test_a_huge_line_is_not_taken_for_a_result():
    w = W("claude")
    w.start()
    acts = w(c.AgentOutput("t", "stdout", b'{"type":"result"' + b" " * (c.STDOUT_TAIL + 10)))
    acts += w(c.AgentOutput("t", "stdout", b'}\n{"type":"progress"}\n'))
    assert not of(acts, c.StartTimer)


@pytest.mark.parametrize("reason,status,failure,error", [
    ("stalled", "error", "stalled", "stopped by the supervisor: stalled"),
    ("auth_failed", "error", "auth_failed", "stopped by the supervisor: auth_failed"),
    ("upstream_unreachable", "error", "upstream_unreachable",
     "stopped by the supervisor: upstream_unreachable"),
    ("", "cancelled", "", "cancelled"),
    ("bored", "cancelled", "", "cancelled"),
])
def test_cancel_with_a_failure_kills_the_agent_and_answers_that_failure(reason, status, failure, error):
    w = W("codex")
    w.start()
    acts = w(c.StdinData(json.dumps({"kind": "cancel_task", "task_id": "t", "reason": reason}).encode()
                         + b"\n"))
    assert of(acts, c.KillAgent) == [c.KillAgent("t")]
    w(c.AgentExited("t", -9))
    w(c.AgentOutput("t", "stdout", b""))
    w(c.AgentOutput("t", "stderr", b""))
    d = done(w(c.CleanupDone("t")))
    assert (d["status"], d["failure"], d["error"], d["exit_code"]) == (status, failure, error, -9)


def test_the_agent_not_starting_is_an_agent_error():
    w = W("claude")
    w(c.StdinData(b'{"kind":"run_task","task_id":"t","prompt":"hi"}\n'))
    d = done(w(c.AgentNotStarted("t", "spawn", "[Errno 2] No such file or directory: 'claude'")))
    assert (d["status"], d["failure"], d["usage"]) == ("error", "agent_error", None)


@pytest.mark.parametrize("agent,prompt,expected", [
    ("claude", "!deny", ("error", "stub-claude: I was not allowed to use Bash", "permission denied: Bash(true)",
                         "permission_denied")),
    ("claude", "!deny Edit", ("error", "stub-claude: I was not allowed to use Edit",
                              "permission denied: Edit(true)", "permission_denied")),
    ("codex", "!deny", ("ok", "stub-codex: !deny", "", "")),       # codex prints no denials
])
def test_the_stub_s_deny_directive_is_read_as_real_claude_s_denial(agent, prompt, expected):
    a = table.AGENTS[agent]
    plan = stub_plan(a.cli, a.command(prompt, [], None, setup())[1:], {})
    assert plan.exit_code == 0
    assert tuple(a.parse(0, plan.stdout.decode(), plan.stderr.decode()))[:4] == expected
