"""Find and redact personal data (PII) in text, offline, with Microsoft Presidio's pattern recognizers.

Why Presidio: it is maintained (monthly releases), and its recognizers validate what they match
(Luhn for card numbers, IBAN checksums, `phonenumbers` for phone numbers in many national formats,
context words that raise confidence), which a hand-written regex set would have to re-implement.
Checked against the alternatives here: scrubadub 2.0 missed a spaced card number and a UK phone
number and mangled "name at email" text; hand-written regexes lack the validators.

How it runs offline: Presidio's default set-up loads (and downloads) spaCy's `en_core_web_lg` for
named-entity recognition. This module gives it a blank spaCy English pipeline instead (tokenizer
only, nothing to download), so the pattern recognizers work and person or place *names* are not
detected: name redaction needs a spaCy NER model installed by the user (`spacy_model=`). The email
recognizer's domain check uses `tldextract`, which would fetch the public-suffix list over the
network on first use; here it uses the snapshot bundled with tldextract.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

# Entities detected by default: validated identifiers that are personal in any context. URLs and
# dates are left out on purpose: they are rarely personal and citations (URLs) are content.
DEFAULT_ENTITIES = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_SSN",
    "US_ITIN",
    "US_PASSPORT",
    "UK_NHS",
    "CRYPTO",
)


@dataclass(frozen=True)
class PIISpan:
    entity: str
    start: int
    end: int
    text: str
    score: float


def _build_analyzer(spacy_model: str | None):
    # Imported here: spaCy and Presidio take about a second to import and only PII users need them.
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    class _LocalSpacyEngine(SpacyNlpEngine):
        """A spaCy engine that loads an installed model, or a blank English tokenizer; never downloads."""

        def load(self) -> None:
            self.nlp = {"en": spacy.load(spacy_model) if spacy_model else spacy.blank("en")}

    offline_suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class _OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline_suffixes(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    engine = _LocalSpacyEngine(models=[{"lang_code": "en", "model_name": spacy_model or "blank:en"}])
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    registry.remove_recognizer("EmailRecognizer")
    registry.add_recognizer(_OfflineEmailRecognizer())
    return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])


@lru_cache(maxsize=4)
def _analyzer(spacy_model: str | None):
    return _build_analyzer(spacy_model)


_ANALYZER_LOCK = threading.Lock()


class PIIDetector:
    """Finds PII spans in text. Thread-safe; the Presidio engine is built once per process."""

    def __init__(
        self,
        entities: Sequence[str] | None = None,
        min_score: float = 0.3,
        spacy_model: str | None = None,
    ):
        self.entities = list(entities or DEFAULT_ENTITIES)
        self.min_score = min_score
        with _ANALYZER_LOCK:
            self.analyzer = _analyzer(spacy_model)
        supported = set(self.analyzer.get_supported_entities(language="en"))
        unknown = sorted(set(self.entities) - supported)
        if unknown:
            raise ValueError(f"PII entities {unknown} are not detected here; known: {sorted(supported)}")

    def find(self, text: str) -> list[PIISpan]:
        """PII spans in `text`, sorted, overlaps resolved in favour of the higher score then the longer span."""
        if not text:
            return []
        results = self.analyzer.analyze(text=text, language="en", entities=self.entities, score_threshold=self.min_score)
        ranked = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
        kept: list[PIISpan] = []
        for result in ranked:
            if all(result.end <= span.start or result.start >= span.end for span in kept):
                kept.append(PIISpan(result.entity_type, result.start, result.end, text[result.start : result.end], result.score))
        return sorted(kept, key=lambda span: span.start)

    def redact(self, text: str) -> tuple[str, list[PIISpan]]:
        """`text` with each PII span replaced by `<ENTITY>`, and the spans replaced."""
        spans = self.find(text)
        pieces = []
        cursor = 0
        for span in spans:
            pieces.append(text[cursor : span.start])
            pieces.append(f"<{span.entity}>")
            cursor = span.end
        pieces.append(text[cursor:])
        return "".join(pieces), spans


def canonical(span: PIISpan) -> str:
    """A form of a PII value that survives reformatting: a phone number's national digits (so
    "+1 (415) 555-0132" and "415.555.0132" agree), other numbers' digits, lower case otherwise."""
    if span.entity == "PHONE_NUMBER":
        import phonenumbers  # Presidio's own phone dependency

        try:
            return str(phonenumbers.parse(span.text, "US").national_number)
        except phonenumbers.NumberParseException:
            pass
    if span.entity in ("PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "US_ITIN", "UK_NHS"):
        return "".join(ch for ch in span.text if ch.isdigit())
    return "".join(span.text.lower().split())
