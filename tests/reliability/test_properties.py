"""Scenario 5: the two wire encoders round-trip any Unicode text through the sandbox's parsers.

* The client's ``application/x-www-form-urlencoded`` body, read back by the
  sandbox's form parser, and once more end to end over HTTP.
* The bulk CSV writer (``bulk_csv.RowEncoder`` + ``PartWriter``), read back by
  the sandbox's CSV parser and applied by its customer rules.

"Any" means every code point UTF-8 can carry, except what our validators
refuse on purpose (NUL) and what a text column cannot hold (surrogates).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from django_satori import bulk_csv
from django_satori.client import ENDPOINTS, FORM_CONTENT_TYPE, SatoriClient
from django_satori.conf import get_settings
from django_satori.sandbox import bulk as sandbox_bulk
from django_satori.sandbox.config import build_config
from django_satori.sandbox.forms import parse_body
from django_satori.sandbox.rules import parse_customer
from django_satori.schema import DATA_FIELDS, clean_customer, customer_form_fields

#: Every code point but NUL (refused by our validators) and surrogates (not UTF-8).
any_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=60,
)
#: Characters that break naive encoders, mixed in so every example meets some.
hostile = st.sampled_from(
    [
        "&",
        "=",
        "+",
        "%",
        "%20",
        "[",
        "]",
        ";",
        ",",
        '"',
        "'",
        "\r",
        "\n",
        "\r\n",
        "\t",
        " ",
        "\ufeff",
        "\u2028",
        "🎉",
        "👨‍👩‍👧",
        "ｱ",
        "\x7f",
        "\x1b",
        "%00",
        "\\",
        "ñ",
        "\u0301",
    ]
)
texts = st.lists(any_text | hostile, min_size=1, max_size=4).map("".join)

TEXT_FIELDS = (
    "last_name",
    "first_name",
    "last_name_reading",
    "first_name_reading",
    "lead_company_name",
    "department",
    "phone_number",
    "mobile_phone_number",
    "address",
    "memo",
    "collection_route",
)
CUSTOM = {"plan": "text", "age": "integer", "birthday": "date"}


def _label(key: str) -> str:
    return key


# --------------------------------------------------------------------------- form encoder


@settings(max_examples=300, deadline=None)
@given(values=st.fixed_dictionaries({name: texts for name in TEXT_FIELDS}), plan=texts)
@example(values={name: "a&b=c+d%20e" for name in TEXT_FIELDS}, plan="100%")
def test_form_body_round_trips_through_the_sandbox_parser(values, plan):
    conf = dataclasses.replace(get_settings(), CUSTOM_FIELDS=CUSTOM)
    cleaned = clean_customer(
        {"email": "taro@example.jp", **values, "custom:plan": plan}, custom_fields=CUSTOM
    )
    pairs = customer_form_fields("email", cleaned)
    client = SatoriClient(conf)
    method, path = ENDPOINTS["customer/upsert"]
    wire = client._form_wire("customer/upsert", method, path, pairs)
    media, parsed, files = parse_body(FORM_CONTENT_TYPE, wire.body)
    assert (media, files) == ("application/x-www-form-urlencoded", [])
    auth = [
        (name, getattr(conf, name.upper()))
        for name in ("user_key", "user_secret", "company_key", "company_secret")
    ]
    assert parsed == auth + pairs
    # ...and the sandbox's rules keep every value as it was sent.
    items = {
        k[len("customer[") : -1]: v
        for k, v in parsed
        if k.startswith("customer[") and k != "customer[identity_type]"
    }
    data = parse_customer(items, "email", build_config(custom_fields=CUSTOM), label=_label)
    assert data.fields == {k: v for k, v in values.items()}
    assert data.custom == {"plan": plan}


@pytest.mark.django_db
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(memo=texts, last_name=texts)
def test_any_text_reaches_the_sandbox_unchanged_over_http(satori_sandbox, memo, last_name):
    client = SatoriClient(get_settings())
    client.upsert_customer({"email": "taro@example.jp", "memo": memo, "last_name": last_name})
    remote = satori_sandbox.state.customer("taro@example.jp")
    assert (remote.fields["memo"], remote.fields["last_name"]) == (memo, last_name)


# --------------------------------------------------------------------------- CSV writer


rows = st.lists(
    st.fixed_dictionaries(
        {name: texts for name in TEXT_FIELDS}
        | {
            "plan": texts,
            "tags": st.lists(
                texts.filter(lambda t: "," not in t and t.strip() == t and t), max_size=3
            ),
        }
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(rows=rows)
@example(rows=[{**{name: "\r" for name in TEXT_FIELDS}, "plan": '"', "tags": []}])
@example(
    rows=[{**{name: 'a\r\nb\n"c",d' for name in TEXT_FIELDS}, "plan": "\ufeffx", "tags": ["🎉"]}]
)
def test_csv_part_round_trips_through_the_sandbox_csv_parser(rows):
    conf = dataclasses.replace(get_settings(), CUSTOM_FIELDS=CUSTOM)
    encoder = bulk_csv.RowEncoder(conf)
    writer = bulk_csv.PartWriter(encoder.header)
    expected = []
    for i, row in enumerate(rows):
        email = f"row{i}@example.jp"
        fields = {name: row[name] if name in TEXT_FIELDS else "" for name in DATA_FIELDS}
        fields["collection_date"] = None
        values = (
            i + 1,
            email,
            *(fields[name] for name in DATA_FIELDS),
            row["tags"],
            {"custom:plan": row["plan"]},
        )
        writer.add(i + 1, encoder.encode(values))
        expected.append((email, row))
    data = writer.finish().read()
    writer.close()
    config = build_config(custom_fields=CUSTOM)
    header, records = sandbox_bulk.parse_csv(data, "email", config)
    # BULK_CSV_COLUMNS = "filled": the columns some row fills, in the encoder's order.
    assert header == [name for name in encoder.header if name in header]
    assert {"email", "collection_route", "custom:plan"} <= set(header)
    assert [number for number, _cells in records] == list(range(2, len(rows) + 2))
    for (_number, cells), (email, row) in zip(records, expected, strict=True):
        data_in = parse_customer(
            dict(zip(header, cells, strict=True)),
            "email",
            config,
            label=_label,
            require_collection_route=True,
        )
        assert data_in.email == email
        assert data_in.fields == {name: row[name] for name in TEXT_FIELDS}
        assert data_in.custom == {"plan": row["plan"]}
        assert data_in.append_tags == list(dict.fromkeys(row["tags"]))


def test_csv_writer_writes_dates_and_permissions_the_sandbox_accepts():
    conf = dataclasses.replace(get_settings(), CUSTOM_FIELDS=CUSTOM)
    encoder = bulk_csv.RowEncoder(conf)
    values = {name: "" for name in DATA_FIELDS}
    values.update(
        collection_route="web", collection_date=dt.date(2026, 2, 28), delivery_permission="reject"
    )
    writer = bulk_csv.PartWriter(encoder.header)
    writer.add(
        1,
        encoder.encode(
            (
                1,
                "a@example.jp",
                *(values[n] for n in DATA_FIELDS),
                [],
                {"custom:age": 7, "custom:birthday": "2000/01/02"},
            )
        ),
    )
    config = build_config(custom_fields=CUSTOM)
    header, [(_n, cells)] = sandbox_bulk.parse_csv(writer.finish().read(), "email", config)
    writer.close()
    data = parse_customer(dict(zip(header, cells, strict=True)), "email", config, label=_label)
    assert data.fields["collection_date"] == "2026-02-28"
    assert data.fields["delivery_permission"] == "reject"
    assert data.custom == {"age": "7", "birthday": "2000-01-02"}
