"""The dashboard's page data and templates without a browser: evaluation records (the shape the evaluation
feature records) become side-by-side rows and per-mode points; a failed run says why; pages answer through
the real app with the header token, and a page with no data says so."""
import httpx
import pytest

from flashops.api.lineage.ui import pages, templates

from lineage._graph import READER, record_pipeline

EVAL = {"id": 7, "label": "quickstart-rl step-15", "result": {"suites": [
    {"name": "builtin:rl-heldout", "modes": [
        {"mode": "thinking", "accuracy": 0.62, "mean_tokens": 410.0, "accuracy_per_1k_tokens": 1.51,
         "acceptance_length": 2.1},
        {"mode": "non-thinking", "accuracy": 0.48, "mean_tokens": 95.0, "accuracy_per_1k_tokens": 5.05}]}]}}


def test_evaluation_records_become_rows_and_points_per_mode():
    table = pages.evaluation_table([EVAL])
    assert [(r["suite"], r["mode"], r["accuracy"]) for r in table["rows"]] == [
        ("builtin:rl-heldout", "thinking", 0.62), ("builtin:rl-heldout", "non-thinking", 0.48)]
    assert [(p["mode"], p["x"], p["y"]) for p in table["points"]] == [("thinking", 410.0, 0.62),
                                                                     ("non-thinking", 95.0, 0.48)]
    html = templates().get_template("evaluations.html").render(e=table, page="evaluations")
    assert 'id="eval-table"' in html and 'id="efficiency"' in html and "non-thinking" in html
    assert 'id="no-evaluations"' not in html
    empty = templates().get_template("evaluations.html").render(e=pages.evaluation_table([]), page="evaluations")
    assert 'id="no-evaluations"' in empty and 'id="eval-table"' not in empty


def test_a_run_says_why_it_is_in_its_state():
    assert pages.reason_of("failed", {"step": 12}) == "failed at step 12"
    assert pages.reason_of("failed", {"reason": "BackoffLimitExceeded", "message": "pod OOMKilled"}) == \
        "BackoffLimitExceeded: pod OOMKilled"
    assert pages.reason_of("succeeded", {"loss": 1.0}) == ""


@pytest.mark.postgres
def test_pages_through_the_api_with_the_header_token(lineage_server):
    from flashops.api.lineage import open_lineage

    lin = open_lineage(lineage_server.url, token="writer-token-456")
    ids = record_pipeline(lin)
    lin.record_metrics(ids["pre"], [{"step": s, "loss": 3.0 - s / 100, "lr": 1e-3} for s in range(1, 51)])
    broken = lin.start_run("broken", "TrainingRun", "sft", {"training": {"steps": 40}}, "sha256:b")
    lin.finish_run(broken, "failed", {"step": 17})
    lin.close()
    auth = {"Authorization": f"Bearer {READER}"}
    get = lambda path: httpx.get(lineage_server.url + path, headers=auth, follow_redirects=False)  # noqa: E731
    r = get("/ui/pipelines/quickstart")
    assert r.status_code == 200 and r.text.count('class="stage"') == 2 and "2 of 2 stages succeeded" in r.text
    r = get(f"/ui/runs/{ids['pre']}")
    assert r.status_code == 200 and '"loss"' in r.text and "complete, manifest sha256:m2" in r.text
    r = get("/ui/pipelines")
    assert "failed at step 17" in r.text and "17/40" in r.text  # a standalone run: its progress and reason
    assert get("/ui/runs/999999").status_code == 404
    assert get(f"/ui/runs/{ids['ds']}").status_code == 404  # a dataset has no run page
    r = get("/ui/find?ref=quickstart-sft")
    assert r.status_code == 303 and r.headers["location"] == f"/ui/runs/{ids['sft']}"
    r = get(f"/ui/nodes/{ids['final']}?direction=up&depth=10")
    assert r.status_code == 200 and "builtin:pretrain-text" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    assert get("/ui/deployments").status_code == 200 and "Nothing is serving" in get("/ui/deployments").text


