"""The dashboard in a real browser: the distribution's Chromium driven by Playwright,
against a real server and agent. Signs in through the form, sees a job submitted from
the CLI appear without a reload, opens it and watches its log lines arrive; saves the
screenshot the README shows (docs/dashboard.png)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from corral.testing import Cluster, corral_cmd, job_python, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[1] / "docs"
SCREENSHOT = DOCS / "dashboard.png"  # the overview, shown in the README
JOB_SCREENSHOT = DOCS / "dashboard-job.png"  # a job's page with its log


def _unavailable() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture
def browser():
    why = _unavailable()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # root cannot use its sandbox
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()


def cli(server, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CORRAL_SERVER": server.url, "CORRAL_TOKEN": server.admin_token}
    return subprocess.run(corral_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def test_dashboard_in_a_browser(cluster: Cluster, browser, jobfiles: Path, tmp_path: Path):
    from playwright.sync_api import expect

    server = cluster.server()
    cluster.agent(server, name="web-1")
    client = cluster.client(server)
    cluster.wait_agents_running(client, 1)

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.set_default_timeout(30_000)

    # signing in: a page asks for the form; a wrong token is refused and says so
    page.goto(server.url + "/jobs")
    expect(page).to_have_url(re.compile(r"/login\?next=/jobs$"))
    page.fill("#token", "cra_not-a-real-token")
    page.click("button[type=submit]")
    expect(page.locator("#login-error")).to_contain_text("unknown or revoked")
    page.fill("#token", server.admin_token)
    page.click("button[type=submit]")
    expect(page).to_have_url(server.url + "/jobs")
    expect(page.locator("table.jobs")).to_contain_text("no jobs yet")
    page.evaluate("window.__notReloaded = true")

    # a job submitted from the CLI shows up in the open list, without a reload
    gate = jobfiles / "gate"
    script = jobfiles / "job.py"
    script.write_text(
        "import os, time\n"
        "print('first line <b>not bold</b>', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}):\n"
        "    time.sleep(0.05)\n"
        "out = os.environ['CORRAL_OUTPUT_DIR']\n"
        "open(os.path.join(out, 'result.txt'), 'w').write('forty-two\\n')\n"
        "print('second line', flush=True)\n"
    )
    r = cli(server, "run", "--detach", "--name", "browser-demo", "--", job_python(), str(script))
    assert r.returncode == 0, r.stderr
    job_id = client.jobs()[0].id
    row = page.locator(f"#job-{job_id}")
    expect(row).to_contain_text("browser-demo", timeout=20_000)
    assert page.evaluate("window.__notReloaded === true")

    # its page follows the log: the first line, then (once released) the second
    row.locator("a").first.click()
    expect(page).to_have_url(f"{server.url}/jobs/{job_id}")
    log = page.locator("#log")
    expect(log).to_contain_text("first line <b>not bold</b>", timeout=30_000)  # shown as text
    assert page.locator("#log b").count() == 0
    page.evaluate("window.__notReloaded = true")
    gate.write_text("go")
    expect(log).to_contain_text("second line", timeout=30_000)
    expect(page.locator("#log-status")).to_contain_text("job succeeded, exit code 0")
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=10_000)
    assert page.evaluate("window.__notReloaded === true")
    page.screenshot(path=str(tmp_path / "job.png"))
    DOCS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "job.png", JOB_SCREENSHOT)

    # its output downloads from the job page
    with page.expect_download() as dl:
        page.click("a:text('result.txt')")
    assert Path(dl.value.path()).read_text() == "forty-two\n"

    # a job no instance can hold says why it waits; the cancel button cancels it
    big = client.submit([job_python(), "-c", "pass"], cpus=64, name="too-big")
    page.goto(f"{server.url}/jobs/{big.id}")
    expect(page.locator("#job-reason")).to_contain_text("waiting: no running instance")
    page.once("dialog", lambda d: d.accept())
    page.click("button:text('Cancel job')")
    expect(page.locator("#job-state")).to_have_text("cancelled")

    # the overview: counts, charts, the instance; then its page
    wait_for(lambda: client.job(job_id).state == "succeeded", 10, "the job to be recorded")
    page.goto(server.url + "/")
    expect(page.locator(".counts")).to_contain_text("succeeded")
    assert page.locator("svg.chart").count() == 3
    expect(page.locator("main")).to_contain_text("web-1")
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=False)
    shutil.copyfile(shot, SCREENSHOT)
    page.click("text=web-1")
    expect(page.locator("h1")).to_contain_text("Instance web-1")
    expect(page.locator("main")).to_contain_text("browser-demo")
    page.once("dialog", lambda d: d.accept())
    page.click("#drain")
    expect(page.locator("#message")).to_contain_text("drain requested")
    wait_for(lambda: client.instances()[0].state != "running", 10, "the instance to drain")
