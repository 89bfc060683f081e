"""``report.html``: one self-contained page (inline CSS, a few lines of JS, images as ``data:`` URIs).

Markup only: the caller hands over the report, the embedded plots, the galleries and the notes (see
:mod:`finetune.runs.report_page`, which gathers them from a run). No server, no network: the file opens in any browser.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from finetune.eval.run_report import RunReport
from finetune.eval.tables import HEADLINE, SUMMARY_KEYS, class_columns, unknown_line

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#1b1b1b}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 4px}h4{font-size:13px;margin:8px 0 4px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:6px 0 16px}
td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f4f4f4;position:sticky;top:0}
th.sort{cursor:pointer}th.sort:after{content:" \\2195";color:#999}.up{color:#1a7f37}.down{color:#b42318}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.tiles{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:260px;font-size:12px}
figure img{width:128px;height:128px;object-fit:contain;background:#eee}figcaption{word-break:break-word}
.plot{max-width:100%}.scroll{max-height:520px;overflow:auto;display:inline-block}
nav a{margin-right:12px}
"""

# Click a header of a .sortable table to sort by that column (numbers as numbers, "-" last); again to reverse.
JS = """
document.querySelectorAll('table.sortable th').forEach((th,i)=>{th.classList.add('sort');th.onclick=()=>{
const tb=th.closest('table').tBodies[0],rows=[...tb.rows],dir=th.dataset.dir==='1'?-1:1;th.dataset.dir=dir;
const key=r=>{const t=r.cells[i].textContent.trim(),n=parseFloat(t);return isNaN(n)?t:n};
rows.sort((a,b)=>{const x=key(a),y=key(b);if(x==='-')return 1;if(y==='-')return -1;
return (typeof x==='number'&&typeof y==='number'?x-y:String(x).localeCompare(String(y)))*dir});
rows.forEach(r=>tb.appendChild(r))}});
"""


@dataclass
class Tile:
    """One shown image: its thumbnail, an optional CAM overlay, and a caption."""

    uri: str | None  # None: the image could not be read (the caption says so)
    caption: str
    cam_uri: str | None = None


@dataclass
class Gallery:
    """One class's (or one confusion's) images, in titled rows."""

    key: str  # the HTML id: class-<index>
    title: str
    rows: list[tuple[str, list[Tile]]] = field(default_factory=list)


@dataclass
class Page:
    """Everything ``report.html`` shows."""

    title: str
    report: RunReport
    notes: list[str] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (caption, data URI)
    galleries: list[Gallery] = field(default_factory=list)
    gallery_note: str = ""
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)  # (title, header, rows)


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _pct(x: object) -> str:
    return "-" if not isinstance(x, int | float) or x != x else f"{100 * x:.1f}"


