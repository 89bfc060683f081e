"""Splitting a dataset into train/val/test: iterative stratification, every class of 3 or more images in every split.

:func:`iterative_split` is Sechidis, Tsoumakas and Vlahavas (2011), "On the stratification of multi-label data"
(ECML PKDD), the algorithm of the ``iterative-stratification`` package: labels are placed rarest first, each image
going to the split that most lacks that label (then the split that most lacks images), ties broken at random. Two
things are added, which is why it is written here rather than imported: any number of splits with their own
fractions in one pass (the package splits in two, so three splits take two passes), and a guarantee the paper does
not give: a class with at least as many images as there are splits is in every split (a split that lacks it is
served first while its images are placed, and a last pass moves one image where that was not enough). The tests
compare its proportions with the package's. Single-label data is the same with one-hot targets.

:func:`split_source` reads a folder of class folders, a CSV file without a split column, a COCO annotation file or
a VOC folder, and writes the split the same format reads: a CSV with a ``split`` column, one COCO file per split, or
VOC image sets (``ImageSets/Main/split_<name>.txt``, beside VOC's own).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from finetune.data.classfolders import IMAGE_SUFFIXES
from finetune.errors import UserError
from finetune.io import atomic_write_text

SPLITS = ("train", "val", "test")


def check_fractions(fractions: tuple[float, ...]) -> np.ndarray:
    """The fractions as an array; refused unless each is in [0, 1], train's above 0, and they sum to 1."""
    f = np.asarray(fractions, dtype=np.float64)
    if len(f) != len(SPLITS) or (f < 0).any() or f[0] <= 0 or abs(f.sum() - 1) > 1e-6:
        shown = ",".join(f"{x:g}" for x in fractions)
        raise UserError(f"--fractions {shown}: give train,val,test fractions of 0 to 1 that sum to 1, e.g. 0.8,0.1,0.1")
    return f


def _pick(scores: np.ndarray, tiebreak: np.ndarray, rng: np.random.Generator) -> int:
    """The index of the highest score, then the highest tiebreak, then at random."""
    best = np.flatnonzero(scores == scores.max())
    if len(best) > 1:
        best = best[tiebreak[best] == tiebreak[best].max()]
    return int(rng.choice(best))


def iterative_split(targets: np.ndarray, fractions: tuple[float, ...], seed: int = 0) -> np.ndarray:
    """Each image's split (0 = train, 1 = val, 2 = test).

    Args:
        targets: ``[images, classes]``; positives are values > 0.5 (NaN, an unknown label, counts as absent).
        fractions: The splits' shares of the images (train, val, test), summing to 1.
        seed: The random tie-breaks.

    Returns:
        ``[images]`` split indices.
    """
    f = check_fractions(fractions)
    y = np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0) > 0.5
    rng = np.random.default_rng(seed)
    n, k = len(y), len(f)
    want_images = f * n
    want_labels = f[:, None] * y.sum(0)[None, :]
    have = np.zeros((k, y.shape[1]), dtype=np.int64)
    split = np.full(n, -1)
    live = f > 0
    while True:
        left = y[split < 0].sum(0)
        if not left.any():
            break
        counts = np.where(left > 0, left, np.iinfo(np.int64).max)
        label = int(rng.choice(np.flatnonzero(counts == counts.min())))
        rows = rng.permutation(np.flatnonzero((split < 0) & y[:, label]))
        for r in rows:
            lacking = live & (have[:, label] == 0)
            allowed = lacking if y[:, label].sum() >= live.sum() and lacking.any() else live
            s = _pick(np.where(allowed, want_labels[:, label], -np.inf), np.where(allowed, want_images, -np.inf), rng)
            split[r], want_images[s] = s, want_images[s] - 1
            want_labels[s] -= y[r]
            have[s] += y[r]
    for r in rng.permutation(np.flatnonzero(split < 0)):  # images without a label: by the images still wanted
        s = _pick(np.where(live, want_images, -np.inf), np.zeros(k), rng)
        split[r], want_images[s] = s, want_images[s] - 1
    return _repair(y, split, live, rng)


def shortages(targets: np.ndarray, split: np.ndarray, fractions: tuple[float, ...]) -> list[tuple[int, int]]:
    """``(split, class)`` pairs where a class with at least as many images as there are splits is missing."""
    y = np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0) > 0.5
    live = np.asarray(fractions) > 0
    have = np.stack([y[split == s].sum(0) for s in range(len(live))])
    return [
        (int(s), int(c))
        for c in np.flatnonzero(y.sum(0) >= live.sum())
        for s in np.flatnonzero(live & (have[:, c] == 0))
    ]


