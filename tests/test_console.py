"""The console in a real browser: Debian's chromium, driven by Selenium through chromium-driver, against a
live ``forgellm run`` on the tiny model. A screenshot of each state is kept under ``test-artifacts/console``
(``FORGELLM_TEST_ARTIFACTS`` moves it); they are not committed."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from forgellm.testing import ServerProcess, build_tiny_model, test_client

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)
ARTIFACTS = Path(os.environ.get("FORGELLM_TEST_ARTIFACTS", "test-artifacts")) / "console"
WAIT = 30


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1500",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no download: Debian's driver
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tiny_model):
    with ServerProcess(["--model", str(tiny_model), "--max-tokens-cap", "8192"]) as process:
        yield process


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait_until(driver, condition, what: str, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def screenshot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def open_console(driver, url: str) -> None:
    driver.get(url + "/")  # the root redirects to the console
    wait_until(driver, lambda d: d.current_url.endswith("/console"), "the redirect to /console")


def fill(driver, element_id: str, text: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def send_chat(driver, message: str, max_tokens: int, extra: str = "") -> None:
    fill(driver, "message", message)
    fill(driver, "max-tokens", str(max_tokens))
    fill(driver, "temperature", "0")
    if extra:
        driver.execute_script("document.getElementById('extra').closest('details').open = true")
        fill(driver, "extra", extra)
    by_id(driver, "send").click()


def test_the_page_is_strict_small_and_secret_free(server):
    page = httpx.get(f"{server.url}/console")
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "frame-ancestors 'none'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    # No inline script or style: every script has a src on this origin, no element has a style attribute.
    assert re.findall(r"<script[^>]*>", page.text) == ['<script src="console/assets/console.js" defer>']
    assert "style=" not in page.text and "http" not in page.text.split("<body>")[1]
    sizes = [len(page.content)]
    for asset in ("console.js", "console.css"):
        response = httpx.get(f"{server.url}/console/assets/{asset}")
        assert response.status_code == 200 and response.headers["Content-Security-Policy"] == policy
        assert "http://" not in response.text and "https://" not in response.text  # no third-party origin
        sizes.append(len(response.content))
    assert sum(sizes) < 100_000
    assert httpx.get(f"{server.url}/console/assets/../../pyproject.toml").status_code == 404


def test_the_state_panel_shows_the_model(browser, server, tiny_model):
    open_console(browser, server.url)
    wait_until(browser, lambda d: str(tiny_model) in by_id(d, "models").text, "the model in the table")
    assert "loaded" in by_id(browser, "models").text and "(default)" in by_id(browser, "models").text
    assert "console" in by_id(browser, "plugins").text and "mlx" in by_id(browser, "plugins").text
    assert '"max_concurrency"' in by_id(browser, "config").text
    screenshot(browser, "state")


def test_a_message_streams_an_answer_into_the_page(browser, server, tiny_model):
    open_console(browser, server.url)
    wait_until(browser, lambda d: by_id(d, "chat-model").get_attribute("value"), "the model choice")
    send_chat(browser, "Hello there", 12)
    wait_until(browser, lambda d: "generated tokens" in by_id(d, "chat-stats").text, "the answer to finish")
    expected = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0,
    }).json()["choices"][0]["message"]["content"]  # fmt: skip
    assert by_id(browser, "answer").get_attribute("textContent") == expected
    assert "12 generated tokens" in by_id(browser, "chat-stats").text
    browser.execute_script("document.getElementById('snippets').open = true")
    assert (
        "curl " in by_id(browser, "snippet-curl").text
        and "client.chat.completions.create(" in by_id(browser, "snippet-python").text
    )
    screenshot(browser, "chat")


def test_the_stop_button_frees_the_servers_slot(browser, server):
    open_console(browser, server.url)
    wait_until(browser, lambda d: by_id(d, "chat-model").get_attribute("value"), "the model choice")
    send_chat(browser, "Tell me everything", 8000)
    wait_until(browser, lambda d: len(by_id(d, "answer").get_attribute("textContent")) > 20, "tokens to arrive")

    def busy() -> bool:
        return any(model["in_flight"] for model in httpx.get(f"{server.url}/api/models").json()["models"])

    assert busy()
    by_id(browser, "stop").click()
    wait_until(browser, lambda d: by_id(d, "chat-stats").text == "stopped", "the page to stop")
    deadline = time.monotonic() + 10
    while busy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not busy()
    models = httpx.get(f"{server.url}/api/models").json()["models"]
    assert all(model["active_sequences"] == 0 for model in models)
    screenshot(browser, "stopped")


def test_a_load_from_the_page_shows_the_new_model(browser, server, tmp_path):
    second = build_tiny_model(tmp_path / "second-model", seed=7)
    open_console(browser, server.url)
    wait_until(browser, lambda d: not by_id(d, "load-form").get_attribute("hidden"), "the load form")
    fill(browser, "load-model", str(second))
    fill(browser, "load-name", "second")
    by_id(browser, "load-form").submit()
    wait_until(browser, lambda d: "loading as second" in by_id(d, "load-message").text, "the load to start")
    wait_until(browser, lambda d: re.search(r"second\s.*loaded", by_id(d, "models").text), "the second model")
    wait_until(browser, lambda d: "second" in by_id(d, "chat-model").text, "the new model in the playground")
    screenshot(browser, "loaded")


def test_model_output_is_text_never_html(browser, server):
    payload = "<script>window.pwned = 1</script><img src=x onerror=window.pwned=2>"
    # Generated under a grammar whose only value is the payload: the real engine writes exactly this.
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": payload}}}
    open_console(browser, server.url)
    wait_until(browser, lambda d: by_id(d, "chat-model").get_attribute("value"), "the model choice")
    import json

    send_chat(browser, "Say it", 200, extra=json.dumps({"response_format": schema}))
    wait_until(browser, lambda d: "generated tokens" in by_id(d, "chat-stats").text, "the answer to finish")
    answer = by_id(browser, "answer")
    assert answer.get_attribute("textContent") == json.dumps(payload)
    assert answer.get_attribute("innerHTML").count("<") == 0  # escaped: &lt;script&gt;
    assert browser.execute_script("return window.pwned") is None
    screenshot(browser, "escaped")


def test_with_auth_the_page_asks_for_a_key_and_keeps_it_in_the_tab(browser, tiny_model):
    with ServerProcess(["--model", str(tiny_model), "--plugins", "auth"], env={"FORGELLM_API_KEY": "the-key"}) as s:
        assert httpx.get(f"{s.url}/console").status_code == 200  # the page itself is public
        assert httpx.get(f"{s.url}/console/api/state").status_code == 401
        open_console(browser, s.url)
        browser.execute_script("sessionStorage.clear()")
        browser.refresh()
        wait_until(browser, lambda d: by_id(d, "login").is_displayed(), "the sign-in form")
        assert not by_id(browser, "main").is_displayed()
        screenshot(browser, "sign-in")
        fill(browser, "key", "wrong")
        by_id(browser, "login-form").submit()
        wait_until(browser, lambda d: "not accepted" in by_id(d, "login-error").text, "the refusal")
        fill(browser, "key", "the-key")
        by_id(browser, "login-form").submit()
        wait_until(browser, lambda d: str(tiny_model) in by_id(d, "models").text, "the model, once signed in")
        assert browser.execute_script("return sessionStorage.getItem('forgellm-console-key')") == "the-key"
        assert browser.execute_script("return localStorage.length") == 0
        send_chat(browser, "Hi", 3)
        wait_until(browser, lambda d: "generated tokens" in by_id(d, "chat-stats").text, "an authenticated answer")
        browser.execute_script("document.getElementById('snippets').open = true")
        assert "$FORGELLM_API_KEY" in by_id(browser, "snippet-curl").text
        assert "the-key" not in by_id(browser, "snippet-curl").text  # the snippet never shows the key
        screenshot(browser, "signed-in")


def test_no_console_switches_it_off(tiny_model):
    with test_client(tiny_model, plugins="no:console") as client:
        assert client.get("/console").status_code == 404
