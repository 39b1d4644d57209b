"""The leaderboard and the per-run record.

``<results>/leaderboard.csv`` is the source of truth: one row per run x threat model x attack,
plus one ``worst-case`` row per run x threat model; ``mode`` says how the run's attacks ran
(per-attack: each on every clean-correct sample; cascade: each on the survivors of the earlier
ones, its robust accuracy the one after it) and ``evaluation`` what its worst case is (the
reportable suite its attacks cover, standard or autoattack, or weak: an upper bound from weak
attacks only; rows older than these columns read as per-attack and weak). ``<results>/leaderboard.md``
is rendered from it (pandas): one section per dataset x threat model, one row per model entry
(model, checkpoint sha256 (its first 12 hex digits), defense, activation), columns n, evaluation,
clean / each attack / worst case. A leaderboard ranks by the strongest evidence, as RobustBench
reports the strongest known attack: each entry shows, of all its runs at that threat model, a
reportable run before a weak one, then the run with the LOWEST worst-case robust accuracy (ties:
the one with more examples, then the latest), so a stronger later evaluation (APGD, more steps)
replaces a weaker one, and a weak quick run never hides it. Entries with a reportable worst case
come first, then those with an upper bound (marked ≤), each sorted by worst case. ``render_html``
is that markdown as one self-contained page (webpage.page: tables sortable by any column) with each
dataset x norm's robustness curves (``robustness_curves``) embedded: the rows are rendered once.

Every run also gets ``<results>/runs/<run_id>/`` with ``config.yaml`` (the resolved
configuration), ``summary.json`` and ``outcomes.csv`` (per-sample outcomes).

Safety: appends hold an exclusive lock on ``leaderboard.csv.lock`` while they read the CSV,
append, write a temp file and rename it over the CSV, then re-render the markdown; concurrent
runs lose no row and a crash never leaves a partial row. A corrupt CSV is never overwritten
(the append fails with an AdvbenchError naming it). A run's record is all or nothing: both
destinations are checked before anything is written, and if the markdown cannot be replaced
after the CSV was, the previous CSV (its bytes and mtime) is put back.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import pandas as pd
import yaml

from . import __version__
from .errors import AdvbenchError
from .fileio import atomic_write, atomic_write_text, csv_text, ensure_dir, locked, not_a_file
from .runtime import pct
from .specs import PER_ATTACK, WEAK, WORST_CASE
from .threat import check_norm, format_eps
from .webpage import figure_data_uri, page, pyplot

CSV_NAME = "leaderboard.csv"
MD_NAME = "leaderboard.md"

COLUMNS = [
    "run_id", "timestamp", "model", "checkpoint", "checkpoint_sha256", "dataset", "dataset_sha256", "n_examples",
    "norm", "eps",
    "attack", "attack_params", "clean_acc", "robust_acc", "success_rate", "mean_norm", "max_norm", "seconds",
    "images_per_s", "device", "seed", "defense", "defense_params", "activation", "version", "flags",
    "mode", "evaluation",
]
# rows written before these columns existed: every attack ran on all clean-correct samples, and no
# run covered AutoAttack's standard set (the old `--suite standard` had no FAB-T and no Square)
OLD_ROWS = {"mode": PER_ATTACK, "evaluation": WEAK}
REQUIRED = ("run_id", "model", "dataset", "norm", "eps", "attack", "clean_acc", "robust_acc")
NUMERIC = ("eps", "clean_acc", "robust_acc")


# --- run ids and run folders -------------------------------------------------------------------
def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<8 hex>``: sortable by time, unique across concurrent processes."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def create_run_dir(results_dir) -> tuple:
    """Create ``<results>/runs/<run_id>/`` exclusively; returns (run_id, path)."""
    runs = ensure_dir(Path(results_dir) / "runs")
    for _ in range(100):
        run_id = new_run_id()
        path = runs / run_id
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise AdvbenchError(f"cannot create run folder {path}: {exc.strerror or exc}") from None
        return run_id, path
    raise AdvbenchError(f"cannot create a fresh run folder under {runs}")  # pragma: no cover


def write_run_files(run_dir, config: Mapping[str, Any], summary: Mapping[str, Any],
                    outcomes: Sequence[Mapping[str, Any]]) -> None:
    run_dir = Path(run_dir)
    try:
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(jsonable(config), sort_keys=False))
        atomic_write_text(run_dir / "summary.json", json.dumps(jsonable(summary), indent=2) + "\n")
        atomic_write_text(run_dir / "outcomes.csv", _csv_text(outcomes))
    except OSError as exc:
        raise AdvbenchError(f"cannot write run files in {run_dir}: {exc.strerror or exc}") from None


def jsonable(obj: Any) -> Any:
    """JSON/YAML-safe copy: tuples -> lists, non-finite floats -> None, tensors -> numbers."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):
        return jsonable(obj.item())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    return csv_text(rows)


