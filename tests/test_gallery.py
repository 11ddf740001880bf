"""The mixed-model job and its gallery: model loads bounded, the page opened in a real headless Chromium."""

from __future__ import annotations

import tempfile

import pytest

from helpers import write_manifest
from jobs.demo import write_demo_manifest
from jobs.render import RenderJob, run
from jobs.report import write_report
from storage.results import read_results

pytestmark = pytest.mark.timeout(900)


def test_mixed_models_load_at_most_m_times_workers(tmp_path, tiny_catalog, ray_cluster):
    models = ["tiny-sd", "tiny-lcm", "tiny-sdxl"]
    rows = [{"id": f"r{i:03d}", "prompt": f"p{i}", "model": models[i % 3], "num_inference_steps": 1} for i in range(36)]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    # A budget that holds one checkpoint at a time: only row ordering keeps the loads down.
    report = run(RenderJob(manifest, str(tmp_path / "out"), catalog=tiny_catalog, workers=2, batch_size=4,
                           address=ray_cluster, model_memory_bytes=1))
    assert report.counts == {"ok": 36}
    assert 3 <= report.model_loads <= len(models) * 2
    assert "model loads: " in "\n".join(report.lines())


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,2400",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='rf-chrome-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_demo_gallery_opens_in_chromium(tmp_path, tiny_catalog, ray_cluster):
    out = str(tmp_path / "demo")
    manifest = write_demo_manifest(out, rows=4)
    report = run(RenderJob(manifest, out, catalog=tiny_catalog, workers=2, batch_size=8, address=ray_cluster))
    tasks = {r["task"] for r in read_results(out).to_pylist() if r["status"] == "ok"}
    assert report.counts.get("failed", 0) == 0 and tasks == {"image", "edit", "video", "mesh", "audio"}
    page = write_report(out)
    text = open(page, encoding="utf-8").read()
    assert "http://" not in text and "https://" not in text  # self-contained: nothing fetched
    driver = _chrome()
    try:
        driver.set_page_load_timeout(60)
        driver.get("file://" + page)
        driver.execute_async_script(
            "const done = arguments[0]; const media = [...document.querySelectorAll('video,audio')];"
            "Promise.all(media.map(m => m.readyState >= 2 || m.error ? 0 : new Promise(r => {"
            "m.addEventListener('loadeddata', r); m.addEventListener('error', r); setTimeout(r, 10000);}))).then(done);")
        images = driver.execute_script("return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth])")
        media = driver.execute_script(
            "return [...document.querySelectorAll('video,audio')].map(m => [m.tagName, m.error && m.error.code, m.readyState])")
        driver.save_screenshot(str(tmp_path / "gallery.png"))
    finally:
        driver.quit()
    assert len(images) == report.counts["ok"] - len(media)  # every image, edit and mesh card; the rest are players
    assert all(done and width > 0 for _, done, width in images), images
    assert sorted(t for t, _, _ in media) == ["AUDIO", "AUDIO", "VIDEO", "VIDEO"]
    assert all(err is None and state >= 2 for _, err, state in media), media
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
