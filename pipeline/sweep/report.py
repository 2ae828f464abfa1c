"""`fss sweep report`: a finished study as the paper's ablation table, plots and a trials CSV.

Files written to ``--out``::

    table.csv / table.md / table.tex   rows = parameter values, columns = folds + mean (mIoU %),
                                       the best row marked (bold in md/tex, ``best`` in CSV);
                                       sampled values to 4 significant digits; each mean with
                                       ± half its 95% bootstrap interval over the validation
                                       episodes and its paired difference against the baseline
                                       point (``--baseline``; ends and flags in the CSV;
                                       ``pipeline.sweep.intervals``)
    pivot.csv / pivot.md / pivot.tex   two-parameter grids only: mean mIoU, rows x columns
    importance.png / importance.html   parameter importance (share of the objective's variance
                                       explained by each parameter: between-group sum of squares
                                       over the total, continuous values in quartile bins)
    slice.png / slice.html             objective against each parameter, one dot per trial
                                       (log x axis for parameters sampled with ``log: true``)
    trials.csv                         study.trials_dataframe() (pandas-readable)
    summary.json                       counts, best value and parameters
"""

from __future__ import annotations

import json
from itertools import product
from pathlib import Path
from typing import Any, Mapping, Optional

import optuna
import pandas as pd
import typer
from optuna.trial import TrialState

from fss.errors import ConfigError
from fss.uncertainty import DEFAULT_REPLICATES, DEFAULT_SEED
from pipeline.intervals import Bootstrap
from pipeline.runs import atomic_write_text, write_json
from pipeline.sweep.intervals import add_intervals, difference_text, trial_counts
from pipeline.sweep.queueing import LEGACY_LOCK, STUDY_INFO, counts
from pipeline.sweep.storage import DEFAULT_JOURNAL, DEFAULT_SQLITE, normalize_storage, open_storage
from pipeline.sweep.study import label as _label, load_study, point_key


def _complete_trials(study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.user_attrs.get("fss_scores")]


def table_rows(study, info: Mapping[str, Any], baseline: str | None = None,
               boot: Bootstrap = Bootstrap()) -> tuple[list[str], list[dict]]:
    """(column names, rows) of the ablation table; numbers are mIoU in %, with each mean's
    interval and paired difference against ``baseline`` (``pipeline.sweep.intervals``)."""
    names = [p["name"] for p in info["params"]]
    shots = [str(s) for s in info["shots"]]
    folds = [str(f) for f in info["folds"]]
    multi = len(shots) > 1
    score_cols = []
    for s in shots:
        score_cols += [f"{s}-shot fold{f}" if multi else f"fold{f}" for f in folds]
        score_cols.append(f"{s}-shot mean" if multi else "mean")
    done: dict[str, list] = {}
    for t in _complete_trials(study):
        done.setdefault(point_key({n: t.params.get(n) for n in names}), []).append(t)
    if info["mode"] == "grid":
        points = [dict(zip(names, combo)) for combo in product(*[p["values"] for p in info["params"]])]
    else:
        ranked = sorted(_complete_trials(study), key=lambda t: -t.value)
        points = [{n: t.params.get(n) for n in names} for t in ranked]
        seen, unique = set(), []
        for p in points:
            if point_key(p) not in seen:
                seen.add(point_key(p))
                unique.append(p)
        points = unique
    rows, counts, labels = [], [], []
    for point in points:
        trials = done.get(point_key(point), [])
        counts.append({s: trial_counts(trials, s, folds) for s in shots})
        labels.append(" / ".join(_label(point[n]) for n in names))
        shown = _short if info["mode"] == "tune" else _label  # sampled values: 4 significant digits
        row: dict[str, Any] = {n.split(".")[-1] if len(names) == 1 else n: shown(point[n]) for n in names}
        if info["mode"] == "tune" and trials:
            row = {"trial": trials[0].number, **row}
        for s in shots:
            values = []
            for f in folds:
                per = [t.user_attrs["fss_scores"].get(s, {}).get(f) for t in trials]
                per = [v for v in per if v is not None]
                v = 100 * sum(per) / len(per) if per else None
                row[f"{s}-shot fold{f}" if multi else f"fold{f}"] = v
                values.append(v)
            row[f"{s}-shot mean" if multi else "mean"] = (
                sum(values) / len(values) if values and all(v is not None for v in values) else None)
        if info.get("reference"):
            row["paper"] = info["reference"].get(" / ".join(_label(point[n]) for n in names))
        rows.append(row)
    add_intervals(rows, counts, shots, multi, baseline, labels, boot)
    means = [r[f"{shots[0]}-shot mean" if multi else "mean"] for r in rows]
    valid = [m for m in means if m is not None]
    best = max(valid) if valid else None
    for r, m in zip(rows, means):
        r["best"] = best is not None and m == best
    columns = list(dict.fromkeys(c for r in rows for c in r)) if rows else [*names, *score_cols, "best"]
    return columns, rows


