"""queue/maildir's setup removes tmp/ files older than 36 hours, and a file that goes meanwhile
(renamed into new/ by a worker that serves while a reload sets the plugin up) is skipped, not an
error: a reload under load failed on it (tests/e2e/test_master.py, HUP under steady load)."""

from __future__ import annotations

import os
import time

from qpgevent.backends import maildir


def test_stale_files_go_fresh_ones_stay(tmp_path):
    stale, fresh = tmp_path / "stale", tmp_path / "fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - maildir.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    maildir.remove_stale_tmp(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["fresh"]


def test_a_file_renamed_away_during_the_scan_is_skipped(tmp_path, monkeypatch):
    old = time.time() - maildir.STALE_TMP_SECONDS - 60
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    real_scandir = os.scandir

    def scandir_then_rename(folder):
        # The race, made certain: the folder is read, then a worker renames "b" away before
        # the scan gets to it (its directory entry is still in the list read).
        entries = list(real_scandir(folder))
        os.rename(tmp_path / "b", tmp_path.parent / "b-delivered")
        return iter(entries)

    monkeypatch.setattr(maildir.os, "scandir", scandir_then_rename)
    maildir.remove_stale_tmp(str(tmp_path))
    assert os.listdir(tmp_path) == []
    assert (tmp_path.parent / "b-delivered").exists()
