"""Secrets stay secret, tokens are sent, TLS is verified, SQL is parameterised, listeners stay local.

- A whole deployment (bot + scheduler + Dramatiq workers, DEBUG logging, error paths forced) runs with
  a database password in its URL, a chat API token and LM Studio tokens; no log line, error or
  `aibot status`/`jobs`/`servers` output may contain any of them.
- The LM Studio backend sends the bearer token a server requires (the simulator's `api_token`); a
  wrong token is a clear Unauthorized error that does not echo the token.
- TLS verification is on by default for LLM servers, the chat source and the chat sink.
- Every SQL statement in aibot is a named query, a migration, or a composed identifier (checked on the
  source), and hostile ids/text round-trip through the queue and the CLI.
- `aibot serve` binds 127.0.0.1 by default and refuses another address without a token; the test
  tools (simulator, fake chat) default to 127.0.0.1 too.
"""

from __future__ import annotations

import ast
import http.server
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from aibot.backends.base import BackendError, ChatRequest
from aibot.backends.factory import make_backend
from aibot.cluster.sizing import GB
from aibot.harness import FAST_SCHEDULES, Stack, entity, write_config
from aibot.queue import jobs
from aibot.sim import SimServer
from aibot.sim.catalog import ModelSpec
from aibot.sim.chat import FakeChatServer
from aibot.sim.config import SimConfig
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
DB_SECRET = "dbpw-Zq8v1xS3cr3t"
CHAT_SECRET = "chat-tok-Hn42kS3cr3t"
LMS_SECRET = "lms-tok-Pp93jS3cr3t"
WRONG_SECRET = "wrong-tok-Ww11S3cr3t"
SECRETS = (DB_SECRET, CHAT_SECRET, LMS_SECRET, WRONG_SECRET)
HOSTILE = "'); DROP TABLE aibot.jobs; --"


def with_password(url: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{userinfo.split(':')[0]}:{password}@{host}"


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aibot", *args], capture_output=True, text=True, timeout=60,
                          env=env)


# --- secrets ---------------------------------------------------------------------------------------------


def test_no_secret_reaches_logs_errors_or_status(db_url, tmp_path):
    secret_url = with_password(db_url, DB_SECRET)   # trust auth: the password is accepted and ignored
    models = [ModelSpec("sim/m-1", 15 * GB, parallel=2)]
    locked = SimServer(SimConfig(name="locked", models=models, preloaded="all", speed=0.01, api_token=LMS_SECRET,
                                 faults={"error_rate": 0.2}, seed=3)).start()
    wrong = SimServer(SimConfig(name="wrong", models=[ModelSpec("sim/m-2", 15 * GB, parallel=2)], preloaded="all",
                                speed=0.01, api_token=LMS_SECRET)).start()
    chat = FakeChatServer(token=CHAT_SECRET, post_failure_rate=0.3, seed=5).start()
    try:
        servers = [{"name": "locked", "url": locked.url, "tokenEnv": "AIBOT_T_LOCKED_TOKEN", "capabilities": {"maxMemory": 128}},
                   {"name": "wrong", "url": wrong.url, "tokenEnv": "AIBOT_T_WRONG_TOKEN", "capabilities": {"maxMemory": 128}}]
        cfg = write_config(tmp_path / "c.json", servers=servers,
                           entities=[entity("e1", "sim/m-1"), entity("e2", "sim/m-2")])
        env = {**FAST_SCHEDULES, "AIBOT_CHAT_API_URL": chat.url, "AIBOT_CHAT_API_TOKEN": CHAT_SECRET,
               "AIBOT_SINK": "chat", "AIBOT_LOG_LEVEL": "DEBUG", "AIBOT_LEASE_SECONDS": "10",
               "AIBOT_T_LOCKED_TOKEN": LMS_SECRET, "AIBOT_T_WRONG_TOKEN": WRONG_SECRET}
        posted = [chat.post_human(f"hello {i}", entity="e1") for i in range(8)]
        chat.post_human("to the server with the wrong token", entity="e2")
        with Stack(secret_url, cfg, workdir=tmp_path / "logs", env=env) as stack:
            stack.start_bot()
            stack.start_workers(threads=4)
            wait_for(lambda: len(chat.replies()) >= len(posted), timeout=90, message="replies via the token-protected servers")
            wait_for(lambda: "401" in stack.logs() or "Unauthorized" in stack.logs(), timeout=30,
                     message="the wrong-token server's 401 in the logs")
            full_env = {**stack.base_env()}
            outputs = [cli(*cmd, env=full_env) for cmd in
                       (["status"], ["jobs", "list"], ["servers", "list"], ["jobs", "show", "1"])]
            broken = {**full_env, "AIBOT_DATABASE_URL": f"postgresql://postgres:{DB_SECRET}@127.0.0.1:1/nowhere"}
            outputs.append(cli("status", env=broken))
            outputs.append(cli("bot", "--once", env=broken))
        logs = stack.logs() + "".join(p.log() for p in stack.procs)
    finally:
        chat.stop()
        locked.stop()
        wrong.stop()
    assert chat.stats()["unauthorized"] == 0, "the bot and sink send the chat token"
    assert set(chat.replies_by_reply_to().values()) == {1}
    assert outputs[0].returncode == 0, outputs[0].stderr
    assert outputs[-2].returncode != 0 and outputs[-1].returncode != 0
    assert "generation failed" in logs and "delivery failed" in logs, "the error paths were exercised"
    everything = logs + "".join(o.stdout + o.stderr for o in outputs)
    for secret in SECRETS:
        assert secret not in everything, f"secret {secret[:8]}... leaked"