def _short(value: Any) -> str:
    """A sampled parameter value as a table label: floats to 4 significant digits (0.5488, 0.001234)."""
    if isinstance(value, float):
        return format(value, ".4g")
    return _label(value)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def _numeric_best(rows: list[dict], col: str) -> float | None:
    vals = [r[col] for r in rows if isinstance(r.get(col), float)]
    return max(vals) if vals else None


_DETAIL = (" low", " high", " contains 0", " ±")


def _shown(columns: list[str]) -> list[str]:
    """The columns of the md/tex tables (the interval's ends and flags are in the CSV only)."""
    return [c for c in columns if c != "best" and not c.endswith(_DETAIL)]


def _cell(r: dict, c: str, bests: dict, bold=lambda t: f"**{t}**", pm: str = " ±") -> str:
    if " vs " in c:
        return difference_text(r, c)
    text = _fmt(r.get(c))
    if isinstance(r.get(c), float) and bests.get(c) is not None and r[c] == bests[c]:
        text = bold(text)
    return text + (f"{pm}{r[c + ' ±']:.1f}" if isinstance(r.get(c + " ±"), float) else "")


def to_markdown(columns: list[str], rows: list[dict], title: str) -> str:
    shown = _shown(columns)
    bests = {c: _numeric_best(rows, c) for c in shown if c != "paper" and " vs " not in c}
    lines = [f"**{title}** (validation mIoU %, best in bold; ± half the 95% interval over episodes; "
             f"vs: paired difference [95% interval], ° = contains 0)", "", "| " + " | ".join(shown) + " |",
             "|" + "|".join("---" for _ in shown) + "|"]
    for r in rows:
        cells = [_cell(r, c, bests) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(columns: list[str], rows: list[dict], title: str) -> str:
    shown = _shown(columns)
    bests = {c: _numeric_best(rows, c) for c in shown if c != "paper" and " vs " not in c}
    align = "".join("c" if any(isinstance(r.get(c), float) for r in rows) else "l" for c in shown)
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{_tex_escape(title)} (validation mIoU \\%)}}",
             r"\begin{tabular}{" + align + "}", r"\toprule", " & ".join(_tex_escape(c) for c in shown) + r" \\",
             r"\midrule"]
    for r in rows:
        cells = [_tex_escape(_cell(r, c, bests, bold=lambda t: "@B@" + t + "@E@", pm=" $PM$ "))
                 .replace("@B@", "\\textbf{").replace("@E@", "}").replace(r"\$PM\$", r"$\pm$").replace("°", r"$^\circ$")
                 for c in shown]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_csv(columns: list[str], rows: list[dict], path: Path) -> None:
    frame = pd.DataFrame([{c: (round(r[c], 4) if isinstance(r.get(c), float) else r.get(c)) for c in columns}
                          for r in rows], columns=columns)
    frame.to_csv(path, index=False)


def pivot(study, info: Mapping[str, Any]) -> tuple[list[str], list[dict]] | None:
    """Mean mIoU (first shot) as a rows x columns grid of a two-parameter grid study."""
    if info["mode"] != "grid" or len(info["params"]) != 2:
        return None
    (a, b) = info["params"]
    columns, rows = table_rows(study, info)
    mean_col = next(c for c in columns if c.endswith("mean"))
    lookup = {(r[a["name"]], r[b["name"]]): r[mean_col] for r in rows}
    head = f"{a['name'].split('.')[-1]} \\ {b['name'].split('.')[-1]}"
    out_rows = []
    for va in a["values"]:
        row = {head: _label(va)}
        for vb in b["values"]:
            row[_label(vb)] = lookup.get((_label(va), _label(vb)))
        out_rows.append(row)
    return [head, *[_label(v) for v in b["values"]]], out_rows


