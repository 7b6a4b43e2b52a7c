"""The results record (qpgevent.results): what each check concluded, merged, read back by name."""

from __future__ import annotations

import pytest

from qpgevent.connection import Connection
from qpgevent.plugin import Plugin
from qpgevent.results import AUTH_OUTCOMES, OUTCOMES, Results
from qpgevent.transaction import Transaction


class Check(Plugin):
    pass


def test_add_merges_words_once_and_updates_evidence():
    results = Results()
    dnsbl = Check("dnsbl", {})
    results.add(dnsbl, fail="zen.test", listings={"zen.test": "spam"})
    results.add(dnsbl, pass_=["clean.test", "other.test"], fail="zen.test", score=1.0)
    found = results.get("dnsbl")
    assert found is results.get(dnsbl)
    assert (found.fail, found.passed, found.skip, found.err) == (["zen.test"], ["clean.test", "other.test"], [], [])
    assert found["listings"] == {"zen.test": "spam"} and found.get("score") == 1.0 and found.get("nothing") is None
    assert found.failed and found.outcome == "fail"
    assert results.summary() == "dnsbl=fail:zen.test"


@pytest.mark.parametrize("given, outcome", [
    ({"skip": "immune"}, "skip"), ({"pass_": "iprev"}, "pass"), ({"pass_": "a", "fail": "b"}, "fail"),
    ({"fail": "b", "err": "c"}, "err"), ({}, "skip"),
])
def test_the_outcome_is_the_worst_recorded(given, outcome):
    results = Results()
    assert results.add("core", **given).outcome == outcome


def test_has_get_contains_and_order():
    results = Results()
    results.add("fcrdns", pass_="iprev", iprev="pass")
    results.add("helo", fail="plain_ip")
    assert results.has("fcrdns", "pass") and results.has("fcrdns", "pass", "iprev")
    assert not results.has("fcrdns", "fail") and not results.has("dnsbl", "pass")
    assert "helo" in results and "dnsbl" not in results and len(results) == 2
    assert [result.plugin for result in results] == ["fcrdns", "helo"]
    assert results.get("dnsbl") is None
    with pytest.raises(ValueError, match="outcome 'passed'"):
        results.has("fcrdns", "passed")


def test_record_names_the_outcome_as_data():
    results = Results()
    for spf_result in ("softfail", "temperror", "none"):
        results.record("spf:" + spf_result, AUTH_OUTCOMES[spf_result], "spf", result=spf_result)
    assert [r.summary() for r in results] == ["fail:spf", "err:spf", "skip:spf"]
    assert set(AUTH_OUTCOMES.values()) <= set(OUTCOMES)
    with pytest.raises(ValueError):
        results.record("x", "maybe", "spf")


def test_connections_and_transactions_each_have_their_own():
    connection, transaction = Connection("192.0.2.1", 25), Transaction()
    connection.results.add("dnsbl", fail="zen.test")
    assert transaction.results.get("dnsbl") is None and Transaction().results is not transaction.results
    # STARTTLS: the clone keeps what the checks concluded, as it keeps the notes.
    twin = connection.clone()
    assert twin.results.get("dnsbl").fail == ["zen.test"] and connection.results.get("dnsbl") is None