def test_bearer_token_is_sent_and_a_wrong_one_is_not_echoed():
    sim = SimServer(SimConfig(models=[ModelSpec("m", 15 * GB, parallel=1)], preloaded="all", speed=0.01,
                              api_token=LMS_SECRET)).start()
    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    try:
        for kind in ("lmstudio", "openai"):
            ok = make_backend(kind, sim.url, token=LMS_SECRET)
            try:
                assert ok.chat(req).text
                assert LMS_SECRET not in repr(ok)
            finally:
                ok.close()
            for token in (None, WRONG_SECRET):
                bad = make_backend(kind, sim.url, token=token)
                try:
                    with pytest.raises(BackendError) as err:
                        bad.chat(req)
                finally:
                    bad.close()
                assert "401" in str(err.value) and WRONG_SECRET not in str(err.value) + repr(err.value)
                assert err.value.server_fault is True or type(err.value).__name__ == "Unauthorized"
    finally:
        sim.stop()


# --- TLS ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed_https(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")], check=True, capture_output=True)

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"comments": [], "data": []}')

        do_POST = do_PATCH = do_GET

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", d / "cert.pem"
    httpd.shutdown()


def test_tls_is_verified_by_default_everywhere(self_signed_https):
    from aibot.bot.sources import ChatSource, SourceError
    from aibot.delivery.sinks import ChatSink, SinkError

    url, cert = self_signed_https
    for kind in ("lmstudio", "openai", "ollama", "llamacpp"):
        backend = make_backend(kind, url)
        try:
            with pytest.raises(BackendError, match="(?i)certificate|ssl"):
                backend.chat(ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]))
        finally:
            backend.close()
    source = ChatSource(url)
    with pytest.raises(SourceError, match="(?i)certificate|ssl"):
        source.fetch(0, 10)
    source.close()
    sink = ChatSink(url)
    with pytest.raises(SinkError, match="(?i)certificate|ssl"):
        sink.deliver(1, {"message_id": "m"}, {"text": "hi"})
    sink.close()
    # The operator's CA bundle makes the same server acceptable: verification, not refusal.
    trusted = make_backend("openai", url, verify=str(cert))
    try:
        with pytest.raises(BackendError) as err:
            trusted.chat(ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]))
        assert "certificate" not in str(err.value).lower()
    finally:
        trusted.close()


# --- SQL ---------------------------------------------------------------------------------------------------------


def _execute_calls():
    for path in sorted((ROOT / "aibot").rglob("*.py")):
        # The simulator stands in for other people's servers; the harness is test and bench tooling that
        # explains the installed claim (EXPLAIN, LOAD auto_explain: utility statements without parameters).
        # Neither runs in a deployment.
        if {"sim", "harness"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "executemany") and node.args):
                yield path.relative_to(ROOT), node.lineno, node.args[0]


def test_every_sql_statement_is_a_named_query_a_migration_or_a_composed_identifier():
    allowed_calls = {"sql", "_sql_with_database"}     # db.Queries.sql: sql/queries/; sql.Identifier composition
    seen = 0
    for path, line, arg in _execute_calls():
        seen += 1
        if isinstance(arg, ast.Call) and getattr(arg.func, "id", getattr(arg.func, "attr", None)) in allowed_calls:
            continue
        if isinstance(arg, ast.Attribute) and ast.unparse(arg) == "mig.sql":   # a migration file's text
            continue
        if isinstance(arg, ast.JoinedStr):
            names = {ast.unparse(v.value) for v in arg.values if isinstance(v, ast.FormattedValue)}
            if names <= {"SCHEMA"}:       # a module constant, never input
                continue
        pytest.fail(f"{path}:{line}: SQL built from {ast.unparse(arg)!r}; use a named query with parameters")
    assert seen >= 5


def test_hostile_ids_and_text_round_trip_through_queue_and_cli(conn, db_url):
    hostile_entity = "e'); DROP TABLE aibot.jobs; --"
    [jid] = jobs.enqueue_many(conn, [jobs.NewJob(source=HOSTILE, source_message_id=HOSTILE + "\"%s%(x)s",
                                                 entity_id=hostile_entity, model="m'; --", priority=1,
                                                 payload={"text": HOSTILE, "username": "Robert'); --"})])
    got = jobs.get(conn, jid)
    assert (got["source"], got["entity_id"], got["model"], got["payload"]["text"]) == (HOSTILE, hostile_entity, "m'; --", HOSTILE)
    assert jobs.cancel(conn, jid, reason=HOSTILE) is True
    assert jobs.get(conn, jid)["reason"] == HOSTILE
    env = {"AIBOT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    listed = cli("jobs", "list", "--entity", hostile_entity, env=env)
    assert listed.returncode == 0, listed.stderr
    assert str(jid) in listed.stdout
    assert cli("jobs", "cancel", str(jid), "--reason", HOSTILE, env=env).returncode in (0, 2)
    assert conn.execute("SELECT count(*) AS n FROM aibot.jobs").fetchone()["n"] == 1, "the table survived"


# --- listeners ---------------------------------------------------------------------------------------------------


def test_serve_binds_loopback_by_default_and_requires_a_token_elsewhere(db_url):
    from aibot.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    env = {"AIBOT_DATABASE_URL": db_url, "PATH": "/usr/bin:/bin"}
    proc = cli("serve", "--host", "0.0.0.0", "--port", "0", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "token" in proc.stderr.lower()


def test_test_tools_default_to_loopback():
    assert SimConfig().host == "127.0.0.1"
    with FakeChatServer() as chat:
        assert chat.url.startswith("http://127.0.0.1:")
    sim = SimServer(SimConfig(models=[ModelSpec("m", GB)])).start()
    try:
        assert sim.url.startswith("http://127.0.0.1:")
    finally:
        sim.stop()
