"""advbench framework package: registries, threat models, data, models, checkpoints, evaluator,
leaderboard, training loop and CLI. Kept light: nothing heavy is imported here."""

__version__ = "0.1.0"
