"""Issue 21: property-based fuzzing of the sans-I/O core, a short run with a fixed seed.

The properties are in ``qpgevent.testing.fuzz`` (framing, the conversation, addresses,
PROXY headers); ``tools/fuzz_core.py`` runs the same ones over a million inputs. Here
hypothesis makes the inputs (byte soup and SMTP fragments, cut into random pieces),
derandomized so that every run tries the same ones and stays a few seconds long.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from qpgevent.testing import fuzz

RUN = settings(max_examples=300, derandomize=True, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
fragments = st.lists(st.sampled_from(fuzz.CORPUS) | st.binary(max_size=40), max_size=12).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=6)


@RUN
@given(fragments, cuts, st.sampled_from([16, 64, 512]))
def test_command_framer(data, cut, max_line):
    fuzz.check_command_framer(data, cut, max_line)


@RUN
@given(fragments, cuts, st.sampled_from(["reject", "strip", "accept"]), st.booleans())
def test_data_reader(data, cut, nul_bytes, allow_bare_lf):
    fuzz.check_data_reader(data, cut, nul_bytes, allow_bare_lf)


@RUN
@given(fragments, cuts)
def test_conversation(data, cut):
    fuzz.check_conversation(data, cut)


@RUN
@given(st.sampled_from(fuzz.ADDRESS_CORPUS) | st.text(max_size=40).map(lambda t: f"<{t}>") | st.text(max_size=40),
       st.booleans())
def test_address(text, smtputf8):
    fuzz.check_address(text, smtputf8)


@RUN
@given(st.sampled_from(fuzz.PROXY_CORPUS) | st.binary(max_size=120)
       | st.builds(lambda a, b, p, q: f"PROXY TCP6 {a} {b} {p} {q}\r\n".encode("utf-8", "surrogateescape"),
                   st.text(max_size=30), st.text(max_size=30), st.text(max_size=6), st.text(max_size=6)))
def test_proxy(data):
    fuzz.check_proxy(data)
