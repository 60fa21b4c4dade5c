"""The LoRA Land page serving the demo's adapters, as a screenshot: `python3 docs/screenshot.py DEMO_DIR [--out PNG]`.

After `lorax-core demo --out DEMO_DIR`: starts `lorax-core serve` on 127.0.0.1 with the demo's base (NF4), its four
adapters and its results.json; opens the page in headless chromium (Debian's chromium and chromium-driver,
driven by Selenium); asks each adapter its first example prompt, and the last one stays on screen; saves the
screenshot (default: docs/lora-land.png).
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def serve(demo: Path, port: int) -> subprocess.Popen:
    tasks = [row["task"] for row in json.loads((demo / "results.json").read_text())["tasks"]]
    adapters = [f"{t}={next((demo / 'adapters' / t).rglob('adapter_config.json')).parent}" for t in tasks]
    command = [sys.executable, "-m", "lorax_core.cli", "serve", "--model", str(demo / "base"), "--quantize", "nf4",
               "--served-model-name", "demo-base", "--scores", str(demo / "results.json"), "--port", str(port),
               "--log-level", "warning"]
    for adapter in adapters:
        command += ["--adapter", adapter]
    proc = subprocess.Popen(command)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            raise SystemExit(f"lorax-core serve exited with {proc.returncode}")
    proc.terminate()
    raise SystemExit("lorax-core serve did not start within 60 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="the demo's output directory (lorax-core demo --out)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("lora-land.png"))
    args = parser.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = serve(args.demo, port)
    options = Options()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,820"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#adapters tbody tr"))
        names = [r.get_attribute("data-name") for r in rows]
        for name in names:
            driver.find_element(By.CSS_SELECTOR, f'#adapters tbody tr[data-name="{name}"]').click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#examples button.example"))[0].click()
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: all(d.find_element(By.ID, p).get_attribute("data-state") in ("done", "error")
                                     for p in ("adapter-answer", "base-answer")))
        time.sleep(2.5)  # one more /metrics poll, so the live panel shows rates
        driver.save_screenshot(str(args.out))
        print(f"screenshot of {len(names)} adapters: {args.out}")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
