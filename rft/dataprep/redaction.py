"""PII redaction of every message and reply
(rewards/pii.py: Presidio's pattern recognizers, spaCy for names)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rft.config import ConfigError
from rft.dataprep.records import Row

if TYPE_CHECKING:
    from rft.dataprep.pipeline import PrepReport
    from rft.reward_loading import PIIDetector


def detector_for(entities: Sequence[str] | None) -> PIIDetector:
    """Built before any record is read, so that a request it cannot serve stops the command at once."""
    # Imported here: Presidio (and spaCy, for names) load slowly, and --no-redact needs neither.
    from rft.reward_loading import PIIDetector

    try:
        return PIIDetector(entities=entities)
    except ValueError as exc:
        raise ConfigError(f"--pii-entities: {exc}") from None


def redact(rows: list[Row], detector: PIIDetector, report: PrepReport) -> None:
    """Replace the PII in every message and reply with `<ENTITY>`, counting what was found in `report`."""
    report.pii_searched = sorted(detector.entities)
    report.ner_pipeline = detector.ner_pipeline
    for row in rows:
        found = []
        for message in row.messages:
            message["content"], spans = detector.redact(message["content"])
            found.extend(spans)
        if row.reply is not None:
            row.reply, spans = detector.redact(row.reply)
            found.extend(spans)
        if found:
            report.redacted_rows += 1
            report.pii.update(span.entity for span in found)


