"""The scheduled deployment on a real Prefect server (SQLite, loopback): an ephemeral server
cannot schedule, so this starts `prefect server start` and `obliviate serve` as processes.
Slow: about two minutes, most of it waiting for the cron minute."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import FORGET, write_params

pytestmark = pytest.mark.slow

CRON = "* * * * *"  # cron's finest grain: the test waits for the next minute


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (server workers, the runner's flow-run children)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def wait_for(predicate, timeout: float, what: str, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def api(url: str, path: str, body: dict | None = None):
    try:
        r = httpx.post(url + path, json=body or {}) if body is not None else httpx.get(url + path)
        return r.json() if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A trained digits workspace (no DVC) and the environment of a real server on loopback."""
    write_params(tmp_path, **FORGET, serve={"deployment": "test", "cron": CRON})
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / ".prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.run([sys.executable, "-m", "obliviate.cli", "run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return tmp_path


def test_a_scheduled_deployment_drains_requests_queued_while_everything_was_down(workspace):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(workspace / "prefect-server"),  # the server's SQLite database
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "DO_NOT_TRACK": "1",
    }
    logs = [workspace / "server.log", workspace / "serve.log"]
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                  "--port", str(port)]  # fmt: skip
    serve_cmd = [sys.executable, "-m", "obliviate.cli", "serve", "-p",
                 str(workspace / "params.yaml")]  # fmt: skip
    cli = [sys.executable, "-m", "obliviate.cli"]

    def up():
        server = start(server_cmd, env, logs[0])
        wait_for(lambda: api(url, "/health") is True, 120, "the Prefect server", logs)
        return server, start(serve_cmd, env, logs[1])

    def deployment():
        found = api(url, "/deployments/filter", {"deployments": {"name": {"any_": ["test"]}}})
        return found[0] if found else None

    # 1. the deployment registers with its cron schedule, then server and worker go down
    server, worker = up()
    dep = wait_for(deployment, 120, "the drain deployment", logs)
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == [CRON]
    stop(worker), stop(server)

    # 2. requests arrive while nothing runs: they wait in the journal, durable files
    ids = subprocess.run([*cli, "ids", "--block", "3"], cwd=workspace, env=env,
                         capture_output=True, text=True, check=True).stdout.split()[:2]  # fmt: skip
    rids = [
        subprocess.run(
            [*cli, "request", i], cwd=workspace, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        for i in ids
    ]

    def status(rid: str) -> str:
        out = subprocess.run([*cli, "status", rid], cwd=workspace, env=env,
                             capture_output=True, text=True)  # fmt: skip
        return out.stdout.split(": ")[1].split(" ")[0] if out.returncode == 0 else out.stderr

    assert [status(r) for r in rids] == ["queued", "queued"]

    # 3. restart: the stored schedule fires and one run drains both requests in one sweep
    server, worker = up()
    try:
        wait_for(lambda: all(status(r) == "done" for r in rids), 180, "the scheduled drain", logs)
        completed = {
            "deployment_id": {"any_": [dep["id"]]},
            "state": {"type": {"any_": ["COMPLETED"]}},
        }
        # the requests are done before the run ends: the metric refresh and artifacts follow
        runs = wait_for(lambda: api(url, "/flow_runs/filter", {"flow_runs": completed}), 120,
                        "a completed run of the deployment", logs)  # fmt: skip
        assert runs
        keys = {a["key"] for a in api(url, "/artifacts/filter", {})}
        assert {
            "drain",
            "deletion",
            "deletion-delta",
            "deletion-delta-plot",
            "verification",
        } <= keys
    finally:
        stop(worker), stop(server)
    records = [json.loads(x) for x in (workspace / "audit" / "deletions.jsonl").open()]
    assert len(records) == 1 and len(records[0]["sample_id_hashes"]) == 2
    # logs, the Prefect database (runs, parameters, logs, artifacts) and the journal name
    # requests, never samples
    everything = b"".join(p.read_bytes() for p in workspace.rglob("*") if p.is_file()
                          and "data" not in p.parts and "models" not in p.parts)  # fmt: skip
    assert not any(f"{i}".encode() in everything for i in ids)
