"""Fixtures of the outbound queue tests: the lab "internet" and a qpgevent MTA inside it.

The internet (module-wide, ~2 s to build): hosts ``client`` (198.18.0.2), ``mta``
(198.18.0.10, where qpgevent runs), ``dns`` (NSD, 198.18.0.53), ``mx1``..``mx4``
(198.18.0.21-24). Postfix listens on ``mx1`` and ``mx2`` (IPv4 and IPv6); ``mx3`` has
nothing on port 25 (connections refused); ``mx4`` is for Postfix instances a test starts
itself (a server that comes back, a slow one).
"""

from __future__ import annotations

import os
import re
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from outbound_lab import LabDns, LabPostfix, NetLab, sweep
from qpgevent.testing import ServerProcess, plugin_section, write_ini

HOSTS = {name: (f"198.18.0.{n}", f"2001:db8::{n}") for name, n in
         (("client", 2), ("mta", 10), ("dns", 53), ("mx1", 21), ("mx2", 22), ("mx3", 23), ("mx4", 24))}

ZONES = {
    "lab.test": {f"mx{i}": [("A", f"198.18.0.2{i}")] for i in range(1, 5)}
    | {"mx2v6": [("AAAA", "2001:db8::22")], "ns": [("A", "198.18.0.53")]},
    "pref.test": {"@": [("MX", "10 mx1.lab.test."), ("MX", "20 mx2.lab.test.")]},
    "fallback.test": {"@": [("MX", "10 mx3.lab.test."), ("MX", "20 mx2.lab.test.")]},
    "six.test": {"@": [("MX", "10 mx2v6.lab.test.")]},
    "implicit.test": {"@": [("A", "198.18.0.22")]},
    "sender.test": {"@": [("MX", "10 mx1.lab.test.")]},
    "nullmx.test": {"@": [("MX", "0 .")]},
    "late.test": {"@": [("MX", "10 mx4.lab.test.")]},
    "slow.test": {"@": [("MX", "10 mx4.lab.test.")]},
}


class Internet:
    def __init__(self, lab: NetLab, dns: LabDns, mx1: LabPostfix, mx2: LabPostfix) -> None:
        self.lab, self.dns, self.mx1, self.mx2 = lab, dns, mx1, mx2


@pytest.fixture(scope="module")
def internet():
    sweep()
    lab = NetLab(HOSTS)
    started = []
    try:
        dns = LabDns(lab, "dns", "198.18.0.53", ZONES)
        started.append(dns)
        mx1 = LabPostfix(lab, "mx1", "198.18.0.21", ["a@pref.test", "b@pref.test", "sender@sender.test"])
        started.append(mx1)
        mx1.start()
        mx2 = LabPostfix(lab, "mx2", "198.18.0.22", interfaces="198.18.0.22, 2001:db8::22", mailboxes=
                         ["a@pref.test", "b@pref.test", "c@fallback.test", "d@six.test", "e@implicit.test"],
                         main={"inet_protocols": "all", "mynetworks": "198.18.0.0/24, [2001:db8::]/64"})
        started.append(mx2)
        mx2.start()
        yield Internet(lab, dns, mx1, mx2)
    finally:
        for thing in reversed(started):
            if isinstance(thing, LabPostfix):
                thing.cleanup()
            else:
                thing.stop()
        lab.close()


@pytest.fixture
def start_mta(internet, tmp_path):
    """``start_mta(**outbound_options)``: qpgevent in host ``mta``, port 25, queue/outbound."""
    servers = []

    def start(**options):
        wrapper = tmp_path / "lab-python"
        # The server's interpreter, run inside the lab host (ip netns exec execs it: same pid).
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {internet.lab.ns('mta')} {sys.executable} \"$@\"\n")
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        options = {"queue_dir": str(tmp_path / "queue"), "minimal_backoff": 1, "maximal_backoff": 2,
                   "scan_interval": 0.5, "connect_timeout": 5, "command_timeout": 30, **options}
        plugins = "[[relay]]\n  clients = 198.18.0.0/24\n[[rcpt_ok]]\n" + plugin_section("queue/outbound", **options)
        ini = write_ini(tmp_path, plugins=plugins, me="mta.lab.test", listen="198.18.0.10:25", workers=1,
                        dns_nameservers="198.18.0.53", dns_port=53)
        server = ServerProcess(ini, python=str(wrapper))
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.terminate()


def runner_pids(server: ServerProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"queue runner started \(pid (\d+)\)", server.log())]


def queued(queue_dir: Path) -> list[str]:
    env = queue_dir / "env"
    return sorted(os.listdir(env)) if env.is_dir() else []


def message(subject: str, sender: str = "sender@sender.test", to: str = "a@pref.test") -> bytes:
    return textwrap.dedent(f"""\
        From: <{sender}>
        To: <{to}>
        Subject: {subject}
        Message-ID: <{subject.replace(' ', '-')}@sender.test>

        body of {subject}
        """).replace("\n", "\r\n").encode()
