"""Defense plugins: smooth activations (defenses.activations), training methods
(defenses.methods: standard, pgd-at, fgsm-rs, trades, mix) and weight averaging.

Training methods register in ``METHODS``; third-party ones through the ``advbench.defenses``
entry-point group.
"""
from robustbench_lite.registry import Registry

METHODS = Registry("defense", builtin_modules=("defenses.methods",), entry_point_group="advbench.defenses")


def create(name: str, **kwargs):
    return METHODS.create(name, **kwargs)


def names():
    return METHODS.names()
