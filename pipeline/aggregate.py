"""`fss aggregate`: evaluation JSONs -> results.csv (long format) -> the papers' tables.

``results.csv`` has one row per evaluation file (columns :data:`RESULT_COLUMNS`; IoUs as
fractions). From it, with pandas:

* ``table_miou.{md,tex,csv}``: APANet Table I layout, rows = methods, column groups per
  shot setting (1-shot, 5-shot; evaluations with ``--support-control shifted`` get their own
  group after their shot's, ``1-shot shifted support``), each with Fold-0..Fold-3 and Mean
  (mIoU in %). The mean is over the folds present; a table with missing folds says so.
* ``table_fbiou.{md,tex,csv}``: FB-IoU (%) per setting, mean over folds.
* ``chart_miou.png``: mean mIoU per method and setting.
* ``summary.json``: mean mIoU / FB-IoU (%) per method and setting, keyed by table.
* ``metrics/<dataset>-<backbone>-<protocol>/<row>-<K>shot.json``: one small file per table
  row and setting (``<row>-<K>shot-shifted-support.json`` for the support control) (method, shot, folds, mean mIoU and FB-IoU as fractions), the DVC metrics of
  the aggregate stage (one short row each in ``dvc metrics show``).

One table per (dataset, backbone, protocol); rows are methods, suffixed with "(imported)"
for released checkpoints evaluated with ``--model`` and with the training shot when a model
was not trained 1-shot.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
import typer

from fss.errors import ConfigError
from fss.models.registry import get_method, list_methods, training_free_methods
from fss.uncertainty import DEFAULT_REPLICATES, DEFAULT_SEED
from pipeline.config import load_params, tracking_defaults
from pipeline.console import console
from pipeline.figures import results_chart
from pipeline.intervals import MEAN, Bootstrap, cell_intervals, differences, differences_markdown, half_widths, load_counts
from pipeline.runs import atomic_write_text, write_json
from pipeline.tracking import log_aggregate

RESULT_COLUMNS = [
    "method", "dataset", "backbone", "shot", "fold", "miou", "fb_iou", "miou_std", "fb_iou_std",
    "episodes", "runs", "protocol", "train_shot", "train_seed", "selection", "variant", "support", "source",
]
FOLDS = (0, 1, 2, 3)


def find_evaluations(root: str | Path) -> list[Path]:
    """Every evaluation JSON (``"kind": "fss-evaluation"``) under ``root``, sorted."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"--runs {root} does not exist; pass the directory holding the evaluation JSON files.")
    files = [root] if root.is_file() else sorted(root.rglob("*.json"))
    found = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(data, dict) and data.get("kind") == "fss-evaluation":
            found.append(f)
    return found


