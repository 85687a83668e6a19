"""The chart serves the dashboard: the lineage Deployment's command (parsed with the real CLI) builds the app
that answers /ui, its Service exposes that port, and the token the chart hands the pod opens the pages.

    .venv/bin/pytest tests/helm/test_dashboard_served.py -q
"""
from __future__ import annotations

import httpx
import pytest
import typer

from fixtures.helm import container_env, find

pytestmark = pytest.mark.helm

FAKE_SECRETS = {"token": "chart-lineage-token", "password": "pw", "pg-password": "pw"}


def test_the_lineage_deployment_serves_the_dashboard(rendered, tmp_path):
    from flashops.api.lineage.auth import load_tokens
    from flashops.api.lineage.serve import start_in_thread
    from flashops.cli.app import app

    objs = rendered["default"]
    pod = find(objs, "Deployment", "flashops-lineage")[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["flashops", "lineage", "serve"]
    serve = typer.main.get_command(app).commands["lineage"].commands["serve"]
    params = serve.make_context("serve", list(c["args"])).params  # raises on an option the CLI lacks
    port = c["ports"][0]["containerPort"]
    assert params["port"] == port and params["host"] == "0.0.0.0"
    (service,) = find(objs, "Service", "flashops-lineage")
    assert service["spec"]["ports"][0]["targetPort"] == c["ports"][0]["name"]
    # a read-only root filesystem: the dashboard serves its templates and static files from the package
    assert c["securityContext"].get("readOnlyRootFilesystem") in (True, None)

    tokens = load_tokens({k: str(v) for k, v in container_env(c, FAKE_SECRETS).items()})
    assert FAKE_SECRETS["token"] in tokens  # what the chart's Secret holds opens the dashboard
    server = start_in_thread(f"sqlite:///{tmp_path / 'lineage.db'}", tokens)  # the chart's app, local database
    try:
        auth = {"Authorization": f"Bearer {FAKE_SECRETS['token']}"}
        for path in ("/ui/pipelines", "/ui/deployments", "/ui/evaluations", "/ui/static/vendor/uPlot.iife.min.js",
                     "/ui/static/vendor/dagre.min.js", "/ui/static/dashboard.js"):
            r = httpx.get(server.url + path, headers=auth)
            assert r.status_code == 200, (path, r.status_code)
        no_token = httpx.get(server.url + "/ui/pipelines")  # no token: to the login form, no data
        assert no_token.status_code == 303 and no_token.headers["location"].startswith("/ui/login")
    finally:
        server.stop()
