"""The smoke settings every fast test builds on: the tiny random model, seconds-long runs (params/smoke.yaml)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Strings, not paths: they also go into papermill parameters and JSON sweep files.
SMOKE = [str(ROOT / "params" / "base.yaml"), str(ROOT / "params" / "smoke.yaml")]
