"""The LoRA Land page at /, in a real headless browser (Debian's chromium, driven by Selenium) against a live server
on 127.0.0.1: it loads, lists the adapters with their scores, streams an adapter's answer beside the base's, and
shows the server's errors (wrong API key, unknown adapter, prompt too long) as readable messages.

Set LORAX_SCREENSHOT_DIR to keep the screenshot the test takes (docs/lora-land-test.png came from such a run;
docs/lora-land.png, the page serving the demo's adapters, from docs/screenshot.py)."""
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from server_helpers import BASE, KEY, SERVED, live_server, write_model_and_adapters
from lorax_core.server.scores import read_scores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(apt-get install chromium chromium-driver; .ci/run installs them)")
EXAMPLES = {"r8_all": ["the red cat", "one two three"], "r4_qv": ["the big dog"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    paths = write_model_and_adapters(root)
    results = {"tasks": [  # the demo's results.json format, adapters named after their tasks
        {"task": "r8_all", "base_score": 4.0, "adapter_score": 52.0, "lift": 48.0, "examples": EXAMPLES["r8_all"]},
        {"task": "r4_qv", "base_score": 0.0, "adapter_score": 61.0, "lift": 61.0, "examples": EXAMPLES["r4_qv"]}]}
    (root / "results.json").write_text(json.dumps(results))
    with live_server(paths, scores=read_scores(root / "results.json")) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(browser, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda d: condition(d))


def open_page(browser, live):
    """Load the page and enter the API key as a person would (the list loads once the key is there)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(live.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(live.url + "/")
    error = wait(browser, lambda d: d.find_element(By.ID, "page-error").text)
    assert "Error 401" in error and "API key" in error  # no key yet: the server's message is on the page
    browser.find_element(By.ID, "api-key").send_keys(KEY + Keys.TAB)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")) == len(SERVED))
    assert not browser.find_element(By.ID, "page-error").is_displayed()


def pick(browser, adapter):
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f'#adapters tbody tr[data-name="{adapter}"]').click()


def ask(browser, adapter=None, prompt=None, example=None):
    """Pick an adapter (None: keep the one picked), enter a prompt (or click an example), send; returns the two
    answer panes once both are done."""
    from selenium.webdriver.common.by import By

    if adapter is not None:
        pick(browser, adapter)
    if example is not None:
        buttons = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.example"))
        buttons[example].click()
    else:
        box = browser.find_element(By.ID, "prompt")
        browser.execute_script("arguments[0].value = arguments[1]", box, prompt)  # long prompts: faster than typing
    browser.find_element(By.ID, "send").click()
    panes = [browser.find_element(By.ID, pane) for pane in ("adapter-answer", "base-answer")]
    wait(browser, lambda d: all(p.get_attribute("data-state") in ("done", "error") for p in panes))
    return panes


def test_page_lists_adapters_and_streams_adapter_beside_base(live, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, live)
    assert browser.find_element(By.ID, "base-name").text == BASE
    rows = {r.get_attribute("data-name"): [c.text for c in r.find_elements(By.TAG_NAME, "td")]
            for r in browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")}
    assert rows["r8_all"][:3] == ["r8_all", "r8_all", "8"] and rows["r8_all"][4:] == ["52.0", "4.0"]
    assert rows["r4_qv"][2] == "4" and rows["r4_qv"][3] in ("disk", "loading", "host", "device")

    adapter, base = ask(browser, "r8_all", example=1)
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == EXAMPLES["r8_all"][1]
    page = 32  # the page's default max tokens, greedy, eos honoured
    shown = [pane.get_property("textContent") for pane in (adapter, base)]  # exact (the tiny model writes any byte)
    assert shown == [live.expected(EXAMPLES["r8_all"][1], model, page, ignore_eos=False).text
                     for model in ("r8_all", BASE)]
    assert shown[0] != shown[1]
    assert int(adapter.get_attribute("data-chunks")) > 1  # streamed: the text arrived in pieces
    assert adapter.get_attribute("data-state") == "done" and base.get_attribute("data-state") == "done"

    wait(browser, lambda d: d.find_elements(By.XPATH, '//table[@id="metrics"]//td[text()="r8_all"]'), timeout=10)
    out = Path(os.environ.get("LORAX_SCREENSHOT_DIR") or live.paths[0].parent)
    out.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(out / "lora-land-test.png"))


def test_server_errors_show_as_readable_messages(live, browser):
    open_page(browser, live)
    adapter, base = ask(browser, "r8_all", prompt="the " * 5000)  # longer than the context
    for pane in (adapter, base):
        assert pane.get_attribute("data-state") == "error"
        assert pane.text.startswith("Error 400:") and "shorten the prompt" in pane.text

    pick(browser, "r4_qv")
    gone = httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "r4_qv"}, headers=live.headers)
    assert gone.status_code == 200  # unloaded while the page still offers it
    try:
        adapter, base = ask(browser, prompt="the red cat")
        assert adapter.get_attribute("data-state") == "error"
        assert adapter.text.startswith("Error 404:") and "`r4_qv` does not exist" in adapter.text
        assert base.get_attribute("data-state") == "done" and base.text  # the base's answer still comes
    finally:
        httpx.post(f"{live.url}/v1/load_lora_adapter", json={"lora_name": "r4_qv",
                                                              "lora_path": str(live.paths[1]["r4_qv"])},
                   headers=live.headers)


def test_adapter_rows_are_updated_in_place(live, browser):
    """The list refreshes every 5 s; a row rebuilt between finding it and clicking it made clicks go stale (a CI run
    failed so). Rows are now kept per adapter: the same element survives a refresh, and only a served adapter's row
    comes and goes."""
    from selenium.webdriver.common.by import By

    def row(name):
        return browser.find_elements(By.CSS_SELECTOR, f'#adapters tbody tr[data-name="{name}"]')

    def refresh():
        browser.execute_async_script("refresh().then(arguments[arguments.length - 1])")

    open_page(browser, live)
    [kept] = row("r4_qv")
    refresh()
    kept.click()  # the element found before the refresh: StaleElementReferenceException if it had been rebuilt
    assert "selected" in kept.get_attribute("class") and browser.find_element(By.ID, "selected-name").text == "r4_qv"

    [other] = row("r8_all")
    assert httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "r4_qv"},
                      headers=live.headers).status_code == 200
    try:
        refresh()
        assert row("r4_qv") == [] and row("r8_all") == [other]
    finally:
        assert httpx.post(f"{live.url}/v1/load_lora_adapter", headers=live.headers,
                          json={"lora_name": "r4_qv", "lora_path": str(live.paths[1]["r4_qv"])}).status_code == 200
    refresh()
    names = [r.get_attribute("data-name") for r in browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")]
    assert sorted(names) == sorted(SERVED) and row("r8_all") == [other]


STALE_THEN_FRESH = """
const done = arguments[arguments.length - 1];
const real = window.fetch;
const stale = new Response(JSON.stringify({base: "stale", adapters: []}), {headers: {"Content-Type": "application/json"}});
window.fetch = () => new Promise((resolve) => setTimeout(() => resolve(stale), 300));
const older = refresh();  // its answer arrives last
window.fetch = real;
Promise.all([older, refresh()]).then(() => done(document.getElementById("base-name").textContent));
"""


def test_an_older_refresh_answering_late_is_dropped(live, browser):
    from selenium.webdriver.common.by import By

    open_page(browser, live)
    assert browser.execute_async_script(STALE_THEN_FRESH) == BASE
    assert len(browser.find_elements(By.CSS_SELECTOR, "#adapters tbody tr")) == len(SERVED)
