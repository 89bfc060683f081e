"""Fuzzing the recipe loader and the COCO, VOC and CSV readers: every input is read, or refused as a ``UserError``.

Nothing else may escape (a ``KeyError``, ``TypeError``, ``RecursionError``...): the CLI turns a ``UserError`` into one
line and exit code 2, anything else into a traceback. Hypothesis draws the inputs; the example counts keep the
whole file near 30 s on 2 cores (``derandomize``: the same examples every run, so CI cannot fail by chance).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.config import load_recipe
from finetune.data.coco import read_coco_split
from finetune.data.csvfile import read_csv_split
from finetune.data.voc import read_objects
from finetune.errors import UserError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
SECTIONS = ["data", "model", "loss", "optim", "freeze", "train", "calibrate", "output", "log", "nosuch"]
KEYS = [
    "root", "format", "image_size", "batch_size", "name", "lr", "epochs", "seed", "stages", "train", "bn",
    "threshold", "objective", "holdout", "augment", "scale", "classes", "annotations", "images", "dir", "x",
]  # fmt: skip
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.booleans(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=3),
    max_leaves=8,
)
recipes = st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), values, max_size=4), max_size=5
)


def _only_user_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except UserError as err:
        assert "\n" not in str(err).strip(), str(err)


@FUZZ
@given(recipe=recipes)
def test_the_recipe_loader_reads_or_refuses_any_recipe(recipe: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.toml"
        try:
            path.write_text(tomli_w.dumps(recipe))
        except (TypeError, ValueError):  # a value TOML cannot hold (NaN is fine, a huge int is not)
            return
        _only_user_errors(load_recipe, path)


@FUZZ
@given(text=st.text(max_size=200))
def test_the_recipe_loader_reads_or_refuses_any_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.toml"
        path.write_text(text)
        _only_user_errors(load_recipe, path)


ids = st.one_of(st.integers(-3, 5), st.booleans(), st.text(max_size=3), st.none(), st.lists(st.integers(0, 3)))
entry = st.dictionaries(
    st.sampled_from(["id", "file_name", "name", "image_id", "category_id", "bbox", "iscrowd", "neg_category_ids"]),
    st.one_of(ids, st.lists(st.floats(allow_nan=True), max_size=5), st.text(max_size=8)),
    max_size=6,
)
coco_docs = st.one_of(
    st.dictionaries(
        st.sampled_from(["images", "categories", "annotations", "info"]),
        st.one_of(st.lists(entry, max_size=4), entry, ids),
        max_size=4,
    ),
    values,
)


@FUZZ
@given(doc=coco_docs)
def test_the_coco_reader_reads_or_refuses_any_annotation_file(doc: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "annotations").mkdir()
        (Path(tmp) / "annotations" / "instances_train.json").write_text(json.dumps(doc))
        _only_user_errors(read_coco_split, tmp, "train")


xml_tags = st.sampled_from(["annotation", "object", "name", "difficult", "bndbox", "xmin", "ymax", "filename", "x"])
xml_text = st.recursive(
    st.text(alphabet="ab0.9-n <>&", max_size=6),
    lambda inner: st.builds(lambda t, body: f"<{t}>{body}</{t}>", xml_tags, st.lists(inner, max_size=3).map("".join)),
    max_leaves=10,
)


@FUZZ
@given(
    body=xml_text,
    declaration=st.sampled_from(
        ["", '<?xml version="1.0" encoding="klingon"?>', '<?xml version="1.0" encoding="gbk"?>', "\ufeff"]
    ),
)
def test_the_voc_reader_reads_or_refuses_any_annotation_file(body: str, declaration: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "a.xml"
        xml.write_text(declaration + body)
        _only_user_errors(read_objects, xml, "train.txt:1")


csv_cells = st.text(alphabet='ab|-,"\n =0', max_size=8)


@FUZZ
@given(
    header=st.lists(st.sampled_from(["path", "labels", "split", "unknown", "", "a", "b"]), min_size=0, max_size=5),
    rows=st.lists(st.lists(csv_cells, max_size=5), max_size=5),
    single=st.booleans(),
)
def test_the_csv_reader_reads_or_refuses_any_table(header: list[str], rows: list[list[str]], single: bool) -> None:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "data.csv").write_text(buf.getvalue())
        _only_user_errors(read_csv_split, tmp, "train", "data.csv", "|", None, None, None, single)
