"""The dashboard in a real browser: Debian's Chromium driven by Playwright (no browser download), against a
lineage database filled by the quickstart pipeline (its four stages, shortened to a few steps each on the
debug preset so the fixture takes seconds, not the quickstart's minutes) and the deployment that
`flashops serve -f examples/quickstart.yaml` records.

Screenshots of every page go to the test's tmp dir; FLASHOPS_UI_SCREENSHOTS=docs/ui writes the README's copies.
FLASHOPS_UI_TEST_DB=PATH reuses a lineage.db this fixture recorded before (while iterating on the pages).
"""
import os
import shutil
from pathlib import Path

import httpx
import pytest
import yaml

from lineage._graph import READER, TOKENS, WRITER

CHROMIUM = "/usr/bin/chromium"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The quickstart's stages, data, optimizers and algorithms, with fewer and smaller steps.
SHORT = {"pretrain": {"steps": 4, "batchSize": 2, "seqLen": 64}, "sft": {"steps": 2, "batchSize": 2, "seqLen": 64},
         "dpo": {"steps": 2, "batchSize": 2, "seqLen": 64}, "rl": {"steps": 2, "seqLen": 64}}
# The fixture trains four stages of the debug model: about a minute alone on 2 cores, far more on a busy machine.
pytestmark = pytest.mark.timeout(1800)



@pytest.fixture(scope="session", autouse=True)
def _chromium_installed():
    if not Path(CHROMIUM).exists():  # never skipped: `make test` installs it
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium), as `make test` does")