# --- rows ------------------------------------------------------------------------------------
def _num(v: Optional[float], digits: int = 6) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return repr(round(float(v), digits))


def result_rows(result, info: Mapping[str, Any]) -> List[Dict[str, str]]:
    """Leaderboard rows for an evaluator.EvalResult. ``info`` supplies run_id, timestamp, model,
    checkpoint, checkpoint_sha256, dataset, device, seed, defense, defense_params, activation,
    version, flags; ``mode`` (per-attack or cascade) and ``evaluation`` (the reportable suite the
    attacks cover, or weak) come from the result."""
    base = {k: ("" if info.get(k) is None else str(info.get(k))) for k in COLUMNS if k in info}
    base.update(n_examples=str(result.n_total), mode=result.mode, evaluation=result.evaluation)
    rows: List[Dict[str, str]] = []
    for t in result.threats:
        common = dict(base, norm=t.threat.norm, eps=repr(float(t.threat.eps)), clean_acc=_num(result.clean_acc))
        for label, r in t.attacks.items():
            params = {k: v for k, v in r.config.items() if k not in ("attack", "norm", "eps")}
            if label != r.name:
                params = {"name": r.name, **params}
            rows.append(dict(common, attack=label, attack_params=json.dumps(params, sort_keys=True),
                             robust_acc=_num(t.robust_acc(label)), success_rate=_num(r.success_rate),
                             mean_norm=_num(r.mean_norm), max_norm=_num(r.max_norm), seconds=_num(r.seconds, 3),
                             images_per_s=_num(r.images_per_s, 1)))
        n_att = max(1, result.n_clean_correct)
        worst = int(t.robust_mask().sum())
        rows.append(dict(common, attack=WORST_CASE, attack_params=json.dumps(list(t.attacks)),
                         robust_acc=_num(t.worst_case_acc), success_rate=_num(1 - worst / n_att),
                         mean_norm="", max_norm="", seconds=_num(t.seconds, 3), images_per_s=""))
    return [{k: row.get(k, "") for k in COLUMNS} for row in rows]


# --- reading, appending ------------------------------------------------------------------------
def csv_path(results_dir) -> Path:
    return Path(results_dir) / CSV_NAME


def md_path(results_dir) -> Path:
    return Path(results_dir) / MD_NAME


def read(results_dir):
    """The leaderboard as a DataFrame of strings (empty if there is none yet); a corrupt CSV is an
    AdvbenchError naming the file."""
    path = csv_path(results_dir)
    if not path.is_file():
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=COLUMNS, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdvbenchError(f"{path} is corrupt ({first}); fix or move it away") from None
    except OSError as exc:
        raise AdvbenchError(f"cannot read {path}: {exc.strerror or exc}") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise AdvbenchError(f"{path} is corrupt: missing columns {', '.join(missing)}")
    _check_complete_rows(path)
    for col in NUMERIC:
        vals = pd.to_numeric(df[col], errors="coerce")
        bad = vals.isna()
        if bool(bad.any()):
            i = int(bad.to_numpy().nonzero()[0][0])
            raise AdvbenchError(f"{path} is corrupt: row {i + 2} has {col}={df[col].iloc[i]!r} (not a number)")
    _check_complete_rows(path, final_newline=True)
    return df


