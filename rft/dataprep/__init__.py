"""`rft data prep`: chat histories or Bedrock invocation logs in, training JSONL out.

Inputs (files or directories of them; `.jsonl`, `.json`, optionally `.gz`; a `.json` file may hold
one array of records):

- chat records: `{"messages": [...], ...}` (Bedrock RFT / OpenAI style) or `{"prompt": ..., ...}`;
- Amazon Bedrock model invocation-log records (`"schemaType": "ModelInvocationLog"`, as delivered
  to S3, or as the `events[].message` strings of a CloudWatch Logs `filter-log-events` /
  `get-log-events` JSON export): Converse / ConverseStream bodies, and InvokeModel bodies of the
  messages-style (Anthropic, Nova, OpenAI-compatible), Llama/Mistral `prompt` and Titan
  `inputText` families. A `prompt` rendered in a chat format (Llama's `<|start_header_id|>`...) is
  turned back into messages (rft/rendered_chat.py), so training does not template it twice; one
  in a format rft does not read is malformed. `requestMetadata` key-values (set by the calling
  application) are read as tags. Failed invocations (`errorCode`, e.g. ThrottlingException) hold
  no reply and are skipped and counted by error code.

What happens, in order, each step counted in the printed report:

1. Parse. A malformed line (not JSON, no messages, an unsupported body) is reported with its file
   and line number; `--skip-malformed` skips it, otherwise the command stops after listing every
   malformed line (nothing is silently lost either way). When no row is left, the command fails.
2. Prompt and reply. The prompt is the conversation up to its last user message; a trailing
   assistant reply (the logged model output) becomes `reference_answer`, a `logged_response`
   field, or is dropped (`--assistant reference|metadata|drop`).
3. PII redaction (rewards/pii.py: Presidio's validated pattern recognizers, offline) of every message
   and the reply: emails, phone and card numbers, IBANs, IP addresses, US SSN... become `<ENTITY>`;
   `--pii-entities ...,PERSON,LOCATION` adds names, places and street addresses (a spaCy NER
   pipeline; refused at once when none is installed). The report names what was looked for.
4. Near-duplicate removal: MinHash (datasketch) of the prompt's character 5-grams, LSH lookup, and the
   first occurrence kept when the estimated Jaccard similarity reaches `--dedup-threshold`.
5. Tags: `domain`, `intent`, `difficulty` (or `--tag-keys`) from the record's own fields, its
   `metadata` object, the log's `requestMetadata`, then `--tag key=value` defaults; written as
   top-level fields, which the trainer passes to rewards and uses as evaluation slices.
6. Split: a reproducible train / held-out split stratified by `--stratify-by` (default `domain`):
   within each stratum, rows are ordered by a seeded hash of their content and the first
   `round(held_out * n)` are held out, so the split depends on the seed and the data only.

The steps live in their own modules: `reading` (files and lines), `records` (a record's prompt, reply
and fields), `redaction`, `selection` (near-duplicates, the split), `pipeline` (the steps in order,
the report) and `command` (arguments, writing the files).
"""

from rft.dataprep.command import configure_parser, run
from rft.dataprep.pipeline import DEFAULT_TAG_KEYS, PrepOptions, PrepReport, prepare
from rft.dataprep.reading import read_records
from rft.dataprep.records import FailedInvocation, Malformed, Row, parse_record
from rft.dataprep.selection import remove_near_duplicates, split_rows

__all__ = [
    "DEFAULT_TAG_KEYS",
    "FailedInvocation",
    "Malformed",
    "PrepOptions",
    "PrepReport",
    "Row",
    "configure_parser",
    "parse_record",
    "prepare",
    "read_records",
    "remove_near_duplicates",
    "run",
    "split_rows",
]
