"""The Dagster UI used for real: headless Chromium (Debian's package, driven by Selenium) against `dagster dev`.

It opens the asset graph, launches a materialisation of one partition from the asset's page, sees
the run succeed on the run's page, and saves screenshots of the graph and of a drift report's
metadata under artifacts/ui/.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from distill_pipeline.core.layout import CURATED_PREFIX, drift_report_prefix
from distill_pipeline.core.store import LocalStore
from distill_pipeline.core.tables import read_manifest, read_report
from distill_pipeline.core.task import load_task
from distill_pipeline.demo.simulator import TrafficProfile, simulate_traffic
from distill_pipeline_tests.dagster_dev import (
    REPO_ROOT,
    DagsterDev,
    running_dagster_dev,
    utc_days_back,
    write_tiny_task,
)

ARTIFACTS = REPO_ROOT / "artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
UI_TIMEOUT_S = 60
DIALOG_FADE_S = 1.5

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not installed"
    ),
]


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1600,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser: WebDriver, url: str, ready_text: str) -> None:
    """Open ``url``, wait for ``ready_text`` on the page, and dismiss the first-visit newsletter dialog."""
    browser.get(url)
    WebDriverWait(browser, UI_TIMEOUT_S).until(lambda d: ready_text in d.find_element(By.TAG_NAME, "body").text)
    for skip in browser.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
        skip.click()


def _click(browser: WebDriver, xpath: str) -> None:
    WebDriverWait(browser, UI_TIMEOUT_S).until(lambda d: d.find_element(By.XPATH, xpath).is_enabled())
    browser.find_element(By.XPATH, xpath).click()


def _prepare_two_days(dev: DagsterDev, store: LocalStore, task_dir: Path, days: list[str]) -> None:
    """One day curated, then a second whose drift report compares it with the first (by the sensors)."""
    for seed, day in enumerate(days, start=1):
        simulate_traffic(
            store,
            days=[day],
            records_per_day=300,
            seed=seed,
            task=load_task(task_dir),
            profile=TrafficProfile(records_per_object=300),
        )
        dev.wait_for(
            f"{day} curated", lambda day=day: day in (read_manifest(store, CURATED_PREFIX) or {}).get("days", []), 300
        )
    dev.wait_for("the second day's drift report", lambda: read_report(store, drift_report_prefix(days[1])), 300)


def test_asset_graph_launch_from_the_ui_and_report_metadata(tmp_path: Path, browser: WebDriver) -> None:
    store = LocalStore(tmp_path / "store")
    task_dir = write_tiny_task(tmp_path / "task")
    days = utc_days_back(2, 1)
    env = {"DISTILL_STORE": str(store.root), "DISTILL_TASK": str(task_dir), "DISTILL_FIRST_DAY": utc_days_back(7)[0]}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_dagster_dev(tmp_path, env) as dev:
        # The community dialog of a first visit would cover the page at a random moment.
        assert dev.graphql("mutation { setNuxSeen }")["setNuxSeen"] is True
        _prepare_two_days(dev, store, task_dir, days)

        # The asset graph of the data group, with the sensors' materialisations on it.
        _open(browser, f"{dev.url}/locations/distill_pipeline/asset-groups/data", "curated_examples")
        WebDriverWait(browser, UI_TIMEOUT_S).until(lambda d: "Passed" in d.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(ARTIFACTS / "asset_graph.png"))

        # Materialise one partition of raw_logs from its page: Materialize..., type the day, launch.
        _open(browser, f"{dev.url}/assets/raw_logs", "Materialize")
        _click(browser, "//button[starts-with(normalize-space(), 'Materialize')]")
        partitions = WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: d.find_element(By.CSS_SELECTOR, "[role=dialog] input[type=text]")
        )
        partitions.click()
        partitions.send_keys(days[0], Keys.ENTER)
        browser.save_screenshot(str(ARTIFACTS / "launch_dialog.png"))
        _click(browser, "//div[@role='dialog']//button[normalize-space()='Launch 1 run']")
        run_link = WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: d.find_element(By.XPATH, "//a[normalize-space()='View' and contains(@href, '/runs/')]")
        )
        run_url = run_link.get_attribute("href")
        run_id = run_url.rsplit("/", 1)[-1]

        # The run succeeds, as its page says and the GraphQL API confirms.
        deadline = time.monotonic() + 240
        while True:
            _open(browser, run_url, run_id[:8])
            status = browser.find_element(By.TAG_NAME, "body").text
            if "Success" in status or "Failure" in status or time.monotonic() > deadline:
                break
            time.sleep(5)
        # The event log below the header loads after it; the screenshot should show it.
        WebDriverWait(browser, UI_TIMEOUT_S).until(lambda d: "RUN_SUCCESS" in d.find_element(By.TAG_NAME, "body").text)
        browser.save_screenshot(str(ARTIFACTS / "run_succeeded.png"))
        (run,) = [r for r in dev.runs({"dagster/partition": days[0]}) if r["runId"] == run_id]
        assert run["status"] == "SUCCESS"
        assert "distill/trigger" not in run["tags"]  # launched from the UI, not by a sensor
        assert "Success" in status

        # The drift report's metadata, and its plot over time opened from the table.
        _open(browser, f"{dev.url}/assets/drift_report", "fired_signals")
        browser.save_screenshot(str(ARTIFACTS / "drift_report_metadata.png"))
        browser.find_element(By.CSS_SELECTOR, "input[placeholder='Filter metadata keys']").send_keys(
            "signals_over_time"
        )
        _click(browser, "//*[contains(text(), 'Show Markdown')]")
        WebDriverWait(browser, UI_TIMEOUT_S).until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "[role=dialog] img").get_attribute("src").startswith("data:image/png")
            )
        )
        # The dialog fades in; a screenshot taken at once shows it half transparent.
        time.sleep(DIALOG_FADE_S)
        browser.save_screenshot(str(ARTIFACTS / "drift_report_plot.png"))
    for name in ("asset_graph", "launch_dialog", "run_succeeded", "drift_report_metadata", "drift_report_plot"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name
