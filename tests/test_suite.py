"""Suites (YAML): validation with file:line errors, python tags refused, the shipped examples,
and a tiny suite run end to end through `advbench run`."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robustbench_lite import leaderboard as lb
from robustbench_lite.cli import app
from robustbench_lite.errors import AdvbenchError
from robustbench_lite.specs import with_overrides
from robustbench_lite.suite import load_suite
from robustbench_lite.threat import ThreatModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()

GOOD = """\
name: tiny
dataset: mnist-5k
n_examples: 40
batch_size: 40
seed: 1
device: cpu
models:
  - name: smallcnn
    checkpoint: {ckpt}
threats:
  - norm: linf
    eps: [0.1, 3/10]
  - {{norm: l2, eps: 1.5}}
attacks:
  - fgsm
  - name: pgd
    steps: 2
  - name: pgd
    label: pgd-margin
    steps: 2
    loss: margin
"""


def write(tmp_path, text, name="suite.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_a_valid_suite(tmp_path):
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"x")  # validation only checks that it exists
    s = load_suite(write(tmp_path, GOOD.format(ckpt=ckpt)))
    assert s.name == "tiny"
    assert s.threats == [ThreatModel("linf", 0.1), ThreatModel("linf", 0.3), ThreatModel("l2", 1.5)]
    assert [a.label for a in s.attacks] == ["fgsm", "pgd", "pgd-margin"]
    assert s.attacks[2].params == {"steps": 2, "loss": "margin"}
    (run,) = s.runs(results_dir=str(tmp_path / "r"))
    assert run.model == "smallcnn" and run.checkpoint == str(ckpt) and run.n_examples == 40 and run.seed == 1
    assert run.results_dir == str(tmp_path / "r") and run.device == "cpu" and "suite=tiny" in run.flags


@pytest.mark.parametrize("name", ["suite-mnist.yaml", "suite-cifar10.yaml"])
def test_shipped_examples_are_valid(name):
    s = load_suite(EXAMPLES / name)
    assert s.models and s.threats and s.attacks


def err(tmp_path, text):
    p = write(tmp_path, text)
    with pytest.raises(AdvbenchError) as e:
        load_suite(p)
    return str(e.value).replace(str(p), "S")


def test_unknown_keys_name_the_key_and_the_line(tmp_path):
    assert err(tmp_path, """\
        models: [smallcnn]
        threats:
          - norm: linf
            eps: 0.1
            epz: 0.2
        attacks: [fgsm]
        """) == "S: line 5: unknown key 'epz' in threats[0]; did you mean 'eps'? (expected one of: norm, eps)"
    assert err(tmp_path, """\
        models: [smallcnn]
        threats: [{norm: linf, eps: 0.1}]
        attacks:
          - fgsm
          - name: pgd
            stepz: 3
        """).startswith("S: line 6: unknown key 'stepz' in attacks[1]; did you mean 'steps'?")
    assert err(tmp_path, """\
        modles: [smallcnn]
        """).startswith("S: line 1: unknown key 'modles' in the suite; did you mean 'models'?")
    assert err(tmp_path, """\
        models:
          - name: smallcnn
            activation: silu
        threats: [{norm: linf, eps: 0.1}]
        attacks: [fgsm]
        """).startswith("S: line 3: unknown key 'activation' in models[0] (expected one of: name, checkpoint")


def test_bad_values_name_the_line(tmp_path):
    base = "models: [smallcnn]\nthreats: [{norm: linf, eps: 0.1}]\nattacks: [fgsm]\n"
    assert err(tmp_path, base.replace("eps: 0.1", "eps: 8/0")) == "S: line 2: invalid eps '8/0': division by zero"
    assert err(tmp_path, base.replace("linf", "l3")).startswith("S: line 2: invalid norm 'l3'")
    assert err(tmp_path, base.replace("[fgsm]", "[fgsm, pgx]")).startswith(
        "S: line 3: unknown attack 'pgx'; did you mean 'pgd'?")
    assert err(tmp_path, base.replace("[fgsm]", "\n  - name: pgd\n    steps: 0")).startswith(
        "S: line 4: invalid steps=0 for attack 'pgd'")
    assert err(tmp_path, base.replace("[smallcnn]", "[smalcnn]")).startswith(
        "S: line 1: unknown model 'smalcnn'; did you mean 'smallcnn'?")
    assert err(tmp_path, base + "n_examples: many\n") == "S: line 4: n_examples must be an integer (got 'many')"
    assert err(tmp_path, base + "n_examples: 0\n") == "S: line 4: n_examples must be >= 1 (got 0)"
    assert err(tmp_path, base.replace("[smallcnn]", "\n  - name: smallcnn\n    checkpoint: nope.pt")) == \
        "S: line 3: models[0]: checkpoint not found: nope.pt"
    assert err(tmp_path, base.replace("attacks: [fgsm]\n", "")) == "S: line 1: missing 'attacks' (a list)"
    assert err(tmp_path, base.replace("[fgsm]", "[]")) == "S: line 3: 'attacks' must be a non-empty list"
    assert err(tmp_path, base + "seed: 1\nseed: 2\n") == "S: line 5: key 'seed' appears twice (first on line 4)"


def test_python_tags_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    msg = err(tmp_path, f"""\
        models: [smallcnn]
        threats: [{{norm: linf, eps: 0.1}}]
        attacks: [fgsm]
        name: !!python/object/apply:os.system ["touch {marker}"]
        """)
    assert msg.startswith("S: line 4: tag '!!python/object/apply:os.system' is not allowed")
    assert "safe_load" in msg
    assert not marker.exists()
    assert err(tmp_path, "models: !custom [smallcnn]\n").startswith("S: line 1: tag '!custom' is not allowed")


def test_missing_empty_and_malformed_files(tmp_path):
    with pytest.raises(AdvbenchError, match=r"^suite file not found: .*nope.yaml$"):
        load_suite(tmp_path / "nope.yaml")
    assert err(tmp_path, "") == "S: the suite is empty"
    assert err(tmp_path, "- a\n- b\n") == "S: line 1: a suite is a mapping with models, threats and attacks"
    assert err(tmp_path, "models: [smallcnn\nthreats: x\n").startswith("S: line 2: invalid YAML:")


def test_cli_run_missing_suite_is_one_stderr_line(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2
    assert r.stderr == f"error: suite file not found: {tmp_path / 'none.yaml'}\n"
    p = write(tmp_path, "models: [smallcnn]\nthreats: [{norm: linf, eps: 0.1, p: 2}]\nattacks: [fgsm]\n")
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2
    assert r.stderr == f"error: {p}: line 2: unknown key 'p' in threats[0] (expected one of: norm, eps)\n"


def test_cli_run_a_tiny_suite(tmp_path, trained_smallcnn_path):
    p = write(tmp_path, GOOD.format(ckpt=trained_smallcnn_path))
    results = tmp_path / "results"
    r = runner.invoke(app, ["run", str(p), "--results-dir", str(results), "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["suite"] == "tiny" and len(out["runs"]) == 1
    run = out["runs"][0]
    assert run["n_examples"] == 40 and [t["eps"] for t in run["threats"]] == [0.1, 0.3, 1.5]
    assert list(run["threats"][0]["attacks"]) == ["fgsm", "pgd", "pgd-margin"]
    df = lb.read(results)
    assert len(df) == 3 * 4  # 3 threat models x (3 attacks + worst case)
    assert set(df["flags"]) == {"suite=tiny"} and set(df["run_id"]) == {run["run_id"]}
    run_dir = Path(run["run_dir"])
    assert {f.name for f in run_dir.iterdir()} == {"config.yaml", "summary.json", "outcomes.csv"}
    assert "source: advbench run" in (run_dir / "config.yaml").read_text()
    r = runner.invoke(app, ["run", str(p), "--dry-run"])
    assert r.exit_code == 0 and "suite tiny: 1 model(s) x 3 threat model(s) x 3 attack(s)" in r.stdout


def test_suite_sets_masking_checks_fast_paths_and_an_attacks_own_parameters(tmp_path, trained_smallcnn_path):
    text = f"""\
        n_examples: 20
        device: cpu
        masking_checks: false
        channels_last: true
        models:
          - name: smallcnn
            checkpoint: {trained_smallcnn_path}
        threats: [{{norm: linf, eps: 0.1}}]
        attacks:
          - {{name: apgd-t, steps: 5, n_target_classes: 2, rho: 0.5}}
        """
    s = load_suite(write(tmp_path, text))
    assert s.attacks[0].params == {"steps": 5, "n_target_classes": 2, "rho": 0.5}
    (run,) = s.runs(results_dir=str(tmp_path / "r"))
    assert run.masking_checks is False and run.fast.channels_last is True and run.fast.compile is False
    r = runner.invoke(app, ["run", str(write(tmp_path, text)), "--results-dir", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)["runs"][0]
    summary = json.loads((Path(out["run_dir"]) / "summary.json").read_text())
    assert summary["masking"]["checked"] is False
    assert "n_target_classes: 2" in (Path(out["run_dir"]) / "config.yaml").read_text()
    # fgsm has no rho: refused with the keys it does take
    assert err(tmp_path, text.replace("apgd-t, steps: 5, n_target_classes: 2, ", "fgsm, ")).startswith(
        "S: line 10: unknown key 'rho' in attacks[0]")
    assert err(tmp_path, text.replace("masking_checks: false", "masking_checks: sometimes")) == \
        "S: line 3: masking_checks must be true or false (got 'sometimes')"


def _run_suite_process(tmp_path, text):
    """`advbench run --dry-run` on a suite in a real process, with a timeout guard (a hang fails the
    test instead of the session)."""
    import subprocess
    import sys

    p = tmp_path / "s.yaml"
    p.write_text(text)
    r = subprocess.run([sys.executable, "-m", "robustbench_lite", "run", str(p), "--dry-run"], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path)
    return r, p


def test_recursive_alias_is_refused_not_a_hang(tmp_path):
    r, p = _run_suite_process(tmp_path, "&a [*a]\n")  # 8 bytes: used to spin at 100% CPU in _check_tags
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"error: {p}: line 1: recursive alias: the node anchored here contains an alias of itself\n"
    assert err(tmp_path, "models: [smallcnn]\nthreats: [{eps: 0.1}]\nattacks: [fgsm]\ndescription: &d {x: [1, *d]}\n"
               ) == "S: line 4: recursive alias: the node anchored here contains an alias of itself"


def test_billion_laughs_is_refused_before_it_is_built(tmp_path):
    """Ten aliases of ten aliases of ... : 10**9 nodes once expanded, a few hundred bytes on disk."""
    text = "x0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, 9):
        text += f"x{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n"
    text += "models: [smallcnn]\nthreats: [{eps: 0.1}]\nattacks: [fgsm]\n"
    r, p = _run_suite_process(tmp_path, text)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # x4 (line 5) is the first to pass the limit: 111,111 nodes
    assert r.stderr == f"error: {p}: line 5: this node expands to more than 100,000 YAML nodes through aliases: " \
                       f"too large for a suite\n"
    # aliases that stay small are plain YAML and still work
    s = load_suite(write(tmp_path, "models: &m [smallcnn]\nthreats: [{eps: 0.1}]\nattacks: [fgsm]\n"
                                   "description: &d shared\nname: *d\n"))
    assert s.name == "shared"


def test_attack_fields_of_the_wrong_type_name_the_line(tmp_path):
    base = "models: [smallcnn]\nthreats: [{norm: linf, eps: 0.1}]\nattacks:\n  - name: pgd\n    steps: 2\n"
    assert err(tmp_path, base + "    label: [a, b]\n") == \
        "S: line 6: attacks[0].label must be a string (got ['a', 'b'])"
    assert err(tmp_path, base + "    label: ''\n") == "S: line 6: attacks[0].label must not be empty"
    assert err(tmp_path, base.replace("name: pgd", "name: [pgd]")) == \
        "S: line 4: attacks[0].name must be an attack name (got ['pgd'])"
    assert err(tmp_path, base + "    seed: -1\n") == \
        "S: line 6: attacks[0].seed must be an integer between 0 and 4294967295 (got -1)"
    assert err(tmp_path, base + "seed: -1\n") == "S: line 6: seed must be an integer between 0 and 4294967295 (got -1)"
    # 1e23 is a string to PyYAML (no dot), 1.0e+23 a float: both are a one-line error at the attack's line
    for text in ("1e23", "1.0e+23"):
        assert err(tmp_path, base.replace("steps: 2", f"steps: {text}")).startswith("S: line 4: invalid steps=")
        assert err(tmp_path, base + f"    restarts: {text}\n").startswith("S: line 4: invalid restarts=")


def test_attack_help_states_the_per_attack_defaults():
    """--steps / --alpha / --restarts / --loss differ per attack: the help says so, with the registry's
    numbers (this test keeps the text and the registry in step)."""
    import attacks

    from robustbench_lite.cli import attack_cmd  # noqa: F401  (the command whose help is checked)

    r = runner.invoke(app, ["attack", "--help"], env={"COLUMNS": "400"})
    text = " ".join(r.stdout.replace("│", " ").split())
    d = {n: attacks.ATTACKS.get(n).defaults for n in ("bim", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square")}
    assert f"default per attack: bim {d['bim']['steps']}, pgd {d['pgd']['steps']}, apgd-* {d['apgd-ce']['steps']}, " \
        f"square {d['square']['steps']} queries" in text
    assert f"(default per attack: pgd {d['pgd']['restarts']}, apgd-* {d['apgd-ce']['restarts']}, " \
        f"square {d['square']['restarts']})" in text
    assert f"apgd-dlr {d['apgd-dlr']['loss']}, apgd-t {d['apgd-t']['loss']}, square {d['square']['loss']})" in text
    assert "bim 1.25*eps/steps, pgd 2.5*eps/steps" in text
    assert "else mnist-5k (MNIST digits, 1x28x28) whatever the model" in text


def test_shared_settings_reach_only_the_attacks_that_take_them():
    """`advbench attack --steps/--alpha/--restarts/--loss` go to every attack that takes the setting
    (Attack.overridable), not to square (fixed margin loss, no step size) or fab-t (no loss, no alpha)."""
    specs = {s.label: s.params for s in with_overrides("pgd,square,fab-t", steps=50, alpha="1/255", restarts=2,
                                                        loss="margin")}
    assert specs["pgd"] == {"steps": 50, "alpha": 1 / 255, "restarts": 2, "loss": "margin"}
    assert specs["square"] == {"steps": 50, "restarts": 2} == specs["fab-t"]
    for s in with_overrides("pgd,square,fab-t", steps=50, alpha="1/255", restarts=2, loss="margin"):
        s.build(ThreatModel("linf", 0.1))  # every spec builds: nothing an attack refuses reached it
