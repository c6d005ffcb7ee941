"""Study participants: joining (a seat, an optional one-time invite), coming back with a resume code,
and their labels of the study's pairs.

A resume code and an invite are credentials: only their sha256 is stored, as for keys, and a code is
found by its hash (an index lookup reveals nothing of a code that does not match). Resume codes carry
about 78 bits from `secrets`, in letters a person can copy by hand (no 0/O or 1/I/L), so there is no
dictionary to attack them with; the server slows down repeated wrong codes (`fspo.serve.study`).

The rules that must hold under racing requests are the database's own: a UNIQUE seat (a capped study
never takes more participants than seats), a UNIQUE invite (one participant per invite), and a UNIQUE
(participant, pair) label (one label per pair, however many tabs).
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from fspo.data.schema import Preference
from fspo.serve.store.database import Database
from fspo.serve.store.errors import Conflict, InvalidRecord, NotFound
from fspo.serve.store.events import log_event
from fspo.serve.store.keys import new_key
from fspo.serve.store.preferences import preference_row
from fspo.serve.store.records import LABELS, Participant, StudyLabel
from fspo.serve.store.tables import LabelRow, ParticipantRow, UserRow

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: nothing to misread
CODE_LENGTH = 16  # 30**16: about 78 bits
SEAT_RETRIES = 8  # racing joins take the same next seat; all but one retry with the one after


def new_code() -> str:
    """A fresh resume or invite code, ``XXXX-XXXX-XXXX-XXXX``."""
    chars = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
    return "-".join(chars[i : i + 4] for i in range(0, CODE_LENGTH, 4))


def code_hash(code: str) -> str:
    """The stored form of a code as a person may type it: case, spaces and dashes do not matter."""
    canonical = "".join(c for c in code.upper() if c not in " -")
    return hashlib.sha256(canonical.encode()).hexdigest()


class Participants(Database):
    def join_study(
        self, *, invite: str | None = None, max_participants: int | None = None
    ) -> tuple[Participant, str, str]:
        """A new participant (a user of their own marked ``{"study": true}``, a seat, a "study" key):
        (the participant, their API key, their resume code); the key and code are shown this once.

        `invite`: a one-time invite code (Conflict if it was used); `max_participants`: the seats there
        are (Conflict ``study_full`` once taken)."""
        for _ in range(SEAT_RETRIES):
            user_id, resume = f"study-{secrets.token_hex(8)}", new_code()
            try:
                with self._session(write=True) as s:
                    if invite is not None and s.scalar(
                        select(ParticipantRow).where(ParticipantRow.invite_sha256 == code_hash(invite))
                    ):
                        raise Conflict(
                            "invite: this invite was used already; come back with your resume code",
                            field="invite",
                        )
                    seat = (s.scalar(select(func.max(ParticipantRow.seat))) or 0) + 1
                    if max_participants is not None and seat > max_participants:
                        raise Conflict(f"the study is full ({max_participants} participants)", field="code")
                    s.add(UserRow(user_id=user_id, description=None, meta={"study": True}))
                    s.flush()
                    row = ParticipantRow(
                        user_id=user_id,
                        resume_sha256=code_hash(resume),
                        invite_sha256=None if invite is None else code_hash(invite),
                        seat=seat,
                    )
                    s.add(row)
                    s.flush()
                    _, key = new_key(s, user_id, "study", "study")
                    log_event(s, "study.join", user_id, seat=seat, invited=invite is not None)
                    return Participant.model_validate(row), key, resume
            except IntegrityError:
                continue  # another join took this seat (or, off SQLite, this invite): look again
        raise Conflict("too many people are joining at once: try again", field="code")

    def resume_study(self, resume_code: str) -> tuple[Participant, str] | None:
        """The participant of `resume_code` and a new "study" key for them; None for no such code."""
        with self._session(write=True) as s:
            row = s.scalar(
                select(ParticipantRow).where(ParticipantRow.resume_sha256 == code_hash(resume_code))
            )
            if row is None:
                return None
            _, key = new_key(s, row.user_id, "study", "study-resume")
            log_event(s, "study.resume", row.user_id)
            return Participant.model_validate(row), key

    def participant(self, user_id: str) -> Participant | None:
        with self._session() as s:
            row = s.get(ParticipantRow, user_id)
            return None if row is None else Participant.model_validate(row)

    def add_label(
        self, participant: str, pair_id: int, choice: str, preference: Preference | None
    ) -> StudyLabel:
        """`participant`'s one label of pair `pair_id`, with `preference` (stored as theirs, source
        "study") when they preferred an answer; Conflict when the pair has a label already."""
        if choice not in LABELS:
            raise InvalidRecord(f"choice: must be one of {', '.join(LABELS)}, not {choice!r}", field="choice")
        if (preference is None) != (choice == "none"):
            raise InvalidRecord("choice: a preference goes with 'a' or 'b', none with 'none'", field="choice")
        try:
            with self._session(write=True) as s:
                if s.get(ParticipantRow, participant) is None:
                    raise NotFound(f"participant: no participant {participant!r}", field="participant")
                row = LabelRow(participant=participant, pair_id=pair_id, choice=choice)
                s.add(row)
                s.flush()
                if preference is not None:
                    pref = preference_row(preference.model_copy(update={"user_id": participant}), "study")
                    s.add(pref)
                    s.flush()
                    row.preference_id = pref.id
                    log_event(s, "preference.add", participant, ids=[pref.id], source="study")
                log_event(s, "study.label", participant, pair_id=pair_id, choice=choice)
                return StudyLabel.model_validate(row)
        except IntegrityError as e:
            raise Conflict(f"pair_id: pair {pair_id} has your label already", field="pair_id") from e

    def labels(self, participant: str) -> list[StudyLabel]:
        with self._session() as s:
            q = select(LabelRow).where(LabelRow.participant == participant).order_by(LabelRow.id)
            return [StudyLabel.model_validate(r) for r in s.scalars(q)]