def _check_complete_rows(path: Path, final_newline: bool = False) -> None:
    """pandas pads a short row with empty fields; a row cut short (a truncated file) is corruption:
    every record must have the header's number of fields (and, with ``final_newline``, the file
    must end with a newline: its last row is complete)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AdvbenchError(f"cannot read {path}: {exc}") from None
    if not text:
        return
    incomplete = AdvbenchError(f"{path} is corrupt: its last row is incomplete (the file does not end with a "
                               f"newline; truncated?); fix or move it away")
    if final_newline:
        if not text.endswith("\n"):
            raise incomplete
        return
    records = list(csv.reader(io.StringIO(text)))
    width = len(records[0])
    for i, rec in enumerate(records[1:], start=2):
        if rec and len(rec) != width:
            if i == len(records) and not text.endswith("\n"):
                raise incomplete
            raise AdvbenchError(f"{path} is corrupt: record {i} has {len(rec)} fields, the header has {width} "
                                f"(truncated?); fix or move it away")


def append(results_dir, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append rows to leaderboard.csv atomically under the lock, then re-render leaderboard.md."""
    rows = [dict(r) for r in rows]
    results_dir = ensure_dir(results_dir)
    path, md = csv_path(results_dir), md_path(results_dir)
    check_writable(results_dir)
    try:
        with locked(path):
            df = read(results_dir)
            new = pd.DataFrame(rows, dtype=str)
            cols = list(df.columns) + [c for c in COLUMNS if c not in df.columns]
            cols += [c for c in new.columns if c not in cols]
            out = pd.concat([df.reindex(columns=cols), new.reindex(columns=cols)], ignore_index=True).fillna("")
            csv_text = out.to_csv(index=False, lineterminator="\n")
            md_text = render_markdown(out)  # both texts first: a failure here changes no file
            old = (path.read_bytes(), path.stat()) if path.is_file() else None
            atomic_write_text(path, csv_text)
            try:
                atomic_write_text(md, md_text)
            except BaseException:  # the CSV must not keep rows the record does not have: put it back
                _restore(path, old)
                raise
    except OSError as exc:
        raise AdvbenchError(f"cannot write the leaderboard in {results_dir}: {exc.strerror or exc}") from None
    return path


def check_writable(results_dir) -> None:
    """Both destinations of an append can be replaced: neither is a directory (or another non-file)
    and the folder is writable (ensure_dir); an AdvbenchError naming the path otherwise."""
    ensure_dir(results_dir)
    for p in (csv_path(results_dir), md_path(results_dir)):
        what = not_a_file(p)
        if what:
            raise AdvbenchError(f"cannot write the leaderboard: {p} is {what}; move it away")


