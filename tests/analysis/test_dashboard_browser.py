"""The dashboard in a real browser: Debian's headless Chromium driven through chromedriver (both installed by
`make setup`), pages opened from file:// with no server."""

import io
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tide.analysis import compute_feature_stats, save_feature_stats
from tide.analysis.dashboard import DashboardConfig, export_dashboard
from tide.capture import CaptureConfig, capture
from tide.sae import SAE, SAEConfig, save_sae

HOOK = "blocks.1.hook_resid_post"
XSS = "<script>alert(1)</script>"
RLO = "abc \u202edef\u202c ghi"
"""A label with a right-to-left override: shown with the override as a visible escape, the text after it in order."""
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from conftest import save_tiny_dit_dir

    root = tmp_path_factory.mktemp("browser")
    backbone = save_tiny_dit_dir(root / "tiny-dit")
    capture(CaptureConfig(backbone=str(backbone), out=str(root / "ds"), hooks=[HOOK], num_samples=8,
                          samples_per_shard=4, num_steps=4, device="cpu"), progress=False)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=4, normalization="none", hook=HOOK))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn_like(sae.W_enc))
    stats = compute_feature_stats(save_sae(sae, root / "sae"), root / "ds", device="cpu", progress=False)
    stats_path = save_feature_stats(stats, root / "feature_stats.h5")
    features = [int(f) for f in np.argsort(-stats.frequency)[:4]]
    (root / "labels.json").write_text(json.dumps({str(features[0]): XSS, str(features[1]): RLO}))
    index = export_dashboard(DashboardConfig(stats=str(stats_path), out=str(root / "dash"), features=features,
                                             images_per_feature=1, labels=str(root / "labels.json"), device="cpu",
                                             progress=False)).index_path
    return SimpleNamespace(index=index, features=features)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert CHROMIUM and CHROMEDRIVER, "Chromium and chromedriver are installed by `make setup` (Debian packages)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1200,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _not_blank(driver) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=float)
    return pixels.std() > 5 and (pixels < 128).mean() > 0.001


def test_index_loads_without_errors_sorts_filters_and_shows_a_script_label_as_text(site, browser):
    browser.get(site.index.as_uri())
    assert _errors(browser) == []
    assert _not_blank(browser)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    body = browser.find_element(By.TAG_NAME, "body").text
    assert XSS in body  # shown as text, not run
    assert "abc \\u202edef\\u202c ghi" in body and "\u202e" not in body  # the override shown, not obeyed
    rows = lambda: browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")  # noqa: E731
    first_col = lambda: [float(r.find_elements(By.TAG_NAME, "td")[0].text.lstrip("f")) for r in rows()]  # noqa: E731
    header = browser.find_elements(By.CSS_SELECTOR, "#features thead th")[0]
    header.click()
    ascending = first_col()
    assert ascending == sorted(ascending)
    header.click()
    assert first_col() == sorted(ascending, reverse=True)
    browser.find_element(By.ID, "filter").send_keys("zzz-no-such-feature")
    assert all(not r.is_displayed() for r in rows())
    assert _errors(browser) == []


def test_feature_page_loads_from_file_with_images_and_plots(site, browser):
    page = site.index.parent / "features" / f"f{site.features[1]}.html"
    browser.get(page.as_uri())
    assert _errors(browser) == []
    assert _not_blank(browser)
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 3
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
