"""The restart journal's one invariant: a snapshot counts once a later call has answered."""

from fedmd_ray.backends.restarts import RestartJournal


def test_a_snapshot_counts_only_once_a_later_call_answers():
    journal = RestartJournal(1)
    journal.record(0, "transfer")
    journal.snapshot(0, "state-after-transfer")
    journal.record(0, "digest-1")
    # Not yet confirmed: a restart starts from nothing and replays everything before the call.
    assert journal.replay(0, "digest-1") == (None, ["transfer"])

    journal.snapshot(0, "state-after-transfer")
    journal.record(0, "digest-1")
    journal.confirm(0)  # "digest-1" answered, so the snapshot queued before it was taken
    assert journal.saved[0] == "state-after-transfer"
    assert journal.calls[0] == ["digest-1"]
    journal.record(0, "revisit")
    assert journal.replay(0, "revisit") == ("state-after-transfer", ["digest-1"])


def test_a_restart_drops_the_pending_snapshot():
    journal = RestartJournal(2)
    journal.record(1, "revisit")
    journal.snapshot(1, "maybe-never-taken")
    saved, calls = journal.replay(1, "evaluate")  # a call not in the journal: replay it all
    assert (saved, calls) == (None, ["revisit"])
    journal.confirm(1)  # nothing pending any more: nothing changes
    assert journal.saved[1] is None and journal.calls[1] == ["revisit"]