def collect_results(files: Iterable[Path]):
    """The long-format DataFrame of the evaluation files (duplicates refused)."""
    rows = []
    for f in files:
        d = json.loads(Path(f).read_text())
        try:
            rows.append({
                "method": d["method"], "dataset": d["dataset"], "backbone": d["backbone"],
                "shot": int(d["shot"]), "support": (d.get("support_control") or {}).get("name", "own"),
                "fold": int(d["fold"]), "miou": float(d["miou"]),
                "fb_iou": float(d["fb_iou"]), "miou_std": d.get("miou_std", math.nan),
                "fb_iou_std": d.get("fb_iou_std", math.nan), "episodes": int(d["episodes"]),
                "runs": int(d.get("num_runs", 1)), "protocol": d["protocol"],
                "train_shot": d.get("train_shot") if d.get("train_shot") is not None else math.nan,
                "train_seed": d.get("train_seed") if d.get("train_seed") is not None else math.nan,
                "selection": d.get("checkpoint_selection", ""),
                "variant": "imported" if d.get("checkpoint_selection") == "imported" else "trained",
                "source": str(f),
            })
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"evaluation file {f} lacks or mangles {exc}; re-run 'fss evaluate'.") from None
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    if df.empty:
        return df
    key = ["dataset", "backbone", "protocol", "method", "variant", "train_shot", "shot", "support", "train_seed", "fold"]
    df = df.sort_values(key, kind="stable")
    dup = df[df.duplicated(key, keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        files = ", ".join(dup[(dup[key] == first[key]).all(axis=1)]["source"])
        raise ConfigError(
            f"several evaluations of {first['method']} fold {first['fold']} {_setting(first['shot'], first['support'])} "
            f"({first['protocol']}): {files}; keep one of them."
        )
    return df.reset_index(drop=True)


def _row_label(method: str, train_shot, variant: str = "trained") -> str:
    label = method if variant == "trained" else f"{method} ({variant})"
    if train_shot is None or (isinstance(train_shot, float) and math.isnan(train_shot)) or int(train_shot) == 1:
        return label
    return f"{label} (trained {int(train_shot)}-shot)"


def _setting(shot, support: str = "own") -> str:
    """A column group: ``1-shot``, or ``1-shot shifted support`` for a support-control evaluation."""
    return f"{int(shot)}-shot" + ("" if support == "own" else f" {support} support")


def _settings_in_order(df) -> list[str]:
    """The column groups of ``df``: by shot, each shot's own-support group before its control."""
    pairs = sorted(set(zip(df["shot"], df["support"])), key=lambda p: (int(p[0]), p[1] != "own", p[1]))
    return [_setting(shot, support) for shot, support in pairs]


def _with_settings(df):
    """``df`` with the table's ``row`` label and column group ``setting`` of every evaluation."""
    return df.assign(row=[_row_label(m, t, v) for m, t, v in zip(df["method"], df["train_shot"], df["variant"])],
                     setting=[_setting(s, c) for s, c in zip(df["shot"], df["support"])])


#: training-free rows (the registry's training_free methods), shown first so that every reader
#: sees what training adds over them
FLOOR_METHODS = training_free_methods()


def _floor_first(table):
    """``table`` with the rows of FLOOR_METHODS first, the others in their sorted order."""
    first = [r for r in table.index if r.split(" ")[0] in FLOOR_METHODS]
    return table.loc[first + [r for r in table.index if r not in first]]


def miou_table(df):
    """Rows = methods; columns (setting, Fold-0..3 | Mean), mIoU in %."""
    d = _with_settings(df).assign(value=100 * df["miou"])
    wide = d.pivot_table(index="row", columns=["setting", "fold"], values="value", aggfunc="mean")  # over seeds
    settings = _settings_in_order(df)
    cols = {}
    for s in settings:
        for f in FOLDS:
            cols[(s, f"Fold-{f}")] = wide[(s, f)] if (s, f) in wide.columns else pd.Series(math.nan, index=wide.index)
        present = [wide[(s, f)] for f in FOLDS if (s, f) in wide.columns]
        cols[(s, "Mean")] = pd.concat(present, axis=1).mean(axis=1, skipna=True)
    table = pd.DataFrame(cols, index=wide.index)
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["setting", ""])
    table.index.name = "Method"
    return _floor_first(table)


def fbiou_table(df):
    """Rows = methods; one column per setting: FB-IoU (%) averaged over the folds present."""
    d = _with_settings(df).assign(value=100 * df["fb_iou"])
    table = d.pivot_table(index="row", columns="setting", values="value", aggfunc="mean")
    table = table[_settings_in_order(df)]
    table.index.name = "Method"
    table.columns.name = None
    return _floor_first(table)


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def _pm(spread: dict | None, row, column, sign: str = " ±") -> str:
    """`` ±h`` (half the 95% interval's width) of a cell and, with several training seeds,
    `` (seed sd s)``; or nothing."""
    h, seed_std = (spread or {}).get((row, *column) if isinstance(column, tuple) else (row, column), (None, None))
    text = "" if h is None or math.isnan(h) else f"{sign}{h:.1f}"
    return text + ("" if seed_std is None or math.isnan(seed_std) else f" (seed sd {seed_std:.1f})")


def _best_per_column(table) -> dict:
    best = {}
    for c in table.columns:
        col = table[c].astype(float)
        best[c] = col.max() if col.notna().any() else None
    return best


def to_markdown(table, title: str = "", spread: dict | None = None) -> str:
    """A GitHub-flavoured Markdown table (best value per column in bold); ``spread``
    (``pipeline.intervals.half_widths``) adds `` ±h`` to the cells it has."""
    cols = list(table.columns)
    heads = [" ".join(str(x) for x in c if str(x)) if isinstance(c, tuple) else str(c) for c in cols]
    best = _best_per_column(table)
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| " + " | ".join([table.index.name or "Method"] + heads) + " |")
    lines.append("|" + "---|" + "|".join(["---:"] * len(cols)) + "|")
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            s = _fmt(v)
            if best[c] is not None and not (isinstance(v, float) and math.isnan(v)) and len(table) > 1 and v == best[c]:
                s = f"**{s}**"
            cells.append(s + _pm(spread, name, c))
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    return "\n".join(lines) + "\n"


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#")):
        s = s.replace(a, b)
    return s


def to_latex(table, caption: str = "", spread: dict | None = None) -> str:
    """A booktabs tabular; MultiIndex columns become \\multicolumn groups; ``spread`` as in
    :func:`to_markdown` (``$\\pm$h``)."""
    cols = list(table.columns)
    multi = isinstance(cols[0], tuple)
    best = _best_per_column(table)
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(r"\caption{" + _tex_escape(caption) + "}")
    lines.append(r"\begin{tabular}{l" + "c" * len(cols) + "}")
    lines.append(r"\toprule")
    if multi:
        groups: list[tuple[str, int]] = []
        for c in cols:
            if groups and groups[-1][0] == c[0]:
                groups[-1] = (c[0], groups[-1][1] + 1)
            else:
                groups.append((c[0], 1))
        head = ["Method"] + [r"\multicolumn{%d}{c}{%s}" % (n, _tex_escape(str(g))) for g, n in groups]
        lines.append(" & ".join(head) + r" \\")
        start, rules = 2, []
        for _, n in groups:
            rules.append(r"\cmidrule(lr){%d-%d}" % (start, start + n - 1))
            start += n
        lines.append(" ".join(rules))
        lines.append(" & ".join([""] + [_tex_escape(str(c[1])) for c in cols]) + r" \\")
    else:
        lines.append(" & ".join(["Method"] + [_tex_escape(str(c)) for c in cols]) + r" \\")
    lines.append(r"\midrule")
    for name, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            s = _fmt(v).replace("–", "--")
            if best[c] is not None and len(table) > 1 and not (isinstance(v, float) and math.isnan(v)) and v == best[c]:
                s = r"\textbf{" + s + "}"
            cells.append(s + _pm(spread, name, c, sign=r"\,$\pm$"))
        lines.append(" & ".join([_tex_escape(str(name))] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def aggregate(runs: str | Path, out: str | Path, boot: Bootstrap = Bootstrap()) -> dict:
    """Write results.csv, the tables (with intervals), the paired differences and the chart for
    every evaluation under ``runs``."""
    files = find_evaluations(runs)
    if not files:
        raise ConfigError(f"no evaluation JSON ('fss evaluate' output) under {runs}; run the evaluations first.")
    df = collect_results(files)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", df.to_csv(index=False, float_format="%.6f"))
    counts = load_counts(df["source"])
    labelled = _with_settings(df)
    intervals = cell_intervals(labelled, counts, boot)
    diffs = differences(labelled, counts, boot)
    atomic_write_text(out / "intervals.csv", intervals.to_csv(index=False, float_format="%.3f"))
    atomic_write_text(out / "table_differences.csv", diffs.to_csv(index=False, float_format="%.3f"))
    atomic_write_text(out / "table_differences.md", differences_markdown(diffs))
    groups = list(df.groupby(["dataset", "backbone", "protocol"], sort=True))
    summary, chart = _write_tables(groups, intervals, out)
    label, means = chart
    results_chart(means, out / "chart_miou.png", title=f"mIoU — {label}")
    write_json(out / "summary.json", summary)
    atomic_write_text(out / README_TABLE, readme_table(groups[0][1], intervals))
    _write_metrics(df, out / "metrics", intervals)
    return {"evaluations": len(df), "groups": len(groups), "out": str(out),
            "files": sorted(p.name for p in out.iterdir() if p.is_file())}


def _write_tables(groups, intervals, out: Path):
    """The mIoU (± half the 95% interval) and FB-IoU tables in md, tex and csv; (summary, chart table)."""
    md_parts, tex_parts, miou_csv, fb_csv, charts = [], [], [], [], []
    summary: dict = {}
    for (dataset, backbone, protocol), g in groups:
        label = f"{dataset}, backbone {backbone}, protocol {protocol}"
        mt, ft = miou_table(g), fbiou_table(g)
        spread = half_widths(intervals, (dataset, backbone, protocol))
        folds_present = sorted(g["fold"].unique())
        note = "" if len(folds_present) == len(FOLDS) else \
            f" (Mean over the folds present: {', '.join(map(str, folds_present))})"
        md_parts.append(to_markdown(mt, f"mIoU (%) ± half the 95% interval over episodes — {label}{note}", spread))
        md_parts.append(to_markdown(ft, f"FB-IoU (%) — {label}, mean over folds"))
        tex_parts.append(to_latex(mt, f"mIoU (%) on {label}{note}, ± half the 95% bootstrap interval over episodes.",
                                  spread))
        tex_parts.append(to_latex(ft, f"FB-IoU (%) on {label}, mean over folds."))
        flat = mt.copy()
        flat.columns = [f"{a} {b}" for a, b in flat.columns]
        for (row, setting, column), (h, _) in spread.items():
            flat.loc[row, f"{setting} {column} ±"] = h
        miou_csv.append(flat.reset_index().assign(dataset=dataset, backbone=backbone, protocol=protocol))
        fb_csv.append(ft.reset_index().assign(dataset=dataset, backbone=backbone, protocol=protocol))
        means = mt.xs("Mean", axis=1, level=1)
        charts.append((label, means))
        for method, row in means.iterrows():
            for setting, v in row.items():
                fb = ft.loc[method, setting]
                summary[f"{dataset}/{backbone}/{protocol}/{method}/{setting}"] = {
                    "miou": None if math.isnan(v) else round(float(v), 4),
                    "miou_pm": _round(spread.get((method, setting, "Mean"), (math.nan,))[0]),
                    "fb_iou": None if math.isnan(fb) else round(float(fb), 4)}
    atomic_write_text(out / "table_miou.md", "\n".join(md_parts[0::2]))
    atomic_write_text(out / "table_fbiou.md", "\n".join(md_parts[1::2]))
    atomic_write_text(out / "table_miou.tex", "\n".join(tex_parts[0::2]))
    atomic_write_text(out / "table_fbiou.tex", "\n".join(tex_parts[1::2]))
    atomic_write_text(out / "table_miou.csv", pd.concat(miou_csv).to_csv(index=False, float_format="%.2f"))
    atomic_write_text(out / "table_fbiou.csv", pd.concat(fb_csv).to_csv(index=False, float_format="%.2f"))
    return summary, charts[0]


def _round(v) -> float | None:
    return None if v is None or math.isnan(v) else round(float(v), 4)


#: the README's table of the first (dataset, backbone, protocol), written by fss aggregate;
#: ``fss aggregate --readme README.md`` puts it between README_MARKERS
README_TABLE = "readme_table.md"
README_MARKERS = ("<!-- results table: begin -->", "<!-- results table: end -->")


def _display(row: str) -> str:
    method = row.split(" ")[0]
    return row.replace(method, get_method(method).display, 1) if method in list_methods() else row


def readme_table(df, intervals) -> str:
    """The README's table of one (dataset, backbone, protocol): the first setting's folds and
    mean, every other setting's mean (a support control's as "other support"), means with
    ± half the 95% interval over episodes, and FB-IoU of the own-support settings."""
    group = tuple(df.iloc[0][["dataset", "backbone", "protocol"]])
    mt, ft = miou_table(df), fbiou_table(df)
    spread = half_widths(intervals, group)
    settings = list(dict.fromkeys(s for s, _ in mt.columns))
    own = [s for s in settings if " support" not in s]
    heads = [f"{settings[0]} F0", "F1", "F2", "F3", "**Mean**"]
    heads += ["other support" if " support" in s else f"{s} **Mean**" for s in settings[1:]]
    heads.append("FB-IoU " + "/".join(s.split("-")[0] for s in own))
    lines = ["| Method | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for row in mt.index:
        cells = [_fmt(mt.loc[row, (settings[0], f"Fold-{f}")]) for f in FOLDS]
        for s in settings:
            mean = _fmt(mt.loc[row, (s, "Mean")]) + _pm(spread, row, (s, "Mean"))
            cells.append(mean if " support" in s else f"**{mean}**")
        cells.append(" / ".join(_fmt(ft.loc[row, s]) for s in own))
        lines.append(f"| {_display(row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_readme_table(readme: Path, table: str) -> None:
    """Replace what lies between README_MARKERS in ``readme`` by ``table``."""
    text = readme.read_text()
    begin, end = README_MARKERS
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ConfigError(f"{readme} must hold the lines {begin} and {end} once each, in that order, around the table.")
    head, rest = text.split(begin, 1)
    atomic_write_text(readme, head + begin + "\n" + table + end + rest.split(end, 1)[1])


def metrics_rows(df, intervals=None) -> dict[str, dict]:
    """Per table row and shot, the mean over the folds present of mIoU and FB-IoU (fractions)
    and the mIoU interval's ends (``intervals``: :func:`pipeline.intervals.cell_intervals`),
    keyed by the file's path under ``metrics/`` (``synthetic-small-pfenet/apanet-1shot.json``)."""
    rows = {}
    key = ["dataset", "backbone", "protocol", "method", "variant", "train_shot", "shot", "support"]
    for (dataset, backbone, protocol, method, variant, train_shot, shot, support), g in df.groupby(
            key, dropna=False, sort=True):
        name = method + ("" if variant == "trained" else f"-{variant}")
        if not (isinstance(train_shot, float) and math.isnan(train_shot)) and int(train_shot) != 1:
            name += f"-trained{int(train_shot)}shot"
        control = "" if support == "own" else f"-{support}-support"
        row = {"method": method, "shot": int(shot), "folds": int(g["fold"].nunique()),
               "miou": float(g.groupby("fold")["miou"].mean().mean()), "fb_iou": float(g["fb_iou"].mean())}
        if intervals is not None:
            cell = intervals[(intervals["dataset"] == dataset) & (intervals["backbone"] == backbone)
                             & (intervals["protocol"] == protocol) & (intervals["fold"] == MEAN)
                             & (intervals["row"] == _row_label(method, train_shot, variant))
                             & (intervals["setting"] == _setting(shot, support))]
            if len(cell) and not math.isnan(cell["low"].iloc[0]):
                row |= {"miou_low": float(cell["low"].iloc[0]) / 100, "miou_high": float(cell["high"].iloc[0]) / 100}
        rows[f"{dataset}-{backbone}-{protocol}/{name}-{int(shot)}shot{control}.json"] = row | (
            {} if support == "own" else {"support_control": support})
    return rows


def _write_metrics(df, directory: Path, intervals=None) -> None:
    """The files of :func:`metrics_rows` under ``directory``; older .json files there are removed."""
    rows = metrics_rows(df, intervals)
    for old in directory.rglob("*.json") if directory.is_dir() else []:
        if old.relative_to(directory).as_posix() not in rows:
            old.unlink()
    for name, row in rows.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        write_json(directory / name, row)


def aggregate_command(
    runs: Path = typer.Option(..., "--runs", help="Directory searched (recursively) for evaluation JSON files."),
    out: Path = typer.Option(..., help="Output directory for results.csv, tables and chart."),
    wandb: Optional[bool] = typer.Option(None, "--wandb/--no-wandb", help="Log the tables to W&B as tables (default: tracking.wandb of ./params.yaml)."),
    bootstrap_replicates: int = typer.Option(DEFAULT_REPLICATES, "--bootstrap-replicates", min=1,
                                             help="Bootstrap replicates of every interval (resampled episodes)."),
    bootstrap_seed: int = typer.Option(DEFAULT_SEED, "--bootstrap-seed", min=0, help="Seed of the bootstrap's draws."),
    readme: Optional[Path] = typer.Option(None, "--readme", help=f"Also write the README table ({README_TABLE}) "
                                          f"into this file, between {README_MARKERS[0]} and {README_MARKERS[1]}."),
) -> None:
    """Collect evaluations into results.csv and the papers' tables with 95% intervals and paired
    differences (Markdown, LaTeX, CSV, PNG)."""
    tracking = tracking_defaults(load_params(None)[0], dataset=None)
    report = aggregate(runs, out, Bootstrap(replicates=bootstrap_replicates, seed=bootstrap_seed))
    if readme is not None:
        write_readme_table(readme, (Path(out) / README_TABLE).read_text())
    log_aggregate(dataclasses.replace(tracking, wandb=tracking.wandb if wandb is None else wandb), out,
                  warn=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))
    console.print(f"[green]aggregated[/green] {report['evaluations']} evaluations -> {out}", highlight=False, soft_wrap=True)
    console.print((Path(out) / "table_miou.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    typer.echo(json.dumps(report, sort_keys=True))
