"""The page at / in a real headless browser (Debian's chromium and chromedriver, which
.ci/run installs): load it, see the store's corpora, submit a prompt, see the streamed
tokens shaded and the copied passage underlined, open a token's sources and a
document's pairs."""

from __future__ import annotations

import os
import shutil

import pytest

from knnstore import Store
from knnstore.server import Server

from .servers import serve_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing: .ci/run installs them (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def test_page_generates_and_shows_sources(built, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    lm, path = built
    reader = Store.open(path)
    srv = Server(lm, reader)
    wait = WebDriverWait(browser, 60)
    for url in serve_app(srv.app):
        browser.get(url + "/")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#corpora tbody tr")) == 2)
        names = [r.find_element(By.TAG_NAME, "td").text for r in browser.find_elements(By.CSS_SELECTOR, "#corpora tbody tr")]
        assert names == ["a", "b"]
        assert "exact search" in browser.find_element(By.ID, "store").text  # the tiny store has no index

        browser.find_element(By.ID, "prompt").send_keys("The European lobster")
        lam = browser.find_element(By.ID, "lambda")
        lam.send_keys("0.6")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("14")
        browser.find_element(By.ID, "go").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "finish"))
        tokens = browser.find_elements(By.CSS_SELECTOR, "#generated .tok")
        assert len(tokens) == 14
        expected = lm.with_settings(lambda_=0.6).generate("The European lobster", max_new_tokens=14).text
        assert "".join(t.text for t in tokens).strip() == expected.strip()
        shaded = [t.value_of_css_property("background-color") for t in tokens]
        assert any(s not in ("rgba(0, 0, 0, 0)", "transparent") for s in shaded), shaded
        copied = browser.find_elements(By.CSS_SELECTOR, "#generated .tok.copied")
        assert copied, "the repeated stored text is followed: some tokens are underlined"

        copied[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .source"))
        detail = browser.find_element(By.ID, "detail")
        assert "Follows" in detail.text and "p_kNN" in detail.text
        assert browser.find_elements(By.CSS_SELECTOR, "#detail .passage mark")
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000

        browser.find_element(By.CSS_SELECTOR, "#detail .source a").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .pairs tbody tr"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#detail .pairs tbody tr")
        assert rows[0].find_element(By.TAG_NAME, "td").text == "0"

        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs  # no script errors, nothing blocked by the page's policy
    reader.close()


def test_page_asks_for_the_key(built, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    lm, path = built
    reader = Store.open(path)
    srv = Server(lm, reader, api_key="k3y")
    for url in serve_app(srv.app):
        browser.get(url + "/")
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "key-box").is_displayed())
        box = browser.find_element(By.ID, "api-key")
        box.send_keys("k3y")
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#corpora tbody tr")) == 2)
        browser.execute_script("localStorage.clear()")
    reader.close()
