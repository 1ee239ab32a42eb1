"""The biologists' page in a real headless browser (Debian's chromium via selenium) against Ray Serve on loopback.

Needs ``chromium`` and ``chromedriver`` (``apt-get install chromium chromium-driver``; ``make test`` installs
them): without them this test fails, it does not skip.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from serving.config import ServeSection
from serving.testing import free_port, tiny_model, tiny_records, wait_http

pytestmark = pytest.mark.integration

RNG = np.random.default_rng(2)
BARCODES = ["".join(RNG.choice(list("ACGT"), n)) for n in (600, 540)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    import ray
    from ray import serve

    from serving import ray_app
    from serving.core import ModelSource

    tmp = tmp_path_factory.mktemp("page")
    model = tiny_model(tmp / "model")
    valid = tiny_records(tmp / "data", BARCODES)
    section = ServeSection(max_n=6, max_steps=10, default_n=2, default_steps=2)
    ray.init(num_cpus=2, include_dashboard=False)
    url = ray_app.start(ModelSource(model_dir=str(model)), section, port=free_port(), valid_parquet=str(valid),
                        data_root=str(tmp / "data"))
    wait_http(url + "/healthz")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not look for drivers online
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromedriver are needed: apt-get install chromium chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    drv.set_page_load_timeout(120)  # a generous limit: a loaded 2-core box is slow
    yield drv
    drv.quit()


def loaded_images(drv, css: str) -> list[int]:
    """naturalWidth of every image matching ``css`` that finished loading (0 = broken or pending)."""
    return drv.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => i.complete ? i.naturalWidth : 0)", css)


def test_page_submit_a_barcode_and_see_images(server, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    drv, wait = browser, WebDriverWait(browser, 300)  # polled conditions; the limit is for a loaded box
    drv.get(server + "/")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert "folder:" in drv.find_element(By.ID, "model-info").text

    # pick a test record: barcode and place filled in, its real image shown
    select = Select(drv.find_element(By.ID, "record"))
    assert len(select.options) == 3  # placeholder + 2 records
    select.select_by_value("TEST001-26")
    assert drv.find_element(By.ID, "barcode").get_property("value") == BARCODES[1]
    assert float(drv.find_element(By.ID, "latitude").get_property("value")) == 10.0
    wait.until(lambda d: loaded_images(d, "#real-img") == [64])
    assert "Testus species1" in drv.find_element(By.ID, "real-caption").text

    # click on the map: the place follows the click (right half, northern half -> lon > 0, lat > 0)
    canvas = drv.find_element(By.ID, "map")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(drv).move_to_element_with_offset(canvas, w // 4, -h // 4).click().perform()
    lat = float(drv.find_element(By.ID, "latitude").get_property("value"))
    lon = float(drv.find_element(By.ID, "longitude").get_property("value"))
    assert 35 < lat < 55 and 80 < lon < 100, (lat, lon)

    # three images, guidance 0, generate
    for field, value in (("n", "3"), ("guidance", "0")):
        el = drv.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    drv.find_element(By.ID, "generate").click()
    wait.until(lambda d: loaded_images(d, "img.generated") == [32, 32, 32])
    versions = drv.find_element(By.ID, "versions").text
    assert "model folder:" in versions and "w 0" in versions
    assert drv.find_element(By.ID, "error").get_property("hidden")

    # the sweeps of g2p vary
    drv.find_element(By.ID, "vary").click()
    # 6 mutation rates + 7 latitudes: g2p.variation's defaults
    wait.until(lambda d: len(loaded_images(d, "img.sweep")) == 6 + 7 and all(loaded_images(d, "img.sweep")))

    # a pasted bad barcode: the 422 message names the field and the value
    select.select_by_value("")
    box = drv.find_element(By.ID, "barcode")
    box.clear()
    box.send_keys("ACGTQ")
    drv.find_element(By.ID, "generate").click()
    wait.until(lambda d: not d.find_element(By.ID, "error").get_property("hidden"))
    err = drv.find_element(By.ID, "error").text
    assert "422" in err and "barcode='ACGTQ'" in err, err
