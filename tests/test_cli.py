"""The `jprag` command line: help lists the commands; bad input is a clean error, not a traceback."""

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_jprag(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "jprag", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_help_lists_generate():
    result = _run_jprag("--help")
    assert result.returncode == 0, result.stderr
    assert "generate" in result.stdout


def test_missing_model_path_is_a_clean_error(tmp_path):
    missing = tmp_path / "nonexistent"
    result = _run_jprag("generate", "--model", str(missing), "--prompt", "hi")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("jprag: error:"), result.stderr
    assert str(missing) in result.stderr
