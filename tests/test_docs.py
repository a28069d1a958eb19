"""The API documentation, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), works without internet.

A home's backend is often offline: the pages must load their scripts, styles and icon from the
service itself. Checked twice: every asset a page names is served by the service, and the pages
render every operation in headless Chromium against a real ``dmft serve`` while no request of
theirs leaves for another origin (their Content-Security-Policy blocks what their bundles would
fetch from elsewhere).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tools.cdp import Page
from tools.stack import Server, run_service

from .service_fixtures import memory_settings

DOCS = ("/docs", "/redoc")
RENDER_WAIT_S = 60.0


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(memory_settings())) as client:
        yield client


@pytest.mark.parametrize("path", DOCS)
def test_docs_pages_name_only_assets_the_service_serves(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text and "https://" not in response.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', response.text)
    assert len(assets) >= 2, response.text  # a script, and a style sheet or an icon
    for asset in assets:
        assert asset.startswith("/"), asset
        answer = client.get(asset)
        assert answer.status_code == 200 and answer.content, asset


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with run_service(tmp_path) as running:
        yield running


def test_docs_render_every_operation_offline_in_a_browser(page: Page, server: Server, tmp_path: Path) -> None:
    schema = httpx.get(f"{server.base}/openapi.json", trust_env=False).json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    page.call("Network.enable")

    page.goto(f"{server.base}/docs")
    page.wait_for(f"document.querySelectorAll('.opblock').length === {operations}", timeout_s=RENDER_WAIT_S)
    page.screenshot(tmp_path / "swagger-ui.png")

    page.goto(f"{server.base}/redoc")
    every_path = " && ".join(f"document.body.innerText.includes({path!r})" for path in schema["paths"])
    page.wait_for(every_path, timeout_s=RENDER_WAIT_S)
    page.screenshot(tmp_path / "redoc.png")

    sent = [url for request, url in page.requests.items() if request not in page.blocked]
    elsewhere = [url for url in sent if not url.startswith((server.base, "data:", "blob:"))]
    assert not elsewhere, f"the docs asked another origin for {elsewhere}"
