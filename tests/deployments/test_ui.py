"""The Prefect UI in headless Chromium: the config form of spin-pipeline starts a real run.

Needs Debian's `chromium` (`make setup` installs it with apt-get where it can) and the
Python `playwright` package, which drives that browser; Playwright's own browser
download is not used.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from spin_core.config import load_config
from spin_core.storage.rundir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.browser, pytest.mark.timeout(900)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "Debian chromium is not installed, and `make test` could not install it here "
            "(it needs root and apt-get)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright missing")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def form_field(page, label: str):
    """The input of the schema-form property whose label starts with `label` (e.g. "Beta")."""
    return page.locator(
        f"xpath=//span[contains(@class, 'schema-form-property__label')"
        f" and starts-with(normalize-space(.), '{label}')]"
        "/ancestor::div[contains(concat(' ', normalize-space(@class), ' '),"
        " ' schema-form-property ')][1]//input"
    )


def test_custom_run_form_starts_a_run_with_the_typed_beta(
    browser, workers, toy_overrides, tmp_path
):
    server = workers
    config = load_config("configs/demo.yaml", toy_overrides("from-the-ui"))
    run = RunDir(tmp_path / "ui-run")
    pipeline = server.deployment("spin-pipeline/spin-pipeline")
    # What `spin serve --config` does: the deployment's defaults fill the form.
    defaults = {"config": config.model_dump(mode="json"), "run_dir": str(run.root)}
    server.api.patch(
        f"/deployments/{pipeline['id']}", json={"parameters": defaults}
    ).raise_for_status()
    before = {r["id"] for r in server.flow_runs_of("spin-pipeline/spin-pipeline")}

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(f"{server.ui}/deployments/deployment/{pipeline['id']}")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url(re.compile(r"/run(\?|$)"), timeout=180_000)
    beta, iterations = form_field(page, "Beta"), form_field(page, "Iterations")
    beta.wait_for()
    assert (beta.input_value(), iterations.input_value()) == ("0.1", "1")
    beta.fill("0.3")
    beta.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "custom-run-form.png")
    page.get_by_role("button", name="Submit").click()
    # Creating the run and going back can take over a minute on a loaded 2-core machine.
    page.wait_for_url(re.compile(r"/deployments/deployment/[^/]+(\?|$)"), timeout=180_000)

    (started,) = [
        r for r in server.flow_runs_of("spin-pipeline/spin-pipeline") if r["id"] not in before
    ]
    assert started["parameters"]["config"]["training"]["beta"] == 0.3
    assert started["parameters"]["config"]["run"]["iterations"] == 1
    server.wait_for(started["id"], {"COMPLETED"})
    assert yaml.safe_load(run.config.read_text())["training"]["beta"] == 0.3
    assert "| θ1 |" in run.report.read_text()

    page.goto(f"{server.ui}/runs/flow-run/{started['id']}")
    page.get_by_text(re.compile("report written to")).first.wait_for()  # its logs are shown
    screenshot = tmp_path / "flow-run.png"
    page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 10_000

    # The report artifact, as the UI shows it: every plot loads (a link to plots/x.png did
    # not: the UI serves the artifact from its own server).
    body = {
        "artifacts": {"key": {"any_": ["spin-report"]}, "flow_run_id": {"any_": [started["id"]]}}
    }
    (artifact,) = server.api.post("/artifacts/filter", json=body).json()
    page.goto(f"{server.ui}/artifacts/artifact/{artifact['id']}")
    page.get_by_text("Held-out metrics per model").first.wait_for()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    loaded = page.evaluate(
        "Array.from(document.images).filter(i => i.alt.includes('metrics_per_iteration')"
        " || i.alt.includes('train_steps')).map(i => i.naturalWidth)"
    )
    assert len(loaded) == 2 and all(width > 0 for width in loaded), loaded
    report_shot = tmp_path / "report-artifact.png"
    page.screenshot(path=report_shot, full_page=True)
    print(f"screenshots: {tmp_path / 'custom-run-form.png'}, {screenshot}, {report_shot}")
