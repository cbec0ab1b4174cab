"""PromQL result parsing and safe label matchers (values from alert labels are quoted, never code)."""

from __future__ import annotations

import pytest

from tasks.prometheus import PromQLError, Sample, label_matcher, parse_result, promql_string

PARSE_CASES = [
    (
        {"resultType": "vector", "result": [{"metric": {"job": "a"}, "value": [1, "0.5"]}]},
        [Sample(labels={"job": "a"}, value=0.5)],
    ),
    ({"resultType": "vector", "result": []}, []),
    ({"resultType": "scalar", "result": [1, "3"]}, [Sample(labels={}, value=3.0)]),
    (
        {"resultType": "vector", "result": [{"metric": {}, "value": [1, "NaN"]}]},
        [Sample(labels={}, value=None)],
    ),
    (
        {"resultType": "vector", "result": [{"metric": {}, "value": [1, "+Inf"]}]},
        [Sample(labels={}, value=float("inf"))],
    ),
]


@pytest.mark.parametrize(("data", "expected"), PARSE_CASES)
def test_parse_result(data: dict, expected: list[Sample]) -> None:
    assert parse_result(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        {"resultType": "matrix", "result": []},
        {"resultType": "string", "result": [1, "x"]},
    ],
)
def test_parse_result_refuses_what_is_not_an_instant_value(data: dict) -> None:
    with pytest.raises(PromQLError):
        parse_result(data)


MATCHER_CASES = [
    ("service", "orders", "=", 'service="orders"'),
    ("service", 'a"} or vector(1) #', "=", 'service="a\\"} or vector(1) #"'),
    ("path", "C:\\temp", "=", 'path="C:\\\\temp"'),
    ("job", "a\nb", "!=", 'job!="a\\nb"'),
    ("stage", "gateway|kafka", "=~", 'stage=~"gateway|kafka"'),
]


@pytest.mark.parametrize(("name", "value", "op", "expected"), MATCHER_CASES)
def test_label_matcher_quotes_the_value(name: str, value: str, op: str, expected: str) -> None:
    assert label_matcher(name, value, op) == expected


@pytest.mark.parametrize(("name", "op"), [("1abc", "="), ("a-b", "="), ('x"', "="), ("ok", "==")])
def test_label_matcher_refuses_bad_names_and_operators(name: str, op: str) -> None:
    with pytest.raises(ValueError):
        label_matcher(name, "v", op)


def test_promql_string_round_trips_quotes() -> None:
    assert promql_string('say "hi"') == '"say \\"hi\\""'
