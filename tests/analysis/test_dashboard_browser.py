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
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

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
                                             images_per_feature=2, labels=str(root / "labels.json"), device="cpu",
                                             effect_features=2, effect_samples=2, progress=False)).index_path
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


def _wait_ready(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def _rows(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#features tbody tr")


def test_index_loads_without_errors_sorts_filters_and_shows_a_script_label_as_text(site, browser):
    browser.get(site.index.as_uri())
    _wait_ready(browser)
    assert _errors(browser) == []
    assert _not_blank(browser)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    body = browser.find_element(By.TAG_NAME, "body").text
    assert XSS in body  # shown as text, not run
    assert "abc \\u202edef\\u202c ghi" in body and "\u202e" not in body  # the override shown, not obeyed
    first_col = lambda: [int(r.find_elements(By.TAG_NAME, "td")[0].text) for r in _rows(browser)]  # noqa: E731
    header = browser.find_elements(By.CSS_SELECTOR, "#features thead th")[0]
    header.click()
    ascending = first_col()
    assert ascending == sorted(ascending) and len(ascending) == len(site.features)
    header.click()
    assert first_col() == sorted(ascending, reverse=True)
    browser.find_element(By.ID, "q").send_keys("zzz-no-such-feature")
    assert _rows(browser) == [] and "0 of" in browser.find_element(By.ID, "count").text
    assert _errors(browser) == []


def test_index_keyboard_search_and_navigation(site, browser):
    browser.get(site.index.as_uri())
    _wait_ready(browser)
    page = browser.find_element(By.TAG_NAME, "body")
    page.send_keys("/")  # focuses the search box
    assert browser.switch_to.active_element.get_attribute("id") == "q"
    target = site.features[2]
    browser.switch_to.active_element.send_keys(str(target))
    assert first_ids(browser) == [target]
    browser.switch_to.active_element.clear()
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    browser.find_element(By.ID, "q").send_keys("x")  # typing then clearing shows every row again
    browser.find_element(By.ID, "q").send_keys(Keys.BACKSPACE)
    browser.find_element(By.TAG_NAME, "body").click()
    ids = first_ids(browser)
    ActionChains(browser).send_keys(Keys.ARROW_DOWN).send_keys(Keys.ARROW_DOWN).perform()
    active = browser.find_element(By.CSS_SELECTOR, "#features tbody tr.active")
    assert int(active.get_attribute("data-id")) == ids[2]
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    _wait_ready(browser)
    assert browser.current_url.endswith(f"features/f{ids[2]}.html")
    assert _errors(browser) == []


def first_ids(browser):
    return [int(r.get_attribute("data-id")) for r in _rows(browser)]


def test_a_large_index_is_paged_and_searchable(site, browser, tmp_path):
    """1000 features: one page of rows in the document at a time; paging, id search and class filter."""
    from tide.analysis.dashboard_html import index_html, write_assets

    doc = json.loads((site.index.parent / "dashboard.json").read_text())
    base = doc["features"][0]
    records = [{**base, "id": i, "page": f"features/f{i}.html", "label": f"feature number {i}",
                "frequency": 1.0 / (i + 1), "top_class_id": i % 4, "peak_timestep": float(i % 1000)}
               for i in range(1000)]
    (tmp_path / "assets").mkdir()
    write_assets(tmp_path / "assets")
    (tmp_path / "index.html").write_text(index_html({**doc, "num_features": 1000}, records))
    browser.get((tmp_path / "index.html").as_uri())
    _wait_ready(browser)
    assert first_ids(browser) == list(range(100))  # most frequent first, 100 per page
    browser.find_element(By.ID, "next").click()
    assert first_ids(browser) == list(range(100, 200))
    assert "page 2 of 10" in browser.find_element(By.ID, "page").text
    q = browser.find_element(By.ID, "q")
    q.send_keys("#523")
    assert first_ids(browser) == [523]
    q.clear()
    q.send_keys("number 52")  # label substring: 52, 520..529
    assert sorted(first_ids(browser)) == [52] + list(range(520, 530))
    q.clear()
    q.send_keys(Keys.SPACE)
    q.send_keys(Keys.BACKSPACE)
    browser.find_element(By.ID, "tmin").send_keys("990")
    assert sorted(first_ids(browser)) == sorted(i for i in range(1000) if i % 1000 >= 990)
    assert _errors(browser) == []


def test_feature_page_loads_from_file_with_images_heat_maps_and_plots(site, browser):
    page = site.index.parent / "features" / f"f{site.features[1]}.html"
    browser.get(page.as_uri())
    _wait_ready(browser)
    assert _errors(browser) == []
    assert _not_blank(browser)
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 1
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
               for img in images)
    figs = browser.find_elements(By.CSS_SELECTOR, "figure[data-i]")
    assert figs and all(f.get_attribute("data-drawn") == "1" for f in figs)  # every heat map drawn
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.plot")) >= 2
    # a strip of sprites loads its image
    sprites = browser.find_elements(By.CSS_SELECTOR, ".sprite")
    assert sprites and "url(" in sprites[0].value_of_css_property("background-image")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    _wait_ready(browser)
    assert browser.current_url != page.as_uri() and browser.current_url.endswith(".html")
    assert _errors(browser) == []


def test_a_script_label_is_text_on_its_feature_page(site, browser):
    browser.get((site.index.parent / "features" / f"f{site.features[0]}.html").as_uri())
    _wait_ready(browser)
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert XSS in browser.find_element(By.TAG_NAME, "h1").text
    assert _errors(browser) == []
