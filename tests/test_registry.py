import pytest

from robustbench_lite.errors import AdvbenchError, UnknownNameError
from robustbench_lite.registry import Registry


def test_register_create_names_and_aliases():
    reg = Registry("widget")

    @reg.register("alpha", aliases=("a",))
    def make_alpha(size=1):
        """An alpha widget."""
        return ("alpha", size)

    reg.register("beta", lambda: "beta", help="b")
    assert reg.names() == ["alpha", "beta"]
    assert reg.create("alpha", size=3) == ("alpha", 3)
    assert reg.create("A") == ("alpha", 1)
    assert reg.create("ALPHA") == ("alpha", 1)
    assert dict(reg.describe()) == {"alpha": "An alpha widget.", "beta": "b"}
    assert "beta" in reg and "gamma" not in reg


def test_unknown_name_lists_close_matches():
    reg = Registry("model")
    for n in ("resnet18", "resnet34", "smallcnn"):
        reg.register(n, lambda: n)
    with pytest.raises(UnknownNameError) as e:
        reg.create("resnt18")
    msg = str(e.value)
    assert msg.startswith("unknown model 'resnt18'; did you mean 'resnet18'")
    assert "(known: resnet18, resnet34, smallcnn)" in msg
    assert isinstance(e.value, AdvbenchError)


def test_duplicate_registration_is_refused():
    reg = Registry("thing")
    reg.register("x", lambda: 1)
    with pytest.raises(ValueError):
        reg.register("x", lambda: 2)


def test_prefix_factories():
    reg = Registry("dataset")
    reg.register_prefix("npz:", lambda rest, **kw: ("npz", rest, kw), placeholder="PATH")
    assert reg.create("npz:/a/b.npz", k=1) == ("npz", "/a/b.npz", {"k": 1})
    with pytest.raises(AdvbenchError, match="needs something after 'npz:'"):
        reg.create("npz:")
    assert reg.describe()[-1][0] == "npz:PATH"


def test_builtin_registries_share_the_class():
    import attacks
    from defenses import methods
    from robustbench_lite.data import DATASETS
    from robustbench_lite.models import MODELS
    from defenses.activations import ACTIVATIONS

    for reg in (attacks.ATTACKS, methods.METHODS, DATASETS, MODELS, ACTIVATIONS):
        assert isinstance(reg, Registry)
    assert {"fgsm", "bim", "pgd"} <= set(attacks.names())
    assert {"relu", "silu", "gelu", "elu", "softplus", "smoothrelu"} <= set(ACTIVATIONS.names())
    assert "mnist-5k" in DATASETS.names()
    assert {"smallcnn", "lenet", "resnet18", "resnet34", "resnet50", "preact-resnet18", "wrn-28-10",
            "wrn-34-10"} <= set(MODELS.names())


def test_import_attacks_does_not_pull_the_cli():
    import subprocess
    import sys

    code = "import sys, attacks; attacks.names(); print('robustbench_lite.cli' in sys.modules, " \
           "'robustbench_lite.evaluator' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
