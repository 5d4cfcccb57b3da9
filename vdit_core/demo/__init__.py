"""The bundled demo: a tiny CogVideoX-architecture model of moving shapes, trained by this
project (``python -m vdit_core.demo.build``), shipped in ``vdit_core/demo/model``."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"


def demo_model_path() -> Path:
    """The shipped demo model folder (diffusers layout)."""
    if not (MODEL_DIR / "model_index.json").exists():
        raise FileNotFoundError(
            f"{MODEL_DIR}: the demo model is not there; rebuild it with `python -m vdit_core.demo.build --install`"
        )
    return MODEL_DIR
