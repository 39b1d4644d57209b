"""DDP on CPU: 2 gloo processes started by torchrun give the single-process numbers."""
import json
import os
import shutil
import subprocess
import sys

import pytest


def _torchrun(args, cwd, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "robustbench_lite", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _single(args, cwd):
    return subprocess.run([sys.executable, "-m", "robustbench_lite", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _strip(summary):
    """Numbers that must match exactly (timings and run ids may differ)."""
    out = {"clean_acc": summary["clean_acc"], "n_examples": summary["n_examples"]}
    for t in summary["threats"]:
        for label, a in t["attacks"].items():
            out[(t["eps"], label)] = (a["robust_acc"], a["n_fooled"], a["mean_norm"], a["max_norm"])
        out[(t["eps"], "worst")] = t["worst_case"]["robust_acc"] if isinstance(t.get("worst_case"), dict) \
            else t.get("worst_case_acc")
    return out


def test_ddp_attack_equals_single_process(tmp_path, trained_smallcnn_path):
    models = tmp_path / "res" / "models"
    models.mkdir(parents=True)
    shutil.copy(trained_smallcnn_path, models / "smallcnn-mnist-5k-standard.pt")
    args = ["attack", "--model", "smallcnn", "--eps", "0.1,0.2", "--n-examples", "120", "--attack", "fgsm,pgd",
            "--restarts", "2", "--results-dir", "res", "--device", "cpu", "--json", "--batch-size", "50"]
    single = _single(args, tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = _torchrun(args, tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = json.loads(single.stdout), json.loads(ddp.stdout)
    assert _strip(a) == _strip(b)
    assert b["n_examples"] == 120
    rows = (tmp_path / "res" / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * (2 * 3)  # header + 2 runs x 2 eps x (2 attacks + worst case): rank 1 wrote none
    assert "ddp=2" in rows[-1]
