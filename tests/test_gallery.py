"""`producer gallery`: a contact sheet in the job's folder, checked in a real headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewstep.storage import open_store
from tests.browser import Chromium, chromium_path
from tests.support import cli, cli_json, run_job
from tests.test_cli_errors import assert_one_line_error

HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def prompt_file(tmp_path: Path) -> Path:
    """15 prompts in three categories; those of C are markup that must show as text."""
    rows = ["Prompt\tCategory\tChallenge\tNote"]
    for i in range(15):
        prompt = f"{HOSTILE} {i}" if i % 3 == 2 else f"a {['red', 'green'][i % 3]} cube number {i}"
        rows.append(f"{prompt}\t{'ABC'[i % 3]}-things\tBasic\t")
    path = tmp_path / "gallery.tsv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return path


def test_gallery_shows_n_images_grouped_by_category_in_a_real_browser(env, output, tmp_path, chromium):
    job = run_job(env, output, "looked-at", prompt_file(tmp_path), tmp_path, "--shard-size", "4")
    local = tmp_path / "local"
    summary = cli_json(
        "producer", "gallery", "looked-at", "--output", output, "--n", "12", "--by", "category",
        "--download", str(local), env=env,
    )  # fmt: skip
    assert summary["images"] == 12 and summary["sampled_from"] == 15
    assert summary["groups"] == {"A-things": 4, "B-things": 4, "C-things": 4}
    store = open_store(job["job_url"])
    assert store.exists("gallery/index.html")
    assert len(list(store.list("gallery/thumbs/"))) == 12

    browser = Chromium(chromium, tmp_path / "profile")
    try:
        tab = browser.open((local / "gallery" / "index.html").as_uri())
        images = browser.evaluate(
            tab,
            "[...document.images]"
            ".map(i => ({src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0}))",
        )
        sections = browser.evaluate(tab, "[...document.querySelectorAll('h2')].map(h => h.textContent)")
        links = browser.evaluate(
            tab, "[...document.querySelectorAll('figure a')].map(a => a.getAttribute('href'))"
        )
        title = browser.evaluate(tab, "document.title")
        scripts = browser.evaluate(tab, "document.scripts.length")
        text = browser.evaluate(tab, "document.body.innerText")
    finally:
        browser.close()
    assert len(images) == 12 and all(i["ok"] for i in images), images
    assert all(i["src"].startswith("thumbs/") for i in images)
    assert sections == ["A-things (4)", "B-things (4)", "C-things (4)"]
    assert title == "looked-at · fewstep gallery" and scripts == 0  # the markup prompts stayed text
    assert text.count(HOSTILE) == 4
    assert all((local / "gallery" / link).resolve().is_file() for link in links)  # full images, relative
    assert "seed " in text and "tiny" in text


def test_gallery_without_grouping_samples_the_same_rows_for_the_same_seed(env, output, tmp_path):
    run_job(env, output, "sampled", prompt_file(tmp_path), tmp_path, "--shard-size", "4")
    first = cli_json("producer", "gallery", "sampled", "--output", output, "--n", "5", env=env)
    again = cli_json("producer", "gallery", "sampled", "--output", output, "--n", "5", env=env)
    assert first["images"] == 5 and first["groups"] is None
    assert first["image_keys"] == again["image_keys"]
    other = cli_json("producer", "gallery", "sampled", "--output", output, "--n", "5", "--seed", "1", env=env)
    assert other["image_keys"] != first["image_keys"]
    bad = cli("producer", "gallery", "sampled", "--output", output, "--by", "colour", env=env, check=False)
    assert_one_line_error(bad, "--by 'colour' is not a field of job sampled", "category")
    assert json.loads(open_store(f"{output}/sampled").get("job.json"))["job"] == "sampled"
