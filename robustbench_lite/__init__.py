"""advbench framework package: registries, threat models, data, models, checkpoints, evaluator,
leaderboard, training loop and CLI. Kept light: nothing heavy is imported here.

``robustbench_lite.benchmark`` (api.benchmark, the Python API) is looked up on first use (PEP 562),
so that ``import robustbench_lite`` (and every module's import of it) stays light and on rung 0."""
import importlib

__version__ = "0.1.0"
__all__ = ["benchmark"]


def __getattr__(name: str):
    if name == "benchmark":
        return importlib.import_module(".api", __name__).benchmark
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
