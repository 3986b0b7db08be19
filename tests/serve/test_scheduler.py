"""The continuous-batching scheduler on a fake batch that follows the per-row KV contract:
admission at step boundaries, prompt chunks beside decode tokens in one step, rows freed at once,
cancels, a failing step, a full queue, per-row sampling."""

from __future__ import annotations

import pytest

from pipo.ops.sampling import SamplingParams
from pipo.serve.scheduler import NotAccepting, QueueFull, Request, Scheduler
from tests.serve.fake_batch import POISON, FakeBatch, alone

EOS = 0


class Log(list):
    """A request's events, in order."""

    def __call__(self, kind, value):
        self.append((kind, value))

    def tokens(self):
        return [v for k, v in self if k == "token"]

    def end(self):
        return self[-1] if self and self[-1][0] in ("done", "error") else None


def make(rows=4, max_queue=8, chunk=4, max_len=64):
    batch = FakeBatch(rows, max_len)
    return batch, Scheduler(batch, max_batch=rows, max_queue=max_queue, prefill_chunk=chunk,
                            eos_ids=(EOS,))


def request(prompt, max_tokens=5, sampling=None):
    log = Log()
    return Request(list(prompt), max_tokens, sampling or SamplingParams(), on_event=log), log


def drain(scheduler, limit=200):
    for _ in range(limit):
        if not scheduler.step_once():
            return
    raise AssertionError("the scheduler did not go idle")


def test_requests_joining_mid_run_get_the_tokens_they_get_alone():
    batch, sched = make(rows=3, chunk=3)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22, 23, 24], [9, 9], [1, 2, 3, 4, 5, 6, 7, 8]]
    logs = []
    for i, prompt in enumerate(prompts):
        req, log = request(prompt, max_tokens=4 + i)
        sched.submit(req)
        logs.append(log)
        sched.step_once()  # each request arrives while the others run
    drain(sched)
    for prompt, log, i in zip(prompts, logs, range(len(prompts))):
        assert log.tokens() == alone(prompt, 4 + i, EOS)
        assert log.end() == ("done", "length")
    assert max(len(s) for s in batch.steps) == 3  # never more rows than slots
    assert batch.history == {}  # every row freed


def test_a_prompt_chunk_shares_a_step_with_decode_tokens():
    batch, sched = make(rows=2, chunk=4)
    first, _ = request([1, 2], max_tokens=10)
    sched.submit(first)
    sched.step_once()  # first's prompt
    second, _ = request(list(range(1, 11)), max_tokens=2)
    sched.submit(second)
    sched.step_once()
    assert batch.steps[-1] == {first.row: [first.generated[0]], second.row: [1, 2, 3, 4]}
    sched.step_once()
    assert batch.steps[-1][second.row] == [5, 6, 7, 8]
    sched.step_once()
    assert batch.steps[-1][second.row] == [9, 10]  # the last chunk, then its first token
    assert len(second.generated) == 1


def test_a_finished_row_is_freed_at_once_and_its_slot_reused_next_step():
    batch, sched = make(rows=1)
    short, short_log = request([4, 4], max_tokens=1)
    waiting, _ = request([7], max_tokens=3)
    sched.submit(short)
    sched.submit(waiting)
    sched.step_once()
    assert short_log.end() == ("done", "length") and batch.freed == [short.row]
    sched.step_once()
    assert batch.steps[-1] == {waiting.row: [7]}


def test_end_of_text_finishes_with_stop_and_is_not_emitted():
    _, sched = make()
    sched.eos = {alone([3, 4], 3)[2]}  # the third token ends the text
    req, log = request([3, 4], max_tokens=10)
    sched.submit(req)
    drain(sched)
    assert log.tokens() == alone([3, 4], 2)
    assert log.end() == ("done", "stop")


def test_a_cancelled_row_takes_part_in_at_most_one_more_step():
    batch, sched = make()
    keep, keep_log = request([2, 3], max_tokens=20)
    gone, gone_log = request([5], max_tokens=20)
    sched.submit(keep)
    sched.submit(gone)
    sched.step_once()
    sched.step_once()
    sched.cancel(gone)
    row = gone.row
    sched.step_once()
    assert row not in batch.steps[-1] and row in batch.freed
    assert gone_log.end() == ("done", "cancelled")
    drain(sched)
    assert keep_log.tokens() == alone([2, 3], 20, EOS)


def test_a_cancelled_request_leaves_the_queue_without_a_step():
    batch, sched = make(rows=1)
    sched.submit(request([1], max_tokens=3)[0])
    queued, log = request([2], max_tokens=3)
    sched.submit(queued)
    sched.cancel(queued)
    drain(sched)
    assert log == [("done", "cancelled")]
    assert all(len(s) == 1 for s in batch.steps)


def test_an_exception_in_a_step_fails_only_that_steps_rows():
    batch, sched = make(rows=2)
    bad, bad_log = request([1, POISON], max_tokens=3)
    also, also_log = request([2], max_tokens=3)
    later, later_log = request([3, 4], max_tokens=3)
    sched.submit(bad)
    sched.submit(also)
    sched.step_once()
    sched.submit(later)
    drain(sched)
    assert bad_log.end()[0] == "error" and "poisoned step" in bad_log.end()[1]
    assert also_log.end()[0] == "error"
    assert later_log.tokens() == alone([3, 4], 3) and later_log.end() == ("done", "length")
    assert sched.stats.failed == 2 and batch.history == {}


def test_a_full_queue_refuses_and_a_stopped_scheduler_refuses():
    _, sched = make(rows=1, max_queue=2)
    sched.submit(request([1])[0])
    sched.submit(request([1])[0])
    with pytest.raises(QueueFull):
        sched.submit(request([1])[0])
    sched.stop()
    with pytest.raises(NotAccepting):
        sched.submit(request([1])[0])


def test_each_row_samples_with_its_own_seed_and_temperature():
    def tokens(seed, temperature):
        _, sched = make()
        sampling = SamplingParams(temperature, 0, 1.0, seed)
        req, log = request([1, 2, 3], max_tokens=8, sampling=sampling)
        greedy, greedy_log = request([1, 2, 3], max_tokens=8)
        sched.submit(req)
        sched.submit(greedy)
        drain(sched)
        assert greedy_log.tokens() == alone([1, 2, 3], 8, EOS)
        return log.tokens()

    # one-hot logits at temperature 50 are nearly uniform: seeds decide, the same seed repeats
    assert tokens(7, 50.0) == tokens(7, 50.0)
    assert tokens(7, 50.0) != tokens(8, 50.0)


def test_the_thread_serves_until_stopped_and_can_finish_in_flight_rows():
    _, sched = make()
    logs = []
    for prompt in ([1, 2], [3]):
        req, log = request(prompt, max_tokens=6)
        sched.submit(req)
        logs.append(log)
    sched.start()
    sched.stop(cancel=False, timeout=30)
    assert [log.tokens() for log in logs] == [alone([1, 2], 6, EOS), alone([3], 6, EOS)]
    assert all(log.end() == ("done", "length") for log in logs)
