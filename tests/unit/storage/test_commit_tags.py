"""The background tagger: in order, never raising into the write path, bounded."""

from __future__ import annotations

import threading

import pytest

from storage.commit_tags import CommitTagger


def test_tags_every_object_in_submission_order() -> None:
    tagged: list[str] = []
    tagger = CommitTagger(tagged.append)
    for n in range(50):
        tagger.submit(f"obj/{n}")
    tagger.join()
    assert tagged == [f"obj/{n}" for n in range(50)]
    tagger.close()


def test_a_failed_tag_is_logged_and_the_next_still_tagged(caplog: pytest.LogCaptureFixture) -> None:
    tagged: list[str] = []

    def tag(key: str) -> None:
        if key == "obj/bad":
            raise ConnectionError("object store away")
        tagged.append(key)

    tagger = CommitTagger(tag)
    for key in ("obj/1", "obj/bad", "obj/2"):
        tagger.submit(key)
    tagger.join()
    tagger.close()
    assert tagged == ["obj/1", "obj/2"]
    failed = [r for r in caplog.records if "not tagged" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].object_key == "obj/bad"  # type: ignore[attr-defined]


def test_a_full_queue_tags_inline_instead_of_growing() -> None:
    release = threading.Event()
    tagged: list[str] = []
    callers: list[str] = []

    def tag(key: str) -> None:
        if key == "obj/slow":
            release.wait(30)  # the thread is stuck on this one
        tagged.append(key)
        callers.append(threading.current_thread().name)

    tagger = CommitTagger(tag, limit=2)
    tagger.submit("obj/slow")
    for n in range(2):  # fills the queue while the thread is busy
        tagger.submit(f"obj/q{n}")
    # The queue may not have handed "obj/slow" to the thread yet; submit until one
    # overflows and runs here, in the caller's thread.
    n = 0
    while "MainThread" not in callers:
        tagger.submit(f"obj/inline{n}")
        n += 1
        assert n < 10, "the queue grew past its limit"
    release.set()
    tagger.join()
    tagger.close()
    assert "obj/slow" in tagged
    assert len(tagged) == 3 + n


def test_close_tags_what_is_queued_then_tags_inline() -> None:
    tagged: list[str] = []
    tagger = CommitTagger(tagged.append)
    for n in range(20):
        tagger.submit(f"obj/{n}")
    tagger.close()
    assert tagged == [f"obj/{n}" for n in range(20)]
    tagger.submit("obj/late")  # after close: inline, never lost
    assert tagged[-1] == "obj/late"
