"""The study's blind trials and their votes. One trial per (participant, question) and one vote per
trial are rules of the database itself (a UNIQUE constraint, a conditional UPDATE), so no race between
two requests can break them."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from fspo.serve.store.database import Database
from fspo.serve.store.errors import Conflict, InvalidRecord, NotFound
from fspo.serve.store.events import log_event
from fspo.serve.store.records import VOTES, Trial, require_text
from fspo.serve.store.tables import TrialRow, utc_now
from fspo.serve.store.users import need_user


def _trial(row: TrialRow) -> Trial:
    return Trial.model_validate(row)


class Trials(Database):
    def create_trial(
        self,
        participant: str,
        question: str,
        left_system: str,
        right_system: str,
        left_answer: str,
        right_answer: str,
    ) -> Trial:
        """A new blind trial; Conflict when the participant already has one for this question.

        An answer may be empty (a model may stop at once): the trial keeps what the system said, as
        the offline evaluation judges it. Every other field must be a non-blank text."""
        fields = {
            "participant": participant,
            "question": question,
            "left_system": left_system,
            "right_system": right_system,
        }
        for name, value in fields.items():
            require_text(name, value)
        answers = {"left_answer": left_answer, "right_answer": right_answer}
        for name, value in answers.items():
            if not isinstance(value, str):
                raise InvalidRecord(f"{name}: must be a string, not {type(value).__name__}", field=name)
        fields.update(answers)
        try:
            with self._session(write=True) as s:
                need_user(s, participant, "participant")
                row = TrialRow(**fields)
                s.add(row)
                s.flush()
                log_event(
                    s,
                    "trial.create",
                    participant,
                    trial_id=row.id,
                    question=question,
                    left_system=left_system,
                    right_system=right_system,
                )
                return _trial(row)
        except IntegrityError as e:
            # The UNIQUE(participant, question) constraint: the only one a valid insert can break.
            raise Conflict(
                f"question: participant {participant!r} already has a trial for it", field="question"
            ) from e

    def trials(self, participant: str | None = None) -> list[Trial]:
        q = select(TrialRow).order_by(TrialRow.id)
        if participant is not None:
            q = q.where(TrialRow.participant == participant)
        with self._session() as s:
            return [_trial(r) for r in s.scalars(q)]

    def vote(self, participant: str, trial_id: int, choice: str) -> Trial:
        """Record the participant's one vote. The UPDATE only matches an unvoted trial of theirs, so two
        racing votes cannot both land; which of NotFound/Conflict is read in the same transaction."""
        if choice not in VOTES:
            raise InvalidRecord(f"choice: must be one of {', '.join(VOTES)}, not {choice!r}", field="choice")
        with self._session(write=True) as s:
            res = s.execute(
                update(TrialRow)
                .where(TrialRow.id == trial_id, TrialRow.participant == participant, TrialRow.vote.is_(None))
                .values(vote=choice, voted_at=utc_now())
                .execution_options(synchronize_session=False)
            )
            row = s.scalar(
                select(TrialRow).where(TrialRow.id == trial_id, TrialRow.participant == participant)
            )
            if row is None:
                raise NotFound(f"trial_id: no trial {trial_id} of yours", field="trial_id")
            if res.rowcount != 1:
                raise Conflict(f"trial_id: trial {trial_id} already has a vote", field="trial_id")
            s.refresh(row)
            log_event(s, "trial.vote", participant, trial_id=trial_id, choice=choice)
            return _trial(row)
