"""bridge.emuhost.selfcheck's reading of a run (no emulated host needed)."""

from __future__ import annotations

from bridge.emuhost.selfcheck import parse

CLEAN = "SELFCHECK-DONE rounds 812 bad 0\n"


def test_clean_workers_and_guest() -> None:
    v = parse("guest 0\nworker0 0\nworker1 0\n", {"worker0": CLEAN, "worker1": CLEAN},
              "PC\nSELFCHECK-GUEST-DONE rounds 24 bad 0\nSELFCHECK-GUEST-END\n", "")
    assert v.clean
    assert v.workers["worker0"]["rounds"] == 812 and v.guest == {
        "done": True, "rounds": 24, "bad": 0, "errors": []}


def test_a_mismatch_a_crash_and_a_bad_guest_round_are_each_caught() -> None:
    zlib = ("Traceback (most recent call last):\n  File \"w.py\", line 7\n"
            "zlib.error: Error -3 while decompressing data: incorrect data check\n")
    v = parse("worker0 1\nworker1 139\n", {"worker0": zlib, "worker1": ""}, None,
              "[41.7] python3[398]: segfault at 19e024f16 ip 00007f06 in libz.so.1.2.13\n")
    assert not v.clean
    assert v.workers["worker0"]["exit"] == 1 and not v.workers["worker0"]["done"]
    assert "incorrect data check" in v.workers["worker0"]["findings"][-1]
    assert v.workers["worker1"]["exit"] == 139
    assert v.dom0_faults and "libz" in v.dom0_faults[0]
    found = parse("worker0 0\n", {"worker0": "SELFCHECK-BAD 3 round trip differs\n"
                                              "SELFCHECK-DONE rounds 9 bad 1\n"}, None, "")
    assert not found.clean and found.workers["worker0"]["bad"] == 1
    guest = parse("worker0 0\n", {"worker0": CLEAN},
                  "SELFCHECK-GUEST-BAD 5\nSELFCHECK-GUEST-DONE rounds 24 bad 1\n", "")
    assert not guest.clean and guest.guest is not None and guest.guest["errors"]
    unfinished = parse("worker0 0\n", {"worker0": CLEAN}, "no end\n", "")
    assert not unfinished.clean
