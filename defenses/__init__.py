"""Defense plugins, one module per kind:

    defenses.activations   smooth activations (ACTIVATIONS: softplus, silu, gelu, elu, smoothrelu,
                           relu with a smooth backward pass), used by every model (robustbench_lite.models)
    defenses.methods       training methods (METHODS: standard, pgd-at, fgsm-rs, trades, mix) and
                           create() / names(), used by the training loop
    defenses.averaging     weight averaging (SWA, EMA)

Third-party activations and methods register through the ``advbench.defenses`` entry-point group.
This file imports nothing: models need the activations without the training methods (which sit
above the attacks).
"""