# ---------------------------------------------------------------- importance and slices


def importance(study, info: Mapping[str, Any]) -> dict[str, float]:
    """Share of the objective's variance explained by each parameter (eta squared)."""
    trials = _complete_trials(study)
    values = [t.value for t in trials]
    out: dict[str, float] = {}
    if len(values) < 2:
        return {p["name"]: 0.0 for p in info["params"]}
    mean = sum(values) / len(values)
    total = sum((v - mean) ** 2 for v in values)
    for p in info["params"]:
        xs = [t.params.get(p["name"]) for t in trials]
        if "values" not in p:  # continuous: quartile bins
            order = sorted(x for x in xs if x is not None)
            cuts = [order[int(len(order) * q)] for q in (0.25, 0.5, 0.75)] if order else []
            xs = [sum(x > c for c in cuts) for x in xs]
        groups: dict[str, list[float]] = {}
        for x, v in zip(xs, values):
            groups.setdefault(json.dumps(x, default=str), []).append(v)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        out[p["name"]] = between / total if total > 0 else 0.0
    return out


def _slice_points(study, info) -> dict[str, tuple[list, list[float]]]:
    trials = _complete_trials(study)
    return {p["name"]: ([t.params.get(p["name"]) for t in trials], [100 * t.value for t in trials])
            for p in info["params"]}


def plot_files(study, info: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib  # heavy: matplotlib and plotly for the plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    files = []
    imp = importance(study, info)
    names = list(imp)
    fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * len(names)))
    ax.barh([n.split(".")[-1] for n in names], [imp[n] for n in names], color="#4c72b0")
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the objective's variance")
    ax.set_title(f"{info['name']}: parameter importance")
    fig.tight_layout()
    fig.savefig(out / "importance.png", dpi=120)
    plt.close(fig)
    go.Figure(go.Bar(x=[imp[n] for n in names], y=names, orientation="h")).update_layout(
        title=f"{info['name']}: parameter importance", xaxis_title="share of the objective's variance",
        xaxis_range=[0, 1]).write_html(out / "importance.html", include_plotlyjs=True)
    files += [out / "importance.png", out / "importance.html"]

    points = _slice_points(study, info)
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.5), squeeze=False)
    pfig = make_subplots(rows=1, cols=len(points), subplot_titles=[n.split(".")[-1] for n in points])
    log_scaled = {p["name"] for p in info["params"] if p.get("log")}
    for i, (name, (xs, ys)) in enumerate(points.items()):
        categorical = any(isinstance(x, (str, bool)) for x in xs)
        shown = [_label(x) for x in xs] if categorical else xs
        axes[0][i].scatter(shown, ys, color="#dd8452")
        axes[0][i].set_xlabel(name.split(".")[-1] + (" (log scale)" if name in log_scaled else ""))
        axes[0][i].set_ylabel("validation mIoU (%)" if i == 0 else "")
        pfig.add_trace(go.Scatter(x=shown, y=ys, mode="markers", name=name), row=1, col=i + 1)
        if name in log_scaled:  # sampled on a log scale: drawn on one
            axes[0][i].set_xscale("log")
            pfig.update_xaxes(type="log", row=1, col=i + 1)
    fig.suptitle(f"{info['name']}: objective per parameter")
    fig.tight_layout()
    fig.savefig(out / "slice.png", dpi=120)
    plt.close(fig)
    pfig.update_layout(title=f"{info['name']}: objective per parameter", showlegend=False)
    pfig.write_html(out / "slice.html", include_plotlyjs=True)
    files += [out / "slice.png", out / "slice.html"]
    return files


def trials_csv(study, path: Path) -> None:
    frame = study.trials_dataframe()
    for col in frame.columns:
        if frame[col].map(lambda v: isinstance(v, (dict, list))).any():
            frame[col] = frame[col].map(lambda v: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v)
    frame.to_csv(path, index=False)


