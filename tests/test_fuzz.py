"""Property-based tests (hypothesis) of the two doors untrusted input comes through.

* Config: any mapping (YAML) or any ``--section.field value`` command line either gives a
  valid :class:`SegrlConfig` or raises :class:`ConfigError` naming the field; never another
  exception.
* Data: any JSON Lines / JSON file either loads, with every row well formed, or raises
  :class:`DatasetError` naming the file and the row of the first bad record; with
  ``skip_bad_rows`` it always loads, and rows + skipped = records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segrl.configs import ConfigError, SegrlConfig, load_config
from segrl.configs.loader import build
from segrl.tasks.math_datasets import DatasetError, load_rows

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------

SECTIONS = {f.name: typing.get_type_hints(SegrlConfig)[f.name] for f in dataclasses.fields(SegrlConfig)}
FIELDS = {s: [f.name for f in dataclasses.fields(tp)] for s, tp in SECTIONS.items()}

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["true", "no", "none", "1e-4", "-1", "0", "3.5", "nan", "inf", "grpo", "a,b", ""])
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6
)


@st.composite
def section_dicts(draw):
    out = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)) | st.text(max_size=6), max_size=4)):
        if name in FIELDS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(FIELDS[name]) | st.text(max_size=6), max_size=4))
            out[name] = {k: draw(values) for k in keys}
        else:
            out[name] = draw(values)
    return out


@FUZZ
@given(section_dicts())
def test_config_mapping_is_valid_or_config_error(data):
    try:
        cfg = build(SegrlConfig, data)
    except ConfigError as e:
        assert str(e)  # names the field (see test_bad_data for the exact messages)
        return
    assert isinstance(cfg, SegrlConfig)
    # Whatever was accepted is usable: finite numbers where numbers are expected.
    for sec in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            v = getattr(getattr(cfg, sec.name), f.name)
            if isinstance(v, float):
                assert math.isfinite(v), f"{sec.name}.{f.name} accepted {v!r}"


dotted = st.sampled_from([f"{s}.{f}" for s, fs in FIELDS.items() for f in fs]) | st.text(min_size=1, max_size=10)
cli_values = st.text(max_size=10) | st.sampled_from(["1", "-1", "0.5", "nan", "inf", "true", "none", "x,y", "1e9", "-0"])


@FUZZ
@given(st.dictionaries(dotted, cli_values, max_size=5))
def test_cli_overrides_are_valid_or_config_error(overrides):
    try:
        load_config(None, overrides)
    except ConfigError:
        pass


_ARG_WORDS = ["--train.max_steps", "--algo", "--skip-bad-rows", "--x", "--log.progress", "1"]


@FUZZ
@given(st.lists(st.text(max_size=12) | st.sampled_from(_ARG_WORDS), max_size=6))
def test_cli_argument_lists_never_crash(argv):
    """Any argument list: parsed, or a SystemExit / ConfigError with a message."""
    from segrl.cli import _split_overrides

    try:
        load_config(None, _split_overrides(argv))
    except SystemExit as e:
        assert str(e.code).startswith("segrl:")
    except ConfigError:
        pass


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(["", " ", "\t"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["role", "content", "x"]), inner, max_size=2),
    max_leaves=4,
)
no_newlines = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)


@st.composite
def records(draw):
    kind = draw(st.sampled_from(["good", "object", "object", "garbage", "blank", "scalar"]))
    if kind == "good":
        return json.dumps({"prompt": draw(st.text(min_size=1, max_size=10).filter(str.strip)), "answer": draw(st.integers())})
    if kind == "object":
        rec = {}
        if draw(st.booleans()):
            rec["prompt"] = draw(json_values)
        if draw(st.booleans()):
            rec["answer"] = draw(json_values)
        return json.dumps(rec)
    if kind == "garbage":
        return draw(no_newlines)
    if kind == "blank":
        return ""
    return json.dumps(draw(json_values))


def _check_rows(rows):
    for r in rows:
        p = r["prompt"]
        assert (isinstance(p, str) and p.strip()) or (isinstance(p, list) and p)
        assert isinstance(r["answer"], str) and r["answer"].strip()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records(), max_size=12))
def test_jsonl_loader_gives_rows_or_names_the_first_bad_row(lines):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(l + "\n" for l in lines))
        n_records = sum(1 for l in lines if l.strip())
        # Row ids = line numbers (no 'id' column is used), so we know which lines were kept.
        lenient = load_rows(path, skip_bad_rows=True, id_column="\0line")
        assert len(lenient.rows) + lenient.skipped == n_records
        _check_rows(lenient.rows)
        kept = {r["id"] for r in lenient.rows}
        bad_lines = [i for i, l in enumerate(lines, 1) if l.strip() and i not in kept]
        try:
            strict = load_rows(path, id_column="\0line")
        except DatasetError as e:
            assert bad_lines, f"rejected a file with no bad rows: {e}"
            assert str(e).startswith(f"{path}: row {bad_lines[0]}: "), str(e)
        else:
            assert not bad_lines
            assert strict.rows == lenient.rows and strict.skipped == 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=8))
def test_json_array_loader_gives_rows_or_dataset_error(items):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(items, f)
        try:
            got = load_rows(path)
        except DatasetError as e:
            assert str(e).startswith(f"{path}: "), str(e)
            return
        _check_rows(got.rows)
        lenient = load_rows(path, skip_bad_rows=True)
        assert lenient.rows == got.rows
