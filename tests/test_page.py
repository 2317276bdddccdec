"""The page `train-food serve` answers at `GET /`, driven in a real headless Chromium (Debian's package,
installed by `make browser`) through Playwright: a photo gets its top-5 and the model's version, a text
file gets an error, and the page keeps working at phone width.

Set TRAIN_FOOD_SCREENSHOTS=DIR to keep the screenshots (the README's comes from here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import free_port
from test_serve import MODEL, photos, registry  # noqa: F401 - module-scoped fixtures, rebuilt for this module

from ray_jobs.serving.config import ServeConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_cluster, registry) -> str:  # noqa: F811
    from ray import serve

    from ray_jobs.serving.app import start

    port = free_port()
    start(ServeConfig(tracking_uri=registry, port=port, alias_poll_s=0, replica_cpus=0.5, max_replicas=1))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _keep(path: Path) -> None:
    if os.environ.get("TRAIN_FOOD_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["TRAIN_FOOD_SCREENSHOTS"]) / path.name)


def test_a_photo_gets_its_top_five_and_the_model_version(server, browser, photos, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 900, "height": 1100})
    page.goto(server)
    page.wait_for_function("document.getElementById('model').textContent.includes('version 1')")
    assert f"Model {MODEL} @champion, version 1" in page.inner_text("#model")
    page.set_input_files("#photo", str(photos[0]))  # the file input behind the "Choose a photo" label
    page.wait_for_selector("#result:not([hidden]) #top li")
    rows = page.locator("#top li")
    assert rows.count() == 5
    first = rows.nth(0).inner_text()
    assert "%" in first and page.inner_text("#verdict")
    assert page.inner_text("#error") == ""
    assert page.get_by_label("Choose a photo").count() == 1  # labelled, so keyboards and screen readers find it
    page.screenshot(path=tmp_path / "page.png", full_page=True)
    _keep(tmp_path / "page.png")
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_a_text_file_gets_an_error_and_phone_width_still_works(server, browser, photos, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 375, "height": 800})
    page.goto(server)
    page.wait_for_function("document.getElementById('model').textContent.includes('version 1')")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.set_input_files("#photo", str(notes))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "notes.txt is not a photo" in page.inner_text("#error")
    disguised = tmp_path / "lunch.jpg"  # claims to be a photo: the server's 422 is shown
    disguised.write_text("not a photo either")
    page.set_input_files("#photo", str(disguised))
    page.wait_for_function("document.getElementById('error').textContent.includes('lunch.jpg: request body')")
    assert "not a readable image" in page.inner_text("#error")
    page.set_input_files("#photo", str(photos[1]))
    page.wait_for_selector("#result:not([hidden]) #top li")
    assert page.inner_text("#error") == "" and page.locator("#top li").count() == 5
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page scrolls sideways at phone width ({width} px)"