def _restore(path: Path, old) -> None:
    """Put back the CSV as it was before an append (``old``: its bytes and stat, or None: no CSV)."""
    if old is None:
        path.unlink(missing_ok=True)
        return
    data, st = old
    atomic_write(path, lambda f: f.write(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --- filtering and rendering ---------------------------------------------------------------------
def filter_rows(df, dataset: Optional[str] = None, norm: Optional[str] = None, eps: Optional[float] = None):
    out = df
    if dataset:
        out = out[out["dataset"].str.lower() == dataset.strip().lower()]
    if norm:
        out = out[out["norm"] == check_norm(norm)]
    if eps is not None:
        e = pd.to_numeric(out["eps"], errors="coerce")
        out = out[(e - float(eps)).abs() <= 1e-9 * max(1.0, abs(float(eps)))]
    return out


def _attack_order(labels: Iterable[str]) -> List[str]:
    labels = list(dict.fromkeys(labels))
    known = [a for a in ("fgsm", "bim", "pgd") if a in labels]
    return known + [a for a in labels if a not in known and a != WORST_CASE]


SHA_SHOWN = 12  # hex digits of checkpoint_sha256 shown (and grouped by: old rows hold shorter hashes)
SELECTION_RULE = ("One row per model entry (model, checkpoint, defense, activation): of its runs at this threat "
                  "model, the strongest evaluation: a reportable one (attacks covering AutoAttack's standard set: "
                  "`--suite standard`, or the reference `--suite autoattack`) before a weak one, then the one with "
                  "the lowest worst-case robust accuracy (as RobustBench reports the strongest known attack; ties: "
                  "more examples, then the latest); n is that run's number of examples. Entries with a reportable "
                  "worst case rank above those whose worst case comes from weak attacks only, which is an upper "
                  "bound (marked ≤).")
UPPER_BOUND = "≤ "  # before a worst case from weak attacks only, in the markdown


def _strongest_runs(g):
    """run_id per model entry of one section: a reportable run before a weak one, then the run with
    the lowest worst case (its worst-case row, else its lowest attack), ties broken by more
    examples, then the latest."""
    per_run = []
    for run_id, r in g.groupby("run_id", sort=False):
        wc = r.loc[r["attack"] == WORST_CASE, "_robust"]
        n = pd.to_numeric(r["n_examples"].iloc[0], errors="coerce")
        per_run.append({"run_id": run_id, "_entry": r["_entry"].iloc[0], "_weak": bool(r["_weak"].iloc[0]),
                        "_worst": float(wc.min()) if len(wc) else float(r["_robust"].min()),
                        "_n": 0.0 if pd.isna(n) else float(n), "_ts": str(r["timestamp"].iloc[0])})
    runs = pd.DataFrame(per_run)
    runs["_nan"] = runs["_worst"].isna()
    runs = runs.sort_values(["_weak", "_nan", "_worst", "_n", "_ts", "run_id"],
                            ascending=[True, True, True, False, False, False], kind="stable")
    return set(runs.groupby("_entry", sort=False)["run_id"].first())


def _prepared(df):
    """The rows with the columns table() reads (old rows without mode / evaluation: OLD_ROWS) and
    its helper columns."""
    d = df.copy()
    for c in ("defense", "activation", "checkpoint_sha256", "timestamp", "n_examples", *OLD_ROWS):
        if c not in d.columns:
            d[c] = ""
    for c, old in OLD_ROWS.items():
        d[c] = d[c].where(d[c].astype(str).str.strip() != "", old)
    d["_weak"] = d["evaluation"] == WEAK
    d["_eps"] = pd.to_numeric(d["eps"])
    d["_robust"] = pd.to_numeric(d["robust_acc"])
    d["_clean"] = pd.to_numeric(d["clean_acc"])
    d["_sha"] = d["checkpoint_sha256"].astype(str).str.strip().str.lower().str[:SHA_SHOWN]
    d["_entry"] = d["model"] + "\0" + d["_sha"] + "\0" + d["defense"] + "\0" + d["activation"]
    return d


def table(df):
    """The leaderboard as a list of sections: (title, DataFrame) with one row per model entry (its
    strongest run: SELECTION_RULE), columns evaluation / mode / clean / attacks / worst case
    (fractions), reportable entries first, each group sorted by worst case."""
    return [(title, t) for _, _, _, title, t in _sections(df)]


def _sections(df):
    """table()'s sections with what they are about: (dataset, norm, eps, title, DataFrame)."""
    if df.empty:
        return []
    sections = []
    for (dataset, norm, eps), g in _prepared(df).groupby(["dataset", "norm", "_eps"], sort=True):
        chosen = g[g["run_id"].isin(_strongest_runs(g))]
        attacks = _attack_order(chosen["attack"])
        recs = []
        for run_id, r in chosen.groupby("run_id", sort=False):
            first = r.iloc[0]
            rec = {"model": first["model"], "defense": first["defense"] or "–",
                   "activation": first["activation"] or "–", "checkpoint": first["_sha"] or "–",
                   "n": first["n_examples"], "evaluation": first["evaluation"], "mode": first["mode"],
                   "clean": float(first["_clean"])}
            acc = dict(zip(r["attack"], r["_robust"]))
            for a in attacks:
                rec[a] = acc.get(a, math.nan)
            rec["worst case"] = acc.get(WORST_CASE, min((acc[a] for a in acc), default=math.nan))
            rec["run"] = run_id
            recs.append(rec)
        t = pd.DataFrame(recs)
        t["_weak"] = t["evaluation"] == WEAK
        t = t.sort_values(["_weak", "worst case", "clean"], ascending=[True, False, False], na_position="last",
                          kind="stable").drop(columns="_weak").reset_index(drop=True)
        sections.append((dataset, norm, float(eps), f"{dataset} · {norm} eps={format_eps(float(eps))}", t))
    return sections


_TEXT_COLUMNS = ("model", "defense", "activation", "checkpoint", "n", "evaluation", "mode", "run")


def render_markdown(df, figures: Optional[Mapping[tuple, str]] = None) -> str:
    """leaderboard.md. ``figures`` (dataset, norm) -> an image's source: a section of that dataset and
    norm's robustness curves before its first table (the HTML page's curves)."""
    lines = ["# advbench leaderboard", "",
             "Robust accuracy (%) under each attack (in a cascade: after it and the attacks before it); "
             "*worst case* counts a sample as robust only if it survives every attack. " + SELECTION_RULE + " "
             f"Rendered from `{CSV_NAME}` (the source of truth); do not edit by hand.", ""]
    sections = _sections(df)
    if not sections:
        lines.append("No results yet.")
        return "\n".join(lines) + "\n"
    figures = dict(figures or {})
    for dataset, norm, _, title, t in sections:
        src = figures.pop((dataset, norm), None)
        if src is not None:
            alt = f"robustness curves, {dataset} {norm}".translate(str.maketrans("[]", "()"))
            lines += [f"## {dataset} · {norm}: robustness curves", "", CURVES_CAPTION, "", f"![{alt}]({src})", ""]
        lines += [f"## {title}", ""]
        acc_cols = [c for c in t.columns if c not in _TEXT_COLUMNS]
        header = ["#", "model", "defense", "activation", "checkpoint", "n", "evaluation"] + acc_cols + ["run"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---:" if h in acc_cols or h in ("#", "n") else "---" for h in header) + "|")
        for i, row in t.iterrows():
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _markdown_cells(i, row, acc_cols)) + " |")
        lines.append("")
    return "\n".join(lines)


CURVES_CAPTION = ("Worst-case robust accuracy (%) against eps of each model entry's row in the tables below "
                  "(eps 0: its clean accuracy); a hollow marker is an upper bound (weak attacks only, ≤).")


def robustness_curves(df) -> Dict[tuple, str]:
    """(dataset, norm) -> a PNG data URI: worst-case robust accuracy against eps of every model entry
    in the tables of that dataset and norm (the rows render_markdown shows)."""
    curves: Dict[tuple, Dict[tuple, list]] = {}
    for dataset, norm, eps, _, t in _sections(df):
        for _, row in t.iterrows():
            key = (row["model"], row["checkpoint"], row["defense"], row["activation"])
            curves.setdefault((dataset, norm), {}).setdefault(key, []).append(
                (eps, row["worst case"], row["evaluation"] == WEAK, row["clean"]))
    plt = pyplot()
    out = {}
    for (dataset, norm), entries in curves.items():
        fig, ax = plt.subplots(figsize=(7.5, max(3.8, 1.2 + 0.16 * len(entries))))  # room for the legend
        for k, ((model, sha, defense, activation), pts) in enumerate(entries.items()):
            pts.sort()
            xs, ys = [0.0] + [p[0] for p in pts], [100 * pts[0][3]] + [100 * p[1] for p in pts]
            line, = ax.plot(xs, ys, linestyle=("-", "--", "-.", ":")[k % 4], linewidth=1.6,
                            label=f"{model} · {defense} · {activation} · {sha[:8]}")
            for (e, _, weak, _), y in zip(pts, ys[1:]):
                ax.plot([e], [y], marker="o", markersize=6, color=line.get_color(),
                        markerfacecolor="white" if weak else line.get_color())
        ticks = sorted({0.0} | {p[0] for pts in entries.values() for p in pts})
        ax.set_xticks(ticks)
        ax.set_xticklabels([format_eps(e) for e in ticks], rotation=45 if len(ticks) > 5 else 0)
        ax.set_xlabel(f"{norm} eps")
        ax.set_ylabel("worst-case accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.set_title(f"{dataset} · {norm}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        out[(dataset, norm)] = figure_data_uri(plt, fig)
    return out


def render_html(df) -> str:
    """The leaderboard as one self-contained HTML page: leaderboard.md's text and tables (sortable by
    any column) with each dataset x norm's robustness curves embedded."""
    return page(render_markdown(df, figures=robustness_curves(df)))


def _markdown_cells(i: int, row, acc_cols: List[str]) -> List[str]:
    """One model entry's cells: its worst case marked as an upper bound when it comes from weak
    attacks only."""
    weak = row["evaluation"] == WEAK
    cells = [str(i + 1), str(row["model"]), str(row["defense"]), str(row["activation"]),
             f"`{row['checkpoint']}`" if row["checkpoint"] != "–" else "–", str(row["n"]),
             f"{row['evaluation']} ({row['mode']})"]
    cells += [(UPPER_BOUND if weak and c == "worst case" else "") + pct(row[c], unit="") for c in acc_cols]
    return cells + [f"`{row['run']}`"]


_INTS = ("n_examples", "seed")
_FLOATS = ("eps", "clean_acc", "robust_acc", "success_rate", "mean_norm", "max_norm", "seconds", "images_per_s")


def _typed(key: str, v: str) -> Any:
    if key in _INTS or key in _FLOATS:
        try:
            return int(v) if key in _INTS else float(v)
        except ValueError:
            return None
    if key in ("attack_params", "defense_params") and v:
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def render_json(df) -> str:
    """Records with numbers as numbers and attack parameters as objects."""
    return json.dumps([{k: _typed(k, v) for k, v in rec.items()} for rec in df.to_dict(orient="records")],
                      indent=2)


def render_csv(df) -> str:
    return df.to_csv(index=False, lineterminator="\n")


def version() -> str:
    return __version__


def environment_flags() -> List[str]:
    """Flags that describe how numbers were produced (recorded in the ``flags`` column)."""
    flags = []
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        flags.append(f"world_size={os.environ['WORLD_SIZE']}")
    return flags
