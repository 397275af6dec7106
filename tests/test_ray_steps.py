"""The driver's step log: a step counts once every rank ran it under every plan; a restart resumes after the last such step."""

from __future__ import annotations

import asyncio

from rnq_ep.runtime.ray_steps import StepChannel, StepLog
from rnq_ep.runtime.worker import StepStats


def stats(step: int, plan: int = 0) -> StepStats:
    return StepStats(step=step, seconds=0.0, layers=[], plan=plan)


def test_a_step_is_finished_once_every_rank_and_plan_reported_it():
    log = StepLog(world=2, plans=2)
    assert log.add([(0, stats(0, 0)), (1, stats(0, 0)), (0, stats(0, 1))]) == []
    finished = log.add([(1, stats(0, 1))])
    assert [[[s.step for s in by_rank] for by_rank in step] for step in finished] == [[[0, 0], [0, 0]]]
    assert [[s.plan for s in by_rank] for by_rank in finished[0]] == [[0, 0], [1, 1]]


def test_a_restart_keeps_the_finished_steps_and_drops_the_partial_ones():
    log = StepLog(world=2)
    log.add([(rank, stats(step)) for step in (0, 1) for rank in (0, 1)] + [(0, stats(2))])
    assert log.restart() == 2
    log.add([(1, stats(2))])  # rank 0's step 2 went with the failed attempt
    assert log.done[2:] == []
    log.add([(0, stats(2)), (0, stats(3)), (1, stats(3))])
    assert [[s.step for s in rank] for rank in log.by_rank()] == [[0, 1, 2, 3]] * 2


def test_steps_reported_out_of_order_finish_in_step_order():
    log = StepLog(world=1)
    assert log.add([(0, stats(1))]) == []
    assert [step[0][0].step for step in log.add([(0, stats(0))])] == [0, 1]
    assert [s.step for s in log.by_rank()[0]] == [0, 1]


def test_the_channel_hands_over_queued_reports_without_waiting():
    channel = StepChannel.__ray_metadata__.modified_class()  # the actor's own class, run in this process

    async def exchange() -> list:
        await channel.report(0, stats(0))
        queued = await channel.reports(0.0)  # the driver's final sweep asks with no wait
        await channel.report(1, stats(0))
        await channel.close()
        return [queued, await channel.reports(0.0), await channel.reports(0.0)]

    queued, after_close, empty = asyncio.run(exchange())
    assert [rank for rank, _ in queued] == [0] and [rank for rank, _ in after_close] == [1] and empty == []
