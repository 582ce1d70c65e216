import sys
from pathlib import Path

import pytest

# the training scripts live at the top of the repository, beside mindiffusion/
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindiffusion import cli  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Send every download to a closed local port, so that it fails at once."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)


def run_script(train, argv, capsys):
    """Run a training function through its command line; return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(train, "", argv)
    return exit_info.value.code, capsys.readouterr().err