def _repair(y: np.ndarray, split: np.ndarray, live: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give each split that still lacks a class of enough images one image of it.

    The image is moved from the split with most of the class, or swapped with one of the lacking split's own. A move
    or swap is made only when every split keeps each such class it had, so no repair undoes another; what cannot be
    repaired is left, and :func:`shortages` says so.
    """
    fractions = tuple(live.astype(float))
    stuck: set[tuple[int, int]] = set()
    while True:
        todo = [pair for pair in shortages(y, split, fractions) if pair not in stuck]
        if not todo:
            return split
        s, c = todo[int(rng.integers(len(todo)))]
        if not _give(y, split, s, c, int(live.sum())):
            stuck.add((s, c))


def _give(y: np.ndarray, split: np.ndarray, s: int, c: int, splits: int) -> bool:
    """Move (or swap) one image of class ``c`` into split ``s``, keeping every split's guaranteed classes."""
    guaranteed = y.sum(0) >= splits
    have = np.stack([y[split == t].sum(0) for t in range(len(SPLITS))]).astype(np.int64)
    for donor in np.argsort(-have[:, c], kind="stable"):
        if donor == s or have[donor, c] < 2:
            continue
        kept = guaranteed & (have[donor] > 0)
        rows = np.flatnonzero((split == donor) & y[:, c])
        for r in rows:  # a move: the donor still holds each guaranteed class it had
            if ((have[donor] - y[r])[kept] >= 1).all():
                split[r] = s
                return True
        mine = np.flatnonzero(split == s)
        held = guaranteed & (have[s] > 0)
        for r in rows:  # a swap with an image of s that gives the donor back what it loses
            donor_after = have[donor] - y[r] + y[mine]
            s_after = have[s] + y[r] - y[mine]
            ok = (donor_after[:, kept] >= 1).all(1) & (s_after[:, held] >= 1).all(1)
            if ok.any():
                q = mine[int(np.flatnonzero(ok)[0])]
                split[r], split[q] = s, donor
                return True
    return False


def _write_new(path: Path, text: str) -> None:
    """Write a file that must not exist yet: a file the user made is never replaced."""
    if path.exists():
        raise UserError(f"{path}: already exists; remove it or give another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _csv_text(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


Written = tuple[list[Path], np.ndarray, np.ndarray, list[str]]
"""What a source's splitter returns: the files written, each image's split, its targets and the class names."""


def _split_folder(root: Path, f: tuple[float, ...], seed: int, out: Path | None) -> Written:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if set(classes) & set(SPLITS):
        raise UserError(f"{root}: already holds split folders ({', '.join(sorted(set(classes) & set(SPLITS)))})")
    images = [
        (p, i)
        for i, c in enumerate(classes)
        for p in sorted((root / c).rglob("*"))
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise UserError(f"{root}: no images in class folders (root/<class>/<image>); check the path")
    y = np.eye(len(classes))[np.array([i for _, i in images])]
    split = iterative_split(y, f, seed)
    rows = [[p.relative_to(root).as_posix(), classes[i], SPLITS[s]] for (p, i), s in zip(images, split)]
    path = out or root / "splits.csv"
    _write_new(path, _csv_text(["path", "label", "split"], rows))
    return [path], split, y, classes


def _split_csv(src: Path, f: tuple[float, ...], seed: int, out: Path | None, sep: str) -> Written:
    with src.open(newline="", encoding="utf-8-sig") as fh:
        table = list(csv.reader(fh))
    if len(table) < 2:
        raise UserError(f"{src}: no rows below the header; a CSV of path and labels is split")
    header, rows = table[0], table[1:]
    if "split" in header:
        raise UserError(f"{src}: already has a split column; remove it to split again")
    if "labels" in header or "label" in header:
        col = header.index("labels" if "labels" in header else "label")
        names = [[x for x in row[col].split(sep) if x and not x.startswith("-")] for row in rows]
        classes = sorted({x for n in names for x in n})
        y = np.array([[c in n for c in classes] for n in names], dtype=np.float64).reshape(len(rows), len(classes))
    else:  # class columns: 0 / 1 / empty (unknown)
        cols = [i for i, h in enumerate(header) if h not in ("path", "unknown")]
        classes = [header[i] for i in cols]
        y = np.array([[row[i].strip() == "1" for i in cols] for row in rows], dtype=np.float64)
    split = iterative_split(y, f, seed)
    path = out or src.with_name(f"{src.stem}.split.csv")
    _write_new(path, _csv_text([*header, "split"], [[*row, SPLITS[s]] for row, s in zip(rows, split)]))
    return [path], split, y, classes


def _split_coco(src: Path, f: tuple[float, ...], seed: int, out: Path | None) -> Written:
    try:
        doc = json.loads(src.read_text(encoding="utf-8"))
        images, anns, cats = doc["images"], doc.get("annotations", []), doc["categories"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{src}: not a COCO annotation file ({type(err).__name__}: {err})") from None
    if not images:
        raise UserError(f"{src}: no images to split")
    row = {im["id"]: i for i, im in enumerate(images)}
    col = {c["id"]: j for j, c in enumerate(cats)}
    y = np.zeros((len(images), len(cats)))
    for a in anns:
        if a.get("image_id") in row and a.get("category_id") in col:
            y[row[a["image_id"]], col[a["category_id"]]] = 1
    split = iterative_split(y, f, seed)
    folder = out or src.parent
    paths = _new_files([folder / f"{src.stem}_{name}.json" for name in SPLITS], f)
    for s, p in paths.items():
        ids = {im["id"] for im, k in zip(images, split) if k == s}
        part = {**doc, "images": [im for im in images if im["id"] in ids]}
        part["annotations"] = [a for a in anns if a.get("image_id") in ids]
        _write_new(p, json.dumps(part))
    return list(paths.values()), split, y, [str(c.get("name", c["id"])) for c in cats]


def _split_voc(root: Path, f: tuple[float, ...], seed: int, out: Path | None) -> Written:
    """VOC image sets ``ImageSets/Main/split_{train,val,test}.txt`` beside its own (``data.train = "split_train"``)."""
    from finetune.data.voc import read_objects

    xmls = sorted((root / "Annotations").glob("*.xml"))
    if not xmls:
        raise UserError(f"{root / 'Annotations'}: no .xml annotation files to split")
    objects = []
    for x in xmls:  # positives as the reader counts them by default: difficult objects leave a class unknown
        try:
            objects.append([o[0] for o in read_objects(x, str(x))[1] if not o[1]])
        except UserError:  # an annotation the reader refuses (no object): the image is split with no label
            objects.append([])
    names = sorted({n for objs in objects for n in objs})
    y = np.array([[n in objs for n in names] for objs in objects], dtype=np.float64).reshape(len(xmls), len(names))
    split = iterative_split(y, f, seed)
    folder = out or root / "ImageSets" / "Main"
    paths = _new_files([folder / f"split_{name}.txt" for name in SPLITS], f)  # VOC's own train.txt is never touched
    for s, p in paths.items():
        _write_new(p, "".join(f"{x.stem}\n" for x, k in zip(xmls, split) if k == s))
    return list(paths.values()), split, y, names


def _new_files(paths: list[Path], f: tuple[float, ...]) -> dict[int, Path]:
    """The files of the splits with a share (a split of fraction 0 gets none), all refused if any exists."""
    chosen = {s: p for s, p in enumerate(paths) if f[s] > 0}
    for p in chosen.values():
        if p.exists():
            raise UserError(f"{p}: already exists; remove it or give another --out folder")
    return chosen


def split_source(
    src: Path, fractions: tuple[float, ...], seed: int = 0, out: Path | None = None, label_sep: str = "|"
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Split class folders, a CSV without a split column, a COCO file or a VOC folder; write what its format reads.

    Returns:
        The files written, each image's split (0 = train, 1 = val, 2 = test) in the source's order, and notes: a
        class of 3 or more images that could not be put in every split.

    Raises:
        UserError: For fractions that do not sum to 1, an output that exists, a source with no images, or another
            kind of source.
    """
    check_fractions(fractions)
    src = Path(src)
    if src.is_dir() and (src / "Annotations").is_dir():
        written = _split_voc(src, fractions, seed, out)
    elif src.is_dir():
        written = _split_folder(src, fractions, seed, out)
    elif src.suffix.lower() == ".csv" and src.is_file():
        written = _split_csv(src, fractions, seed, out, label_sep)
    elif src.suffix.lower() == ".json" and src.is_file():
        written = _split_coco(src, fractions, seed, out)
    else:
        raise UserError(f"{src}: give a folder of class folders, a VOC folder, a path-and-labels .csv or a COCO .json")
    paths, split, y, names = written
    notes = [
        f"{names[c]!r} ({int(y[:, c].sum())} images) has none in {SPLITS[s]}: no move kept every other class placed"
        for s, c in shortages(y, split, fractions)
    ]
    return paths, split, notes
