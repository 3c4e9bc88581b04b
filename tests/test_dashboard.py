"""The Ray dashboard of a sweep on a shared machine: while another Ray instance holds Ray's default ports (its
dashboard on 8265, its dashboard agent on 52365), `asda sweep` on an instance of its own still gets a dashboard
where its job is listed by the sweep's name, its trial actor by its cell and seed, and the trial's log lines can
be read. Checked in a real headless Chromium with the dashboard's token, and through the dashboard's HTTP API that
its pages use."""

import html
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest
import yaml
from conftest import free_port, session_members, stop_group

from pipelines.runtime import AGENT_PORT, auth_token_path, free_port_from

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD_PORT = 8265  # Ray's default
SHOTS = Path("/tmp/asda-ray-dashboard")  # a screenshot kept for people to look at


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_taken_port_is_passed_over_for_the_next_free_one():
    """How the local instance's dashboard agent gets its port: the default when free, else the next free one."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        chosen = free_port_from(port)
        assert chosen != port and port < chosen <= port + 50
    assert free_port_from(chosen) == chosen


@pytest.fixture
def other_ray_instance():
    """Another user's Ray instance on this machine, on Ray's default dashboard and agent ports (`ray start --head`,
    a temp dir and a session of its own); afterwards every process of that session is stopped, by id, and
    nothing else. Where another process holds a default port already, that one stands in for it."""
    temp_dir = tempfile.mkdtemp(prefix="rayo", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
         f"--dashboard-agent-listen-port={AGENT_PORT}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        deadline = time.time() + 120  # the agent binds a little after `ray start` returns
        while time.time() < deadline and not (_listening(DASHBOARD_PORT) and _listening(AGENT_PORT)):
            time.sleep(0.5)
        assert _listening(DASHBOARD_PORT) and _listening(AGENT_PORT), "the default ports are not held"
        yield
    finally:
        for pid in session_members(proc.pid):  # what `ray start` spawned, and nothing else
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


class _TokenCookie(http.server.BaseHTTPRequestHandler):
    """Hands the browser the dashboard's token as the cookie the dashboard sets itself once a user types the token
    in (cookies are per host, not per port), then sends it on to the page named by ``?to=``."""

    token = ""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(302)
        self.send_header("Set-Cookie", f"ray-authentication-token={self.token}; Path=/; HttpOnly; SameSite=Lax")
        self.send_header("Location", parse_qs(urlparse(self.path).query)["to"][0])
        self.end_headers()

    def log_message(self, *args):
        pass


def _rendered(url: str, token: str, tmp_path: Path, screenshot: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium, signed in with ``token``; a PNG of it too."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine; .ci/run installs Debian's chromium")
    handler = type("Handler", (_TokenCookie,), {"token": token})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=15000", "--window-size=1600,1000", f"--screenshot={screenshot}", "--dump-dom",
             f"http://127.0.0.1:{server.server_address[1]}/?to={quote(url, safe='')}"],
            capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _api(url: str, token: str):
    """A GET of the dashboard's HTTP API, as its pages make it; JSON decoded, else the text."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        body = response.read().decode()
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        return body


def _one_trial_grid(tmp_path: Path, data: Path) -> Path:
    """The smoke grid cut to one trial (the centre, seed 0) that is still training when the checks run."""
    grid = yaml.safe_load((REPO / "sweeps" / "grids" / "smoke.yaml").read_text())
    grid.pop("tasks", None)
    grid.update(name="dashboard", data={"prepared": str(data)}, factors={"diff_lambda": [0.3]})
    grid["train"].update(steps=5000, checkpoint_every=4, log_every=4)
    path = tmp_path / "dashboard.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _header(log: Path, proc: subprocess.Popen, storage: Path, timeout: float = 600) -> str:
    """The sweep's output once its trial has written its first checkpoint (it is training then)."""
    deadline = time.time() + timeout
    while time.time() < deadline and not list(storage.glob("*/runs/*/checkpoint_*/model.pt")):
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.5)
    return log.read_text()


def _poll(what, timeout: float = 60):
    """``what()`` once it is truthy (the dashboard learns of new actors and log lines within seconds)."""
    deadline = time.time() + timeout
    while True:
        found = what()
        if found or time.time() > deadline:
            return found
        time.sleep(1)


