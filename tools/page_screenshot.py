"""A screenshot of the page of `knnstore serve` (for docs/serve.md).

    python tools/page_screenshot.py STORE OUT.png [--prompt TEXT] [--max-tokens 40]

Starts ``knnstore serve STORE`` on 127.0.0.1, opens the page in Debian's headless
chromium (selenium, the system's chromedriver), generates from the prompt, clicks the first
token of the first copied passage (else the token with the largest store share) and saves
the window. Needs `apt-get install chromium chromium-driver`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent / "knnstore"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("out")
    ap.add_argument("--prompt", default="Homarus gammarus, known as the European lobster or common lobster, is")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([str(BIN), "serve", args.store, "--port", str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        url = f"http://127.0.0.1:{args.port}/"
        deadline = time.monotonic() + 300
        while True:
            try:
                driver.get(url)
                WebDriverWait(driver, 5).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#corpora tbody tr"))
                break
            except Exception:  # noqa: BLE001  (not up yet)
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(1)
        driver.find_element(By.ID, "prompt").send_keys(args.prompt)
        box = driver.find_element(By.ID, "max-tokens")
        box.clear()
        box.send_keys(str(args.max_tokens))
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 600).until(ec.text_to_be_present_in_element((By.ID, "status"), "finish"))
        copied = driver.find_elements(By.CSS_SELECTOR, "#generated .tok.copied")
        target = copied[0] if copied else max(
            driver.find_elements(By.CSS_SELECTOR, "#generated .tok"),
            key=lambda t: float(t.get_attribute("title").split("share=")[1]))
        target.click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .card"))
        driver.save_screenshot(args.out)
        print(f"Wrote {args.out}: {driver.find_element(By.ID, 'status').text}")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
