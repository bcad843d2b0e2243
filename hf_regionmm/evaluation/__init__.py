"""Offline evaluation metrics, each a local `evaluate` module shipped inside this package.

``evaluate.load("accuracy")``-style names resolve on the Hugging Face Hub, which is not reachable offline (and
evaluate 0.4.x bundles no metric scripts). The metrics of this library live in ``metrics/<name>/<name>.py`` and are
loaded by file path, which evaluate handles with its local-module factory: no network call is made, with or without
``HF_HUB_OFFLINE=1``. Pure helpers shared by several metrics are in :mod:`hf_regionmm.evaluation.functional`.

Example::

    from hf_regionmm.evaluation import load_metric

    rec = load_metric("rec_accuracy")
    rec.compute(predictions=[[10, 10, 50, 50], []], references=[[12, 10, 50, 52], [0, 0, 5, 5]])
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import evaluate

# A real directory, not an importlib.resources Traversable: evaluate copies the script from a filesystem path into
# its module cache, and the package is installed unzipped (editable or wheel), so the path always exists.
_METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def available_metrics() -> list[str]:
    """Names accepted by :func:`load_metric`, sorted (one per ``metrics/<name>/<name>.py``)."""
    return sorted(path.name for path in _METRICS_DIR.iterdir() if (path / f"{path.name}.py").is_file())


def load_metric(name: str, **kwargs) -> evaluate.EvaluationModule:
    """Load a packaged metric by name, offline.

    Args:
        name: one of :func:`available_metrics` (e.g. ``"rec_accuracy"``, ``"cider_d"``, ``"detection_ap"``).
        **kwargs: forwarded to ``evaluate.load`` (``config_name``, ``keep_in_memory``, ``cache_dir``,
            ``experiment_id``, ``num_process``/``process_id`` for distributed evaluation, ...).

    Returns:
        The ``evaluate.EvaluationModule``; call ``.compute(predictions=..., references=..., **options)`` on it.

    Raises:
        ValueError: ``name`` is not a packaged metric.
    """
    import evaluate
    from evaluate.utils.file_utils import DownloadConfig

    names = available_metrics()
    if name not in names:
        raise ValueError(f"`name` must be one of the packaged metrics {names}; got {name!r}.")
    # Local scripts need no download; local_files_only makes sure nothing else (e.g. a stray hub lookup) is tried.
    kwargs.setdefault("download_config", DownloadConfig(local_files_only=True))
    return evaluate.load(str(_METRICS_DIR / name / f"{name}.py"), **kwargs)


__all__ = ["available_metrics", "load_metric"]