def test_beside_another_ray_instance_the_dashboard_lists_the_sweeps_job_its_trial_and_the_trials_log(
        other_ray_instance, synthetic_prepared, tracking_store, tmp_path):
    started = time.monotonic()
    storage, log = tmp_path / "sweeps", tmp_path / "sweep.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the sweep starts its own instance
    env["PYTHONUNBUFFERED"] = "1"  # its header reaches the log file as it is printed
    proc = subprocess.Popen([str(BIN / "asda"), "sweep", "--grid", str(_one_trial_grid(tmp_path, synthetic_prepared)),
                             "--storage", str(storage)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out = _header(log, proc, storage)
        url = re.search(r"Ray +dashboard (http://127\.0\.0\.1:\d+)", out).group(1)
        sweep_id = re.search(r"^sweep (\S+) \(grid dashboard\)", out, re.M).group(1)
        assert not url.endswith(f":{DASHBOARD_PORT}"), out  # 8265 is the other instance's: the header says where
        assert f"job 'asda sweep {sweep_id}'" in out and "not readable in the dashboard" not in out, out
        token = auth_token_path().read_text().strip()
        actor_id = _check_api(url, token, sweep_id)
        _check_pages(url, token, sweep_id, actor_id, tmp_path)
    finally:
        stop_group(proc, signal.SIGINT)  # Ctrl+C: the sweep stops its trial and its Ray instance
        stop_group(proc, signal.SIGKILL)
    print(f"dashboard beside another Ray instance: {time.monotonic() - started:.0f} s")


def _check_api(url: str, token: str, sweep_id: str) -> str:
    """What the Jobs and Actors pages and the actor's log view read: the job by its name, the trial's actor by its
    cell and seed, and the trial's own line in the actor's log. Returns the actor's id."""
    jobs = _api(f"{url}/api/jobs/", token)
    named = [j for j in jobs if (j.get("metadata") or {}).get("job_name") == f"asda sweep {sweep_id}"]
    assert len(named) == 1 and named[0]["status"] == "RUNNING" and named[0]["type"] == "DRIVER", jobs

    def trial_actors():
        found = _api(f"{url}/api/v0/actors?detail=1&limit=1000", token)["data"]["result"]["result"]
        return [a for a in found if a.get("repr_name") == "asda_trial(centre · seed 0)" and a["state"] == "ALIVE"]

    actors = _poll(trial_actors)
    assert len(actors) == 1 and actors[0]["class_name"] == "AsdaTrial", actors
    assert actors[0]["job_id"] == named[0]["job_id"]
    tasks = _api(f"{url}/api/v0/tasks?detail=1&limit=1000", token)["data"]["result"]["result"]
    assert "asda_trial(centre · seed 0).train" in {t["name"] for t in tasks}, [t["name"] for t in tasks]
    line = f"asda trial centre · seed 0 of sweep {sweep_id}: started"
    log = f"{url}/api/v0/logs/file?actor_id={actors[0]['actor_id']}&suffix=err&lines=1000"
    assert _poll(lambda: line in str(_api(log, token))), str(_api(log, token))[-2000:]
    return actors[0]["actor_id"]


def _check_pages(url: str, token: str, sweep_id: str, actor_id: str, tmp_path: Path) -> None:
    """In a real browser: the Jobs page shows the job's name, the Actors page the trial's cell and seed, and the
    trial actor's page its log with the trial's line. The screenshots are kept in /tmp/asda-ray-dashboard/."""
    jobs = _rendered(f"{url}/#/jobs", token, tmp_path, tmp_path / "jobs.png")
    assert f"asda sweep {sweep_id}" in jobs, jobs[-3000:]
    actors = _rendered(f"{url}/#/actors", token, tmp_path, tmp_path / "actors.png")
    assert "asda_trial(centre · seed 0)" in actors and "AsdaTrial" in actors, actors[-3000:]
    page = _rendered(f"{url}/#/actors/{actor_id}", token, tmp_path, tmp_path / "actor.png")
    page = html.unescape(re.sub(r"<[^>]+>", "", page))  # the log view highlights words in elements of their own
    assert "asda_trial(centre · seed 0)" in page, page[-3000:]
    assert f"asda trial centre · seed 0 of sweep {sweep_id}: started" in page, page[-3000:]
    assert "Failed to load" not in page and "No files found" not in page
    names = ("jobs", "actors", "actor")
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in names)
    SHOTS.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(tmp_path / f"{name}.png", SHOTS / f"{name}.png")
