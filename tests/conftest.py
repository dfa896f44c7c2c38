"""Shared test fixtures: where the reference fixtures live and the repository paths."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def reference_fixture_dir() -> Path:
    """The reference fixture directory: $LAYERFLOW_REFERENCE_FIXTURES or ../shared/fixtures/reference."""
    default = REPO_ROOT.parent / "shared" / "fixtures" / "reference"
    return Path(os.environ.get("LAYERFLOW_REFERENCE_FIXTURES", default))


@pytest.fixture(scope="session", autouse=True)
def layerflow_cache(tmp_path_factory) -> Path:
    """Built files (the tiny T5) go to a folder of this test session, never into the real home or the cwd;
    subprocesses inherit it. An explicit ``LAYERFLOW_CACHE`` is kept."""
    if not os.environ.get("LAYERFLOW_CACHE"):
        os.environ["LAYERFLOW_CACHE"] = str(tmp_path_factory.mktemp("layerflow-cache"))
    return Path(os.environ["LAYERFLOW_CACHE"])


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The fixture directory; tests that need it skip only when the whole directory is absent."""
    path = reference_fixture_dir()
    if not path.is_dir():
        pytest.skip(f"reference fixtures not found at {path} (set LAYERFLOW_REFERENCE_FIXTURES)")
    return path


def reference_cases() -> list[str]:
    """Names of the per-case folders (those holding a config.json) in the fixture directory."""
    path = reference_fixture_dir()
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="session")
def model_parallel() -> None:
    """SAT's model-parallel group, which building a network needs (the callers create it, as the CLI does)."""
    from layerflow.runtime.distributed import ensure_model_parallel

    ensure_model_parallel()
