"""Schemathesis against the gateway's own OpenAPI document: no 500s, errors and bodies as documented.

Schema-valid requests may still be refused by the backend (a random model name, a nonsense
combination of parameters): that check is left out, every other one runs.
"""

from __future__ import annotations

import subprocess
import sys

from tests.servers import Server

EXAMPLES = 40


def test_openapi_document_holds_under_fuzzing(gateway: Server) -> None:
    result = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", gateway.url + "/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(EXAMPLES), "--seed", "7", "--no-color",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