@pytest.fixture(scope="session")
def quickstart_db(tmp_path_factory):
    """SQLite lineage recorded by the (shortened) quickstart pipeline and its deployment."""
    from flashops.api.lineage import open_lineage
    from flashops.api.spec import parse_object
    from flashops.cli.eval_commands import stage_evaluator
    from flashops.storage import open_store
    from flashops.trainers.runner import run_pipeline

    home = tmp_path_factory.mktemp("ui-home")
    reuse = os.environ.get("FLASHOPS_UI_TEST_DB")  # iterating on the pages: a lineage.db this fixture made before
    if reuse:
        shutil.copy(reuse, home / "lineage.db")
        return f"sqlite:///{home / 'lineage.db'}"
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "quickstart.yaml").read_text()) if d]
    pipeline_doc = next(d for d in docs if d["kind"] == "TrainingPipeline")
    for stage in pipeline_doc["spec"]["stages"]:
        spec = stage["spec"]
        if spec["stage"] == "eval":  # the real eval stages, on the chat smoke suite with few tokens
            spec["eval"] = {"suites": ["builtin:chat-smoke"], "maxTokens": 4}
            continue
        spec["training"] = {**spec["training"], **SHORT[spec["stage"]]}
        spec["checkpoint"] = {"every": 2, "keep": 3}
        if spec["optimizer"].get("warmupSteps"):
            spec["optimizer"]["warmupSteps"] = 1
        if spec["stage"] == "pretrain":
            spec["pretrain"] = {**spec["pretrain"], "mtpFromStep": 2}
        if spec["stage"] == "rl":
            spec["rl"] = {**spec["rl"], "groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4,
                          "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 8}}
    url = f"sqlite:///{home / 'lineage.db'}"
    lineage = open_lineage(url)
    old = os.environ.get("FLASHOPS_HOME")
    os.environ["FLASHOPS_HOME"] = str(home)
    try:
        _, model_uri = run_pipeline(parse_object(pipeline_doc), open_store(f"file://{home}/store"), lineage,
                                    evaluate=stage_evaluator(lineage, progress=False))
    finally:
        if old is None:
            os.environ.pop("FLASHOPS_HOME", None)
        else:
            os.environ["FLASHOPS_HOME"] = old
    deployment = next(d for d in docs if d["kind"] == "ModelDeployment")
    lineage.add_deployment(model_uri, deployment["metadata"]["name"], None, None, 100)  # as `flashops serve -f` does
    lineage.close()
    return url


@pytest.fixture(scope="session")
def ui_server(quickstart_db):
    from flashops.api.lineage.serve import start_in_thread

    server = start_in_thread(quickstart_db, TOKENS)
    yield server
    server.stop()


# Module scope, not session: sync_playwright runs an asyncio loop in this thread while it is
# open, and any later test that starts its own loop (asyncio.run, pytest-asyncio) would fail
# with "cannot be called from a running event loop".
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.on("pageerror", lambda e: pg.console_errors.append(f"uncaught: {e}"))
    pg.on("requestfailed", lambda r: pg.console_errors.append(f"request failed: {r.url}"))
    yield pg
    context.close()


def shot(page, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000  # a real picture, not a blank page
    target = os.environ.get("FLASHOPS_UI_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def visit(page, url: str):
    response = page.goto(url)
    page.wait_for_load_state("networkidle")
    assert response.status == 200, (url, response.status)
    assert page.console_errors == [], (url, page.console_errors)
    return response


@pytest.mark.slow
def test_every_page_in_chromium(ui_server, page, tmp_path):
    base = ui_server.url
    # a pasted link first asks for the token, then lands on the page it named
    page.goto(f"{base}/ui/deployments")
    assert page.locator("#login").is_visible()
    page.fill("input[name=token]", READER)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/ui/deployments")
    assert page.console_errors == []

    # pipelines and runs: the quickstart with its four stages, all succeeded
    visit(page, f"{base}/ui/pipelines")
    assert page.locator("#pipeline-list").get_by_text("quickstart", exact=True).is_visible()
    shot(page, "pipelines", tmp_path)
    page.click("#pipeline-list a:text-is('quickstart')")
    page.wait_for_load_state("networkidle")
    assert page.url == f"{base}/ui/pipelines/quickstart"
    assert page.locator("tr.stage").count() == 4
    assert page.locator("tr.stage[data-status=succeeded]").count() == 4
    assert page.locator(".summary").inner_text() == "4 of 4 stages succeeded"
    assert page.console_errors == []
    shot(page, "pipeline", tmp_path)

    # a run: curves with points for each metric, checkpoints with their verification state
    for stage, expected in (("pretrain", ("Loss", "Learning rate", "Tokens per second")),
                            ("rl", ("Reward", "Entropy", "Ratio drift (mean |log r|)"))):
        page.goto(f"{base}/ui/pipelines/quickstart")
        page.click(f"tr.stage a:text-is('quickstart-{stage}')")
        page.wait_for_load_state("networkidle")
        assert page.console_errors == []
        charts = page.locator("figure.chart[data-points]")
        titles = [t.strip() for t in page.locator("figure.chart figcaption").all_inner_texts()]
        for title in expected:
            assert title in titles, (stage, titles)
        assert charts.count() == len(titles)
        for i in range(charts.count()):
            assert int(charts.nth(i).get_attribute("data-points")) > 0
        assert page.locator("figure.chart canvas").count() >= len(titles)
        assert page.locator("#checkpoints .verify.verified").count() >= 1
        shot(page, f"run-{stage}", tmp_path)

    # the deployment's lineage graph reaches all four datasets, through every stage; a click opens a node
    visit(page, f"{base}/ui/deployments")
    shot(page, "deployments", tmp_path)
    page.click("table.deployments a:text-is('what produced it')")
    page.wait_for_load_state("networkidle")
    assert page.console_errors == []
    drawn = page.locator("#graph svg g.node")
    assert int(page.locator("#graph").get_attribute("data-drawn")) == drawn.count()
    labels = drawn.locator("title").all_text_contents()
    for ds in ("builtin:pretrain-text", "builtin:sft-chat", "builtin:dpo-pairs", "builtin:rl-tasks"):
        assert any(f"dataset {ds} " in t for t in labels), labels
    for run in ("quickstart-pretrain", "quickstart-sft", "quickstart-dpo", "quickstart-rl"):
        assert any(f"run {run} " in t for t in labels), labels
    assert page.locator("#graph svg g.node.root[data-type=deployment]").count() == 1
    shot(page, "graph", tmp_path)
    page.click("#graph svg g.node[data-type=dataset] >> nth=0")
    page.wait_for_load_state("networkidle")
    assert "/ui/nodes/" in page.url and page.locator("h1").inner_text().startswith("Dataset builtin:")
    page.click("#dir-down")  # from any node, down as well as up
    page.wait_for_load_state("networkidle")
    assert page.locator("#graph svg g.node[data-type=deployment]").count() >= 1
    assert page.console_errors == []

    # evaluations: the two eval stages' records (SFT and RL checkpoints), per mode, and the efficiency plot
    visit(page, f"{base}/ui/evaluations")
    assert page.locator("#eval-table").is_visible() and page.locator("#no-evaluations").count() == 0
    rows = page.locator("#eval-table tbody tr").all_inner_texts()
    assert len(rows) == 4 and all("builtin:chat-smoke" in r for r in rows), rows
    assert sum("quickstart-sft step-" in r for r in rows) == 2 and sum("quickstart-rl step-" in r for r in rows) == 2
    assert sum("non-thinking" in r for r in rows) == 2 and "k=1" in rows[0]
    assert page.console_errors == []
    shot(page, "evaluations", tmp_path)


def test_the_graph_is_the_cli_graph(ui_server, quickstart_db):
    """The same walk `flashops lineage graph quickstart-chat --up --depth 30` prints, node for node."""
    from flashops.api.lineage import open_lineage
    from flashops.api.lineage.render import tree

    lin = open_lineage(quickstart_db)
    dep = lin.find("quickstart-chat")
    walk = lin.ancestors(dep, depth=30)
    lin.close()
    r = httpx.get(f"{ui_server.url}/ui/nodes/{dep}?direction=up&depth=30", headers={"Authorization": f"Bearer {READER}"})
    assert r.status_code == 200
    import html as html_lib
    assert html_lib.escape(tree(walk), quote=False) in r.text


@pytest.mark.slow
def test_a_wrong_token_gets_the_login_prompt_and_no_data(ui_server, page, tmp_path):
    base = ui_server.url
    page.goto(f"{base}/ui/pipelines/quickstart")
    assert page.locator("#login").is_visible()
    page.fill("input[name=token]", "not-a-token")
    page.click("button[type=submit]")
    page.wait_for_load_state("networkidle")
    assert page.locator("#login").is_visible() and page.locator(".error").is_visible()
    assert page.console_errors == []
    body = page.content()
    assert "quickstart-pretrain" not in body and "builtin:" not in body and "tr class=\"stage\"" not in body
    shot(page, "login", tmp_path)
    # a token without the read scope is refused the same way; so is a wrong bearer header
    r = httpx.get(f"{base}/ui/pipelines", headers={"Authorization": "Bearer nope"})  # a script: 401, the form only
    assert r.status_code == 401 and 'id="login"' in r.text and "quickstart" not in r.text
    r = httpx.get(f"{base}/ui/pipelines", headers={"Cookie": "flashops_lineage_token=nope"})  # a browser: the form
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=%2Fui%2Fpipelines")
    r = httpx.get(f"{base}/ui/pipelines", headers={"Cookie": "flashops_lineage_token=nope"}, follow_redirects=True)
    assert r.status_code == 200 and 'id="login"' in r.text and "quickstart" not in r.text and "not accepted" in r.text
    r = httpx.get(f"{base}/ui/find?ref=quickstart-pretrain", headers={"Authorization": f"Bearer {READER}"},
                  follow_redirects=True)  # the right header opens the same page
    assert r.status_code == 200 and "/ui/runs/" in str(r.url) and "Run quickstart-pretrain" in r.text
    # the login page sends nobody away from the dashboard
    r = httpx.post(f"{base}/ui/login", data={"token": READER, "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/pipelines"
