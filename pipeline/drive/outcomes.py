"""A job's end booked: its outcome read from the provider's answer, its cost compared with
our price, and the end journaled (and its images handed to the downloader)."""

from __future__ import annotations

import time
from typing import Literal

import structlog

from pipeline.core import FINAL_ERROR_CODES, Clock, JobOutcome, RunStats, Status
from pipeline.drive.dispatcher import JobSource
from pipeline.drive.flight import InFlight
from pipeline.drive.settings import DriverSettings
from pipeline.drive.steps import Left, Track
from pipeline.journal import Commits, Entry, Finish, of_edit
from pipeline.outputs import Downloader
from pipeline.provider import Callbacks, PollPlanner, Prediction, Waiter

_log = structlog.get_logger("pipeline.drive.driver")


__all__ = ["Outcomes"]


class Outcomes:
    """A job's outcome read from the provider's answer, and its booking: journaled, settled with
    the dispatcher, and its images handed to the downloader."""

    def __init__(
        self,
        settings: DriverSettings,
        journal: Commits,
        dispatcher: JobSource,
        planner: PollPlanner,
        stats: RunStats,
        flight: InFlight,
        clock: Clock,
        *,
        hints: Callbacks | None = None,
        downloader: Downloader | None = None,
    ) -> None:
        self._settings = settings
        self._journal = journal
        self._dispatcher = dispatcher
        self._planner = planner
        self._stats = stats
        self._flight = flight
        self._clock = clock
        self._hints = hints  # callbacks, or the listing's ends: what may wake a job
        self.downloader = downloader  # keeps the outputs, when assets.download
        self._cost_said = False  # a difference between the provider's cost and ours: said once

    def ended(
        self, answer: Prediction, created: float, track: Track, timed_out: bool
    ) -> JobOutcome:
        if self._hints is not None and track.waiter is not None:
            self._hints.ended(track.waiter, self.seen_by(track.waiter, track))
        outcome = self.outcome(answer, created, timed_out)
        if (took := answer.predict_time_s) is not None:
            self._stats.job_ended(took, self._clock.now() - created - took)
        return outcome

    def left(self, entry: Entry, prediction_id: str) -> Left:
        self._stats.unconfirmed += 1
        _log.warning(
            "end_unconfirmed",
            job_id=entry.job_id,
            row=entry.row_number,
            prediction_id=prediction_id,
            hint="cancelled, and still running after polling.cancel_grace_s: it stays "
            "journaled and the next run polls it; its cost may be billed",
        )
        return Left()

    def outcome(self, answer: Prediction, created: float, timed_out: bool) -> JobOutcome:
        """A job's end as a poll saw it, with the provider's cost where it gave one; a cancel
        asked for counts as accepted only when the job ended `cancelled`."""
        now = time.time()
        asked = self._flight.answer(answer.prediction_id)
        stopped = answer.status == "cancelled"
        if not (stopped and asked is not None):  # a job we stopped says nothing of latency
            self._planner.observe(answer.predict_time_s or (self._clock.now() - created))
        accepted = None if asked is None else stopped
        if answer.status == "success":
            outcome = JobOutcome(
                Status.SUCCEEDED,
                answer.prediction_id,
                answer.output_urls,
                answer.predict_time_s,
                finished_at=now,
                cancel_accepted=accepted,
                provider_cost_usd=answer.cost_usd,
                ended=answer.status,
                served_by=answer.served_by,
            )
        else:
            error_type, message = "cancelled" if stopped else "job_error", answer.message
            if answer.error_code in FINAL_ERROR_CODES:  # the provider's table: fix the input
                error_type = "input_rejected"
            if stopped and timed_out:
                error_type = "timeout"
                message = (
                    f"still processing after {self._settings.timeout_text}; cancelled at the "
                    "provider (its cancel was accepted)"
                )
            outcome = JobOutcome(
                Status.FAILED,
                answer.prediction_id,
                (),
                answer.predict_time_s,
                error_type=error_type,
                error_message=message,
                finished_at=now,
                error_code=answer.error_code,
                cancel_accepted=accepted,
                provider_cost_usd=answer.cost_usd,
                ended=answer.status,
            )
        self._compare_cost(outcome)
        return outcome

    def _compare_cost(self, outcome: JobOutcome) -> None:
        """Count a job whose cost at the provider differs from our price times its images;
        the first is logged, so a price change is seen the first night."""
        if outcome.provider_cost_usd is None:
            return
        ours = outcome.priced(self._settings.price_per_image_usd)
        if abs(outcome.provider_cost_usd - ours) <= 5e-7:
            return
        self._stats.cost_mismatches += 1
        if not self._cost_said:
            self._cost_said = True
            _log.warning(
                "provider_cost_differs",
                prediction_id=outcome.prediction_id,
                provider_cost_usd=outcome.provider_cost_usd,
                priced_usd=ours,
                price_per_image_usd=self._settings.price_per_image_usd,
                hint="results record the provider's cost; check api.price_per_image_usd",
            )

    async def finish(self, entry: Entry, outcome: JobOutcome) -> None:
        self._stats.finished += 1
        _log.debug(  # one per job: at --log-level debug
            "job_ended",
            job_id=entry.job_id,
            row=entry.row_number,
            prediction_id=outcome.prediction_id,
            status=outcome.status.value,
            error_type=outcome.error_type,
            images=len(outcome.output_urls),
        )
        # not waited for: a crash before it commits leaves the job `created`, and the resume
        # polls it again and gets the same end
        self._journal.post(Finish(entry.row_number, outcome, self._settings.price_per_image_usd))
        self._dispatcher.settle(entry, outcome)
        if self.downloader is not None and outcome.status is Status.SUCCEEDED:
            named = of_edit(entry.stem, outcome.prediction_id)
            self.downloader.submit(entry.row_number, named, outcome.output_urls)
            first = entry.inputs.get("img_url")
            if isinstance(first, str):
                self.downloader.submit_input(first)  # for the report's thumbnail

    def seen_by(self, waiter: Waiter, track: Track) -> Literal["callback", "fallback", "poll"]:
        if track.hinted:
            return "callback"
        return "poll" if self.on_schedule(waiter, track.contradicted) else "fallback"

    def on_schedule(self, waiter: Waiter | None, contradicted: bool) -> bool:
        """Whether this job is polled on the learned schedule rather than waiting for its
        callback: no callback was asked for, one was contradicted, or callbacks stopped."""
        return waiter is None or contradicted or self._hints is None or not self._hints.arriving