def test_flashops_ui_serves_the_local_lineage_on_localhost_logged_in(tmp_path):
    """`flashops ui --no-open` prints a link on 127.0.0.1 that logs the browser in (read-only) and lands on the
    pipelines; the token leaves the URL at once; bad input exits 2 before anything starts."""
    import os
    import re
    import subprocess
    import sys
    import time
    from pathlib import Path

    from flashops.api.lineage import open_lineage

    db = tmp_path / "lineage.db"
    lin = open_lineage(f"sqlite:///{db}")
    record_pipeline(lin)
    lin.close()
    flashops = str(Path(sys.executable).parent / "flashops")
    bad = subprocess.run([flashops, "ui", "--db", "mysql://x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--db 'mysql://x'" in bad.stderr
    proc = subprocess.Popen([flashops, "ui", "--no-open", "--port", "0", "--db", f"sqlite:///{db}"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "FLASHOPS_LINEAGE_TOKEN": ""})
    try:
        link, deadline = None, time.time() + 120
        while link is None and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "flashops ui exited"
            found = re.search(r"open: (http://127\.0\.0\.1:\d+/ui/login\?token=\S+)", line)
            link = found and found.group(1)
        assert link, "flashops ui printed no link"
        with httpx.Client() as browser:
            first = browser.get(link)
            assert first.status_code == 303 and first.headers["location"] == "/ui/pipelines"
            page = browser.get(link.split("/ui/")[0] + "/ui/pipelines")  # the session cookie, no token in the URL
            assert page.status_code == 200 and "quickstart" in page.text
            assert browser.post(link.split("/ui/")[0] + "/v1/datasets", json={"uri": "s3://x"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.postgres
def test_pipelines_come_in_pages_newest_first(lineage_server):
    import re

    store = lineage_server.store
    with store.batch():
        for i in range(30):
            run = store.start_run(f"p{i:02d}-pretrain", "TrainingRun", "pretrain", {}, f"sha256:{i}", pipeline=f"p{i:02d}")
            store.finish_run(run, "succeeded")
    auth = {"Authorization": f"Bearer {READER}"}
    first = httpx.get(lineage_server.url + "/ui/pipelines", headers=auth)
    shown = re.findall(r'href="/ui/pipelines/(p\d\d)"', first.text)
    assert len(shown) == 25 and shown[0] == "p29"  # the most recently active first
    older = re.search(r'id="older" href="([^"]+)"', first.text).group(1).replace("&amp;", "&")
    second = httpx.get(lineage_server.url + older, headers=auth)
    rest = re.findall(r'href="/ui/pipelines/(p\d\d)"', second.text)
    assert sorted(shown + rest) == [f"p{i:02d}" for i in range(30)] and 'id="older"' not in second.text


@pytest.mark.postgres
def test_a_running_pipeline_refreshes_itself(lineage_server):
    store = lineage_server.store
    run = store.start_run("live-pretrain", "TrainingRun", "pretrain", {"training": {"steps": 100}}, "sha256:l",
                          pipeline="live")
    store.record_metrics(run, [{"step": s, "loss": 1.0} for s in range(1, 31)])
    auth = {"Authorization": f"Bearer {READER}"}
    for path, fragment in (("/ui/pipelines", "/ui/pipelines?fragment=true"),
                           ("/ui/pipelines/live", "/ui/pipelines/live?fragment=true")):
        page = httpx.get(lineage_server.url + path, headers=auth).text
        assert f'hx-get="{fragment}"' in page and 'hx-trigger="every 10s"' in page  # htmx polls while it runs
        part = httpx.get(lineage_server.url + fragment, headers=auth).text
        assert part.lstrip().startswith("<div id=") and "<html" not in part  # only the table is swapped in
    assert "30/100" in httpx.get(lineage_server.url + "/ui/pipelines/live", headers=auth).text
    store.finish_run(run, "succeeded")
    assert "hx-trigger" not in httpx.get(lineage_server.url + "/ui/pipelines/live", headers=auth).text
