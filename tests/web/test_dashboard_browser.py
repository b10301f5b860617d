"""The dashboard in headless Chromium, against a real `aibot serve` and Postgres.

Needs the `chromium` binary (Debian/Ubuntu: `apt-get install -y chromium`); skipped without it. No
DevTools driver: the page is loaded with `--dump-dom` after a virtual-time budget, and the retry click
goes through the page's own test hook (`?test_retry=<job id>` clicks that job's Retry button and
writes the outcome to `<body data-test-retry>`). The screenshot lands in tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aibot.web.server import AppServer
from tests.ops.test_inspection import seed, state_of
from tests.support.waiting import wait_for

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)

pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs chromium (apt-get install -y chromium)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=90)


@pytest.fixture
def server(db_url):
    srv = AppServer(db_url, port=0, stats_interval=1.0).start()
    wait_for(srv.hub.listening.is_set, timeout=10, message="event listener")
    yield srv
    srv.stop()


def test_dashboard_renders_queue_and_retries_a_dead_job(conn, server, tmp_path):
    ids = seed(conn)
    proc = chromium(tmp_path, "--dump-dom", f"{server.url}/?test_retry={ids['dead']}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout

    assert 'id="conn" class="conn online"' in dom, "the WebSocket never connected"
    queue = dom.split('id="queue"', 1)[1].split("</table>", 1)[0]
    assert f'data-job-id="{ids["q_crit_old"]}"' in queue and "hello there" in queue
    assert 'class="pri band-critical"' in queue and 'class="pri band-background"' in queue
    servers = dom.split('id="servers"', 1)[1].split("</table>", 1)[0]
    assert 'data-server="alpha"' in servers and "status-down" in servers
    models = dom.split('id="models"', 1)[1].split("</table>", 1)[0]
    assert "1 / 3" in models
    assert "<rect" in dom.split('id="chart"', 1)[1]

    body = re.search(r"<body[^>]*>", dom).group(0)
    assert f'data-test-retry="ok:{ids["dead"]}"' in html.unescape(body), body
    assert state_of(conn, ids["dead"]) == "queued"
    assert conn.execute("SELECT attempts FROM aibot.jobs WHERE id = %s", (ids["dead"],)).fetchone()["attempts"] == 0


def test_dashboard_hook_reports_a_missing_retry_button(conn, server, tmp_path):
    ids = seed(conn)
    # A rejected job without a model has no Retry button: the hook reports that instead of clicking.
    proc = chromium(tmp_path, "--dump-dom", f"{server.url}/?test_retry={ids['rejected']}")
    body = re.search(r"<body[^>]*>", proc.stdout).group(0)
    assert f"error:no retry button for job {ids['rejected']}" in html.unescape(body)
    assert state_of(conn, ids["rejected"]) == "rejected"


def test_dashboard_screenshot(conn, server, tmp_path):
    seed(conn)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1100", f"{server.url}/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_dashboard_operator_panels(conn, server, tmp_path):
    """Per-model queue with who serves it (or why nobody can), per-persona wait, loads/evictions over
    time and the processes with their heartbeat, as Chromium renders them; screenshot in the artifacts."""
    from tests.web.test_panels import panels

    panels(conn)
    conn.execute("INSERT INTO aibot.workers (worker_id, host, pid, role) VALUES ('bot@h:1', 'h', 1, 'bot'), "
                 "('w@h:2', 'h', 2, 'worker')")
    conn.execute("UPDATE aibot.workers SET heartbeat_at = now() - interval '5 min' WHERE role = 'worker'")
    proc = chromium(tmp_path, "--dump-dom", f"{server.url}/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = html.unescape(proc.stdout)

    queue = dom.split('id="model-queue"', 1)[1].split("</table>", 1)[0]
    assert 'data-model="big"' in queue and "no server can hold it: alpha: not enough memory" in queue
    assert "served by alpha" in queue and "loading on alpha" in queue
    waits = dom.split('id="entity-wait"', 1)[1].split("</table>", 1)[0]
    assert 'data-entity="eve"' in waits and 'data-entity="zed"' in waits
    loads = dom.split('id="loads-chart"', 1)[1].split("</section>", 1)[0]
    assert 'data-points="2"' in loads and 'class="load"' in loads and 'class="evict"' in loads
    workers = dom.split('id="workers"', 1)[1].split("</table>", 1)[0]
    bot = workers.split('data-role="bot"', 1)[1].split("</tr>", 1)[0]
    stale = workers.split('data-role="worker"', 1)[1].split("</tr>", 1)[0]
    assert "status-healthy" in bot and "status-down" in stale

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-panels.png"
    shot.unlink(missing_ok=True)
    proc = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,2000", f"{server.url}/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
