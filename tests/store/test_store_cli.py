"""``qpgevent store list | show | release`` on the embedded store and on a real Redis.

The entries are made through the store API under the keys the policy plugins use
(greylisting's triplet, karma's penalty box and counters, limit's windows and leases);
the real command, in a child process, reads the config's ``[store]`` and must see and
release them, with the same answers on both backends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qpgevent.testing.redis_server import free_tcp_port
from store_helpers import make_store

IP = "192.0.2.9"
TRIPLET = f"greylist:<{IP}> <a@client.test> <bob@example.test>"


def qpgevent_store(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", "store", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def store_ini(tmp_path: Path, backend: str, request) -> Path:
    if backend == "redis":
        section = f"[store]\n  backend = redis\n  url = {request.getfixturevalue('redis_server').url}\n"
    else:
        section = f"[store]\n  path = {tmp_path / 'store.sqlite'}\n"
    path = tmp_path / "qpsmtpd.ini"
    path.write_text("[server]\n  me = mx.example.test\n" + section + "[plugins]\n", encoding="utf-8")
    return path


@pytest.fixture
def filled(backend, request, tmp_path):
    """(ini, store): a store holding what greylisting, karma and limit keep about one client."""
    store = make_store(backend, request, tmp_path)
    store.set(TRIPLET, "1700000000.0", 3600)
    store.set(f"karma:penalty:{IP}", "1700000000.0", 86400)
    store.incr(f"karma:naughty:{IP}", 1, 86400)
    store.incr(f"karma:naughty:{IP}", 1, 86400)
    for _ in range(3):
        store.hit(f"limit:conn:{IP}", 10, 60)
    lease = store.acquire(f"limit:concurrency:{IP}", 5)
    assert lease is not None
    yield store_ini(tmp_path, backend, request), store
    store.close()


def test_list_shows_every_kind_of_entry_as_json(filled):
    ini, _ = filled
    result = qpgevent_store("list", "-c", str(ini), "--json")
    assert result.returncode == 0, result.stderr
    entries = {entry["key"]: entry for entry in json.loads(result.stdout)}
    assert set(entries) == {TRIPLET, f"karma:penalty:{IP}", f"karma:naughty:{IP}", f"limit:conn:{IP}",
                            f"limit:concurrency:{IP}"}
    assert (entries[f"karma:naughty:{IP}"]["kind"], entries[f"karma:naughty:{IP}"]["value"]) == ("value", "2")
    assert (entries[f"limit:conn:{IP}"]["kind"], entries[f"limit:conn:{IP}"]["count"]) == ("events", 3)
    assert (entries[f"limit:concurrency:{IP}"]["kind"], entries[f"limit:concurrency:{IP}"]["count"]) == ("leases", 1)
    assert entries[TRIPLET]["value"] == "1700000000.0" and entries[TRIPLET]["expires"] is not None


def test_list_by_prefix_and_as_text(filled):
    ini, _ = filled
    result = qpgevent_store("list", "-c", str(ini), "--prefix", "karma:")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [[f"karma:naughty:{IP}", "value", "2"],
                                                       [f"karma:penalty:{IP}", "value", "1700000000.0"]]
    assert all("lapses in" in line for line in lines)


def test_show_one_key_and_a_missing_one(filled):
    ini, _ = filled
    result = qpgevent_store("show", "-c", str(ini), TRIPLET, "--json")
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert (entry["key"], entry["kind"], entry["value"]) == (TRIPLET, "value", "1700000000.0")
    missing = qpgevent_store("show", "-c", str(ini), "karma:penalty:198.51.100.1")
    assert (missing.returncode, missing.stderr) == (1, "qpgevent: no such key: karma:penalty:198.51.100.1\n")


def test_release_takes_a_client_out_of_the_penalty_box_and_resets_a_limit(filled):
    ini, store = filled
    result = qpgevent_store("release", "-c", str(ini), f"karma:penalty:{IP}")
    assert (result.returncode, result.stdout) == (0, f"released karma:penalty:{IP}\n"), result.stderr
    assert store.get(f"karma:penalty:{IP}") is None
    assert store.get(f"karma:naughty:{IP}") == "2"  # only the key named
    assert qpgevent_store("release", "-c", str(ini), f"limit:conn:{IP}", "--json").stdout.strip() == \
        json.dumps({"key": f"limit:conn:{IP}", "released": 1})
    assert store.count(f"limit:conn:{IP}", 60) == 0
    assert qpgevent_store("release", "-c", str(ini), f"limit:concurrency:{IP}").returncode == 0
    assert store.holders(f"limit:concurrency:{IP}") == 0
    again = qpgevent_store("release", "-c", str(ini), f"karma:penalty:{IP}")
    assert again.returncode == 1 and "no such key" in again.stderr


def test_an_unreachable_redis_is_exit_1_in_one_line(tmp_path):
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text(f"[server]\n  me = mx.example.test\n[store]\n  backend = redis\n"
                   f"  url = redis://127.0.0.1:{free_tcp_port()}/0\n[plugins]\n", encoding="utf-8")
    result = qpgevent_store("list", "-c", str(ini))
    assert result.returncode == 1
    assert result.stderr.startswith("qpgevent: the store cannot be reached: ") and result.stderr.count("\n") == 1


def test_a_missing_embedded_store_is_reported_not_created(tmp_path):
    ini = store_ini(tmp_path, "embedded", None)
    result = qpgevent_store("list", "-c", str(ini))
    assert result.returncode == 1
    assert result.stderr == f"qpgevent: no store at {tmp_path / 'store.sqlite'} (the server has stored nothing " \
                            "yet, or this is not its config)\n"
    assert not (tmp_path / "store.sqlite").exists()
