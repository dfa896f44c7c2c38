"""Shared test fixtures: where the reference fixtures live, the repository paths and the tiny model's configs."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"


def tiny_files(name: str = "gen_rgb") -> list[Path]:
    """The config files of the tiny built-in model for a task and variant (``"fg2bg_rgba"``)."""
    return [CONFIGS / "model.yaml", CONFIGS / "tasks" / f"{name}.yaml", CONFIGS / "tiny.yaml"]


def tiny(task: str = "gen", variant: str = "rgb") -> list[str]:
    """``--base`` and those files, as a command line takes them."""
    return ["--base", *(str(path) for path in tiny_files(f"{task}_{variant}"))]


def tiny_config(name: str = "gen_rgb", *overrides: str):
    """The tiny model's validated config for a task and variant, with ``--set``-style overrides."""
    from layerflow.config import load_config

    return load_config(tiny_files(name), overrides)


# The fixture set the original's code made for this repository; tests/fixtures/training/ was recorded on it.
SHARED_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "reference"


def reference_fixture_dir() -> Path:
    """The reference fixture directory: $LAYERFLOW_REFERENCE_FIXTURES or ../shared/fixtures/reference.

    Tests on it hold for any set the original's code makes (other sizes, seeds): they read every size
    and value from its files.
    """
    return Path(os.environ.get("LAYERFLOW_REFERENCE_FIXTURES", SHARED_REFERENCE_DIR))


@pytest.fixture(scope="session")
def shared_reference_dir() -> Path:
    """The shared set itself, for data recorded on it (tests/fixtures/training/), whatever the variable says."""
    if not SHARED_REFERENCE_DIR.is_dir():
        pytest.skip(
            f"the recorded training batches belong to the shared reference set {SHARED_REFERENCE_DIR}, "
            f"which is absent (LAYERFLOW_REFERENCE_FIXTURES cannot stand in for it)"
        )
    return SHARED_REFERENCE_DIR


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