def table(header: list[str], rows: list[list[str]], sortable: bool = False, raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    cell = (lambda c: c) if raw else _e
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    cls = ' class="sortable"' if sortable else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary(report: RunReport) -> str:
    """The honest calibration gain and each split's headline numbers."""
    parts = []
    cal, h = report.calibration, report.honest
    if cal and h:
        rows = []
        for k in HEADLINE:
            f, c = h.fixed[k], h.calibrated[k]
            arrow = "up" if c > f else "down" if c < f else ""
            rows.append([k, _pct(f), f'<span class="{arrow}">{_pct(c)}</span>'])
        parts.append(
            f"<p>Thresholds fitted on <b>{_e(cal['fitted_on'])}</b> ({_e(cal['metric'])}); the gain measured on data "
            f"they were not fitted on (<b>{_e(h.how)}</b>):</p>"
            + table(["metric", f"fixed {report.threshold or 0.5:g}", "calibrated"], rows, raw=True)
        )
    keys = [k for k in SUMMARY_KEYS if k in next(iter(report.splits.values())).summary]
    if not keys:  # single-label
        keys = ["top1", "top5", "mean_recall", "map"]
    rows = []
    for name, split in report.splits.items():
        cal_summary = split.calibrated_summary
        rows.append([name, "fixed" if cal_summary is not None else "", str(split.images)])
        rows[-1] += [_pct(split.summary.get(k)) for k in keys]
        if cal_summary is not None:
            rows.append([name, "calibrated", str(split.images)] + [_pct(cal_summary[k]) for k in keys])
    parts.append(table(["split", "thresholds", "images", *keys], rows))
    if unknown_line(report):
        parts.append(f"<p>{_e(str(unknown_line(report)))}</p>")
    return "\n".join(parts)


def _per_class(report: RunReport, split: str, linked: set[str]) -> str:
    """The sortable per-class table of one split; a class with a gallery (its id in ``linked``) links to it."""
    rows = report.splits[split].per_class

    def name(r: dict[str, Any]) -> str:
        key = f"class-{r['index']}"
        return f'<a href="#{key}">{_e(r["name"])}</a>' if key in linked else _e(r["name"])

    has_cal = rows and "threshold_cal" in rows[0]
    if rows and "ap" not in rows[0]:  # single-label
        header = ["class", "support", "recall", "precision"]
        body = [[name(r), str(r["support"]), _pct(r["recall"]), _pct(r["precision"])] for r in rows]
        return table(header, body, sortable=True, raw=True)
    unknown = bool(report.splits[split].unknown)
    header = class_columns(report.splits[split])
    body = []
    for r in rows:
        counts = [str(r["support"])] + ([str(r["unknown"])] if unknown else [])
        cells = [name(r), *counts, _pct(r["ap"]), _pct(r["precision"]), _pct(r["recall"]), _pct(r["f1"])]
        if has_cal:
            cells += [f"{r['threshold_cal']:.3f}", _pct(r["precision_cal"]), _pct(r["recall_cal"]), _pct(r["f1_cal"])]
        body.append(cells)
    return table(header, body, sortable=True, raw=True)


def _tile(t: Tile) -> str:
    imgs = f'<img src="{t.uri}" alt="image">' if t.uri else '<img alt="unreadable">'
    if t.cam_uri:
        imgs += f'<img src="{t.cam_uri}" alt="class-activation map">'
    return f"<figure>{imgs}<figcaption>{_e(t.caption)}</figcaption></figure>"


def _gallery(g: Gallery) -> str:
    rows = "".join(
        f"<h4>{_e(head)}</h4>"
        + (f'<div class="tiles">{"".join(_tile(t) for t in tiles)}</div>' if tiles else "<p>none</p>")
        for head, tiles in g.rows
    )
    return f'<section class="gallery" id="{_e(g.key)}"><h3>{_e(g.title)}</h3>{rows}</section>'


def render(page: Page, split: str) -> str:
    """The whole page as one HTML string; ``split`` is the one the per-class table and galleries show."""
    nav = ["summary", "classes", "plots", "galleries"] + [f"table-{i}" for i in range(len(page.tables))]
    names = ["summary", "per class", "plots", "galleries"] + [t[0] for t in page.tables]
    per_class = _per_class(page.report, split, {g.key for g in page.galleries})
    body = [
        f"<h1>{_e(page.title)}</h1>",
        "<nav>" + "".join(f'<a href="#{n}">{_e(label)}</a>' for n, label in zip(nav, names)) + "</nav>",
        *(f'<p class="note">{_e(n)}</p>' for n in page.notes),
        f'<section id="summary"><h2>Summary</h2>{_summary(page.report)}</section>',
        f'<section id="classes"><h2>Per class ({_e(split)})</h2><div class="scroll">{per_class}</div></section>',
        '<section id="plots"><h2>Plots</h2>'
        + "".join(f'<h3>{_e(c)}</h3><img class="plot" src="{uri}" alt="{_e(c)}">' for c, uri in page.plots)
        + "</section>",
        f'<section id="galleries"><h2>Galleries ({_e(split)})</h2>'
        + (f'<p class="note">{_e(page.gallery_note)}</p>' if page.gallery_note else "")
        + "".join(_gallery(g) for g in page.galleries)
        + "</section>",
    ]
    for i, (title, header, rows) in enumerate(page.tables):
        body.append(
            f'<section id="table-{i}"><h2>{_e(title)}</h2><div class="scroll">{table(header, rows, True)}</div>'
        )
        body.append("</section>")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(page.title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}<script>{JS}</script></body></html>\n"
    )
