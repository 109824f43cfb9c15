"""``/docs`` in a real browser with the network cut: Swagger UI comes from the gateway itself.

Debian's ``chromium`` renders the page headless. It is installed here when missing (as root,
with apt-get); where it cannot be, the test is skipped and says why.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator

import httpx
import pytest

from tests.packages import Unavailable, debian_tool
from tests.servers import Server

#: Flags that keep a headless Chromium from calling out (see the machine notes) and from sandboxing as root.
QUIET = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


#: Installing chromium may wait for another apt-get: that wait is not the test's time.
pytestmark = pytest.mark.timeout(func_only=True)


@pytest.fixture(scope="module")
def chromium() -> Iterator[str]:
    try:
        path = debian_tool("chromium", "chromium")
    except Unavailable as missing:
        pytest.skip(f"Debian's chromium renders /docs, and it is not here: {missing}")
    yield path


def test_docs_work_offline(chromium: str, gateway: Server) -> None:
    assert httpx.get(gateway.url + "/docs/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    with tempfile.TemporaryDirectory() as profile:
        page = subprocess.run(
            [
                chromium, *QUIET, f"--user-data-dir={profile}",
                # The network is cut: everything but loopback goes to a proxy that is not there.
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1",
                "--virtual-time-budget=15000", "--dump-dom", gateway.url + "/docs",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert 'class="swagger-ui' in page.stdout, page.stderr[-2000:]
    assert "/v1/chat/completions" in page.stdout and "opblock" in page.stdout