def write_report(study, info: Mapping[str, Any], out: str | Path, baseline: str | None = None,
                 boot: Bootstrap = Bootstrap()) -> list[Path]:
    """Every report file of ``study`` in ``out`` (see the module docstring)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    title = info.get("title") or info["name"]
    columns, rows = table_rows(study, info, baseline, boot)
    to_csv(columns, rows, out / "table.csv")
    atomic_write_text(out / "table.md", to_markdown(columns, rows, title))
    atomic_write_text(out / "table.tex", to_latex(columns, rows, title))
    files = [out / "table.csv", out / "table.md", out / "table.tex"]
    grid = pivot(study, info)
    if grid is not None:
        pcols, prows = grid
        to_csv(pcols, prows, out / "pivot.csv")
        atomic_write_text(out / "pivot.md", to_markdown(pcols, prows, title + " (mean)"))
        atomic_write_text(out / "pivot.tex", to_latex(pcols, prows, title + " (mean)"))
        files += [out / "pivot.csv", out / "pivot.md", out / "pivot.tex"]
    files += plot_files(study, info, out)
    trials_csv(study, out / "trials.csv")
    files.append(out / "trials.csv")
    summary: dict[str, Any] = {"study": study.study_name, "title": title, "trials": counts(study),
                               "importance": importance(study, info)}
    complete = _complete_trials(study)
    if complete:
        best = max(complete, key=lambda t: t.value)
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
    write_json(out / "summary.json", summary)
    files.append(out / "summary.json")
    return files


__all__ = ["write_report", "table_rows", "importance", "pivot", "to_markdown", "to_latex"]


# ---------------------------------------------------------------- the command `fss sweep report`


def _open_for_report(name: str, storage: Optional[str]):
    """(study, url, info) of an existing study; NAME may be the study file."""
    output = Path("runs/sweeps") / name
    if name.endswith((".yaml", ".yml")):
        spec = load_study(name, check_configs=False)
        name, output = spec.name, spec.output
    if storage:
        url = normalize_storage(storage)
    else:
        candidates = [output / DEFAULT_JOURNAL, output / DEFAULT_SQLITE]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(f"no storage of study '{name}' in {output}; pass --storage URL (where 'fss sweep run' wrote it).")
        url = normalize_storage(str(found))
    store = open_storage(url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        names = [s for s in optuna.get_all_study_names(store) if LEGACY_LOCK not in s]
        raise ConfigError(f"storage {url} has no study '{name}'; its studies: {', '.join(names) or '(none)'}.") from None
    info = study.user_attrs.get(STUDY_INFO)
    if not info:
        raise ConfigError(f"study '{name}' in {url} was not created by 'fss sweep run'; nothing to report.")
    return study, url, info


def report_command(
    name: str = typer.Argument(..., help="Study name (or its study file)."),
    storage: Optional[str] = typer.Option(None, help="Storage URL (default: the study's output directory)."),
    out: Path = typer.Option(..., help="Directory for the table (CSV, LaTeX, Markdown), plots and trials CSV."),
    baseline: Optional[str] = typer.Option(None, help="Row label every point is compared with, on the same validation "
                                           "episodes (default: the first grid point, e.g. 0.0 for lambda)."),
    bootstrap_replicates: int = typer.Option(DEFAULT_REPLICATES, "--bootstrap-replicates", min=1,
                                             help="Bootstrap replicates of the intervals (resampled episodes)."),
    bootstrap_seed: int = typer.Option(DEFAULT_SEED, "--bootstrap-seed", min=0, help="Seed of the bootstrap's draws."),
) -> None:
    """The ablation table in the paper's layout with 95% intervals and paired differences against
    a baseline point, importance and slice plots, the trials CSV."""
    study, url, info = _open_for_report(name, storage)
    files = write_report(study, info, out, baseline, Bootstrap(bootstrap_replicates, bootstrap_seed))
    typer.echo(json.dumps({"study": study.study_name, "storage": url, "files": [str(f) for f in files]}, sort_keys=True))
