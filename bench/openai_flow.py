"""The OpenAI fine-tuning flow on the embedded model, driven by the official ``openai`` SDK.

Starts ``prefixd up`` on the embedded model (SmolLM2-135M-Instruct; local Ray, SQLite and a
blob directory in a temporary ``PREFIXD_HOME``), creates one tenant through the admin API,
then, with ``openai.OpenAI(base_url=…/v1)`` over HTTP only: ``files.create`` (E2E meaning
representations → restaurant descriptions as chat turns, a training and a validation file,
and a bad file), ``fine_tuning.jobs.create``, polling ``jobs.retrieve`` with
``jobs.list_events``, ``models.list``, then ``chat.completions.create`` (plain and
streamed) and ``completions.create`` with the fine-tuned model on held-out meaning
representations the job never saw, and the errors as the SDK raises them.

The base model's answers to the same prompts are the baseline. The service always applies a
prefix (a tenant without an active version gets a 409, shown below), so they are decoded in
this process, before the service starts, by the decoder the service uses
(``common/generation.py``) on the tokens the chat route decodes: the chat template's text
(``render_chat``) as it is. BLEU (sacrebleu, against all of an MR's references) compares them with the
fine-tuned answers on the held-out MRs.

    nice -n 10 .venv/bin/python -m bench.openai_flow [--train 40] [--held-out 6] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import sacrebleu
from openai.types.chat import ChatCompletionMessageParam

from bench.local_service import local_service
from bench.report import write_section
from common.chat_format import render_chat
from common.config import Settings
from common.data import Example, encode_prompt
from common.datasets.e2e import MeaningRepresentation, low_data_split, read_e2e
from common.generation import DecodingConfig, GenerationRow, generate
from common.model_loading import EMBEDDED, EMBEDDED_MODEL_ID, ensure_embedded_model_dir, load_model

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "dev.txt"
TITLE = "The OpenAI flow on the embedded model (bench/openai_flow.py)"
SYSTEM = "Describe the restaurant in one sentence."
FINAL = ("succeeded", "failed", "cancelled")
# A chat line without an assistant message: nothing to train on, refused with its line.
BAD_FILE = (
    json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    )
    + "\n"
    + json.dumps({"messages": [{"role": "user", "content": "name : Aromi"}]})
    + "\n"
).encode()


@dataclass
class Transcript:
    """What the run did, in order: ``(call, result, seconds)`` rows and the outputs."""

    started: float = field(default_factory=time.perf_counter)
    steps: list[tuple[str, str, float]] = field(default_factory=list)

    def step(self, call: str, result: str, seconds: float) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {call} → {result}", flush=True)
        self.steps.append((call, result, seconds))


def timed(transcript: Transcript, call: str, action: Any, describe: Any) -> Any:
    started = time.perf_counter()
    value = action()
    transcript.step(call, describe(value), time.perf_counter() - started)
    return value


def raised(transcript: Transcript, call: str, action: Any) -> openai.APIStatusError:
    """Run ``action``, which must fail with the SDK's status error; record how it failed."""
    started = time.perf_counter()
    try:
        action()
    except openai.APIStatusError as error:
        body = error.body if isinstance(error.body, dict) else {}
        result = (
            f"`{type(error).__name__}` {error.status_code}, code `{body.get('code')}`, "
            f"param `{body.get('param')}`: {body.get('message')}"
        )
        transcript.step(call, result, time.perf_counter() - started)
        return error
    raise AssertionError(f"{call} did not raise")


def chat_line(example: Example) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": example.input},
            {"role": "assistant", "content": example.output},
        ]
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def question(mr: MeaningRepresentation) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": mr.mr}]


def sdk_question(mr: MeaningRepresentation) -> list[ChatCompletionMessageParam]:
    return cast("list[ChatCompletionMessageParam]", question(mr))


@dataclass
class BaseAnswers:
    """The embedded model without a prefix, greedy, on the held-out questions."""

    prompts: list[str]  # the chat template's text, what the chat route renders
    served_prompt: str  # the first prompt's tokens as the service feeds them, decoded
    template: list[str]  # the answers on those tokens (the model's own chat format)
    seconds: dict[str, float]


def base_answers(home: Path, held_out: list[MeaningRepresentation], max_tokens: int) -> BaseAnswers:
    """Converting the GGUF into ``home`` here also spares the service that step."""
    settings = Settings(home=home, model=EMBEDDED)
    started = time.perf_counter()
    ensure_embedded_model_dir(settings)
    converted = time.perf_counter()
    loaded = load_model(EMBEDDED, settings=settings)
    tokenizer = loaded.tokenizer
    prompts = [render_chat(tokenizer, question(m)) for m in held_out]
    decoding = DecodingConfig(max_new_tokens=max_tokens)
    template = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, chat=True)  # what the chat route decodes
        (output,) = generate(
            loaded.model,
            [GenerationRow(ids, None)],
            decoding,
            eos_token_id=int(tokenizer.eos_token_id),
            pad_token_id=int(tokenizer.pad_token_id or 0),
        )
        template.append(str(tokenizer.decode(output, skip_special_tokens=True)).strip())
    done = time.perf_counter()
    return BaseAnswers(
        prompts=prompts,
        served_prompt=str(tokenizer.decode(encode_prompt(tokenizer, prompts[0], chat=True))),
        template=template,
        seconds={"convert": converted - started, "decode": done - converted},
    )


def bleu(outputs: list[str], held_out: list[MeaningRepresentation]) -> float:
    width = max(len(m.references) for m in held_out)
    # sacrebleu wants reference streams of equal length: pad with an MR's first reference.
    streams = [
        [(m.references + (m.references[0],) * width)[i] for m in held_out] for i in range(width)
    ]
    return float(sacrebleu.corpus_bleu(outputs, streams).score)


def poll(
    sdk: openai.OpenAI, transcript: Transcript, job_id: str, timeout: float
) -> tuple[Any, list[tuple[str, float]], list[Any]]:
    """Retrieve the job every 2 s until it is final; each status change with the time it
    was first seen, and the events as they arrive (``list_events``, newest first)."""
    started = time.perf_counter()
    statuses: list[tuple[str, float]] = []
    seen: dict[str, Any] = {}
    while True:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if not statuses or statuses[-1][0] != job.status:
            statuses.append((job.status, time.perf_counter() - started))
            print(f"  job {job.status} at {statuses[-1][1]:.1f} s", flush=True)
        for event in sdk.fine_tuning.jobs.list_events(job_id, limit=5).data:
            if event.id not in seen:
                seen[event.id] = event
                print(f"  event: {event.message}", flush=True)
        if job.status in FINAL:
            break
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"the fine-tuning job is still {job.status} after {timeout:.0f} s")
        time.sleep(2)
    seconds = time.perf_counter() - started
    transcript.step(
        f"`fine_tuning.jobs.retrieve` every 2 s until final (`{job_id}`)",
        " → ".join(f"`{s}` ({t:.0f} s)" for s, t in statuses),
        seconds,
    )
    # Every event, through the SDK's paginator (``after`` = the last id of a page).
    events = list(sdk.fine_tuning.jobs.list_events(job_id, limit=10))
    transcript.step(
        "`fine_tuning.jobs.list_events(limit=10)`, every page",
        f"{len(events)} events (the polling saw {len(seen)} of them as they came)",
        0.0,
    )
    return job, statuses, events


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run(args: argparse.Namespace) -> str:
    split = low_data_split(read_e2e(E2E), n_train=args.train, n_test=args.held_out, seed=args.seed)
    held_out = split.test
    transcript = Transcript()
    with tempfile.TemporaryDirectory(prefix="prefixd-openai-flow-") as tmp:
        home = Path(tmp)
        base = base_answers(home, held_out, args.max_tokens)
        print(f"base model answers in {base.seconds['decode']:.1f} s", flush=True)

        up_started = time.perf_counter()
        with local_service(home, EMBEDDED, env={"PREFIXD_TRAINER_SLOTS": "1"}) as (
            url,
            token,
        ):
            transcript.step(
                "`prefixd up` (embedded model) until ready", url, time.perf_counter() - up_started
            )
            created = httpx.post(
                f"{url}/v1/tenants",
                json={"name": "openai-flow"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            created.raise_for_status()
            sdk = openai.OpenAI(
                base_url=f"{url}/v1", api_key=created.json()["api_key"], max_retries=0, timeout=600
            )
            body = drive(sdk, transcript, split.train, split.dev, held_out, base.prompts, args)
            untrained = httpx.post(
                f"{url}/v1/tenants",
                json={"name": "openai-flow-untrained"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
            )
            untrained.raise_for_status()
            fresh = openai.OpenAI(
                base_url=f"{url}/v1", api_key=untrained.json()["api_key"], max_retries=0
            )
            raised(
                transcript,
                f"another tenant, no version yet: `chat.completions.create(model={EMBEDDED_MODEL_ID!r}, …)`",
                lambda: fresh.chat.completions.create(
                    model=EMBEDDED_MODEL_ID, messages=sdk_question(held_out[0]), max_tokens=8
                ),
            )
    return report(args, transcript, body, base, held_out, len(split.dev))


@dataclass
class Outputs:
    job: Any
    statuses: list[tuple[str, float]]
    events: list[Any]
    models_before: list[Any]
    models_after: list[Any]
    chat: list[str]
    chat_seconds: list[float]
    completions: list[str]
    stream: dict[str, Any]
    files: dict[str, Any]


def drive(
    sdk: openai.OpenAI,
    transcript: Transcript,
    train: list[Example],
    dev: list[Example],
    held_out: list[MeaningRepresentation],
    prompts: list[str],
    args: argparse.Namespace,
) -> Outputs:
    models_before = timed(
        transcript,
        "`models.list()`",
        lambda: list(sdk.models.list()),
        lambda ms: ", ".join(f"`{m.id}`" for m in ms),
    )

    def describe_file(f: Any) -> str:
        return f"`{f.id}`, {f.bytes} bytes, status `{f.status}`"

    training = timed(
        transcript,
        f'`files.create(file=("train.jsonl", …), purpose="fine-tune")`: {len(train)} chat lines',
        lambda: sdk.files.create(
            file=("train.jsonl", jsonl([chat_line(e) for e in train])), purpose="fine-tune"
        ),
        describe_file,
    )
    validation = timed(
        transcript,
        f'`files.create(file=("valid.jsonl", …), purpose="fine-tune")`: {len(dev)} chat lines',
        lambda: sdk.files.create(
            file=("valid.jsonl", jsonl([chat_line(e) for e in dev])), purpose="fine-tune"
        ),
        describe_file,
    )
    raised(
        transcript,
        '`files.create(file=("bad.jsonl", …), purpose="fine-tune")`: line 2 has no assistant message',
        lambda: sdk.files.create(file=("bad.jsonl", BAD_FILE), purpose="fine-tune"),
    )
    hyperparameters = {"n_epochs": args.epochs, "batch_size": args.batch_size}
    created = timed(
        transcript,
        f"`fine_tuning.jobs.create(model={EMBEDDED_MODEL_ID!r}, training_file=…, "
        f"validation_file=…, hyperparameters={hyperparameters}, suffix='e2e', seed={args.seed})`",
        lambda: sdk.fine_tuning.jobs.create(
            model=EMBEDDED_MODEL_ID,
            training_file=training.id,
            validation_file=validation.id,
            hyperparameters=hyperparameters,  # type: ignore[arg-type]
            suffix="e2e",
            seed=args.seed,
        ),
        lambda j: f"`{j.id}`, status `{j.status}`",
    )
    job, statuses, events = poll(sdk, transcript, created.id, args.timeout)
    if job.status != "succeeded":
        raise RuntimeError(f"the fine-tuning job ended {job.status}: {job.error}")
    model = job.fine_tuned_model
    models_after = timed(
        transcript,
        "`models.list()`",
        lambda: list(sdk.models.list()),
        lambda ms: ", ".join(f"`{m.id}`" for m in ms),
    )

    chat, chat_seconds = [], []
    for mr in held_out:
        started = time.perf_counter()
        answer = sdk.chat.completions.create(
            model=model,
            messages=sdk_question(mr),
            max_tokens=args.max_tokens,
            temperature=0,
        )
        chat_seconds.append(time.perf_counter() - started)
        chat.append(answer.choices[0].message.content or "")
    transcript.step(
        f"`chat.completions.create(model={model!r}, messages=[system, user], max_tokens={args.max_tokens}, "
        f"temperature=0)` × {len(held_out)} held-out MRs",
        "answers below",
        sum(chat_seconds),
    )

    started = time.perf_counter()
    chunks = list(
        sdk.chat.completions.create(
            model=model,
            messages=sdk_question(held_out[0]),
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    usage = chunks[-1].usage
    stream = {
        "chunks": len(chunks),
        "text": streamed,
        "same": streamed == chat[0],
        "finish_reason": finish,
        "usage": usage,
    }
    transcript.step(
        "the same, first MR, `stream=True, stream_options={'include_usage': True}`",
        f"{len(chunks)} chunks, finish_reason `{finish}`, usage {usage.prompt_tokens if usage else '?'} + "
        f"{usage.completion_tokens if usage else '?'} tokens; the text "
        f"{'equals' if stream['same'] else 'DIFFERS FROM'} the plain answer",
        time.perf_counter() - started,
    )

    completions = []
    started = time.perf_counter()
    for prompt in prompts:
        completions.append(
            sdk.completions.create(
                model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0
            )
            .choices[0]
            .text
        )
    same = sum(c == a for c, a in zip(completions, chat, strict=True))
    transcript.step(
        f"`completions.create(model={model!r}, prompt=<the chat template's text>, "
        f"max_tokens={args.max_tokens}, temperature=0)` × {len(prompts)}",
        f"{same} of {len(prompts)} texts equal the chat answers",
        time.perf_counter() - started,
    )

    raised(
        transcript,
        "`chat.completions.create(model='prefix-00000000-0000-0000-0000-000000000000', …)`",
        lambda: sdk.chat.completions.create(
            model="prefix-00000000-0000-0000-0000-000000000000",
            messages=sdk_question(held_out[0]),
        ),
    )
    raised(
        transcript,
        "`completions.create(model='gpt-4o-mini', …)`",
        lambda: sdk.completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=4),
    )
    raised(
        transcript,
        "`fine_tuning.jobs.create(training_file=<a file id that does not exist>, …)`",
        lambda: sdk.fine_tuning.jobs.create(
            model=EMBEDDED_MODEL_ID, training_file="00000000-0000-0000-0000-000000000000"
        ),
    )
    return Outputs(
        job=job,
        statuses=statuses,
        events=events,
        models_before=models_before,
        models_after=models_after,
        chat=chat,
        chat_seconds=chat_seconds,
        completions=completions,
        stream=stream,
        files={"train": training, "valid": validation},
    )


def report(
    args: argparse.Namespace,
    transcript: Transcript,
    out: Outputs,
    base: BaseAnswers,
    held_out: list[MeaningRepresentation],
    n_dev: int,
) -> str:
    job = out.job
    scores = {
        "template": bleu(base.template, held_out),
        "tuned": bleu(out.chat, held_out),
    }
    command = shlex.join(
        ["nice", "-n", "10", ".venv/bin/python", "-m", "bench.openai_flow", *sys.argv[1:]]
    )
    steps = "\n".join(
        f"| {i} | {cell(c)} | {cell(r)} | {s:.1f} |"
        for i, (c, r, s) in enumerate(transcript.steps, 1)
    )
    events = sorted(out.events, key=lambda e: (e.data or {}).get("step") or 0)
    shown = events if len(events) <= 8 else events[:4] + events[-4:]

    def loss(value: Any) -> str:
        return "–" if value is None else f"{value:.3f}"

    event_rows = "\n".join(
        f"| {e.data['step']}/{e.data['total_steps']} | {loss(e.data.get('train_loss'))} | "
        f"{loss(e.data.get('valid_loss'))} | {cell(e.message)} |"
        for e in shown
    )
    model_rows = "\n".join(
        f"| `{m.id}` | {m.owned_by} | {getattr(m, 'version', '')} | "
        f"{getattr(m, 'active', getattr(m, 'served_as', ''))} |"
        for m in out.models_after
    )
    answers = "\n".join(
        f"| `{cell(m.mr)}` | {cell(m.references[0])} | {cell(t)} | {cell(c)} |"
        for m, t, c in zip(held_out, base.template, out.chat, strict=True)
    )
    same = sum(c == a for c, a in zip(out.completions, out.chat, strict=True))
    median = sorted(out.chat_seconds)[len(out.chat_seconds) // 2]
    hyper = job.hyperparameters
    took = (job.finished_at or job.created_at) - job.created_at
    return f"""
One run of the whole OpenAI fine-tuning flow against `prefixd up` on the embedded model
(SmolLM2-135M-Instruct, CPU; the trainer and the inference replica share 2 cores that other
work keeps loaded, under `nice`), driven over HTTP by the official `openai` package
{openai.__version__} as a user would; nothing is mocked. Data: E2E
(`shared/data/e2e/dev.txt`), meaning representations → restaurant descriptions as OpenAI
chat lines (system "{SYSTEM}", user the MR, assistant a reference): {args.train} training
and {n_dev} validation lines from `low_data_split` (seed {args.seed}), and {len(held_out)}
held-out MRs that neither file contains. Baseline: the base model without a prefix, greedy,
decoded in this process before the service starts, by the decoder the service uses (the
service always applies a prefix: a tenant without one gets the 409 of the last row).

Reproduce:

    {command}

| # | SDK call | result | seconds |
|---|---|---|---|
{steps}

The job: `fine_tuned_model` `{job.fine_tuned_model}`, hyperparameters as the SDK reads them
back `n_epochs` {hyper.n_epochs}, `batch_size` {hyper.batch_size},
`learning_rate_multiplier` {hyper.learning_rate_multiplier}; `created_at` → `finished_at`
{took} s (queued, the trainer's start, training with a validation pass per epoch, publishing).
Its events (`list_events`, {len(events)} in all, {"all" if len(shown) == len(events) else "the first and last four"} shown, oldest first):

| step | train loss | valid loss | message |
|---|---|---|---|
{event_rows}

`models.list()` after the job (before it: only `{out.models_before[0].id}`):

| id | owned_by | version | active |
|---|---|---|---|
{model_rows}

The held-out MRs, greedy, at most {args.max_tokens} tokens. Base model: the tokens the chat
route decodes, the chat template's text as it is (the last block). Fine-tuned:
`chat.completions.create` over HTTP (median
{median:.1f} s a request; the base model's {2 * len(held_out)} answers took
{base.seconds["decode"]:.0f} s in this process).

| MR (user message) | a reference | base model | fine-tuned (`chat.completions`) |
|---|---|---|---|
{answers}

Corpus BLEU against all references of these {len(held_out)} MRs: base model
**{scores["template"]:.1f}**, fine-tuned **{scores["tuned"]:.1f}**
({scores["tuned"] / max(scores["template"], 1e-9):.1f}× the base). The streamed answer to the first MR, {out.stream["chunks"]} chunks
joined: "{cell(out.stream["text"])}" ({"the same text as the plain answer" if out.stream["same"] else "NOT the plain answer's text"}).
`completions.create` on the template's text (the first MR's, below) gave the chat answer's
text for {same} of {len(out.chat)} MRs (completions reads a prompt, then prefixd's separator; chat reads
the rendered template as it is).
The service's tokens for it, decoded with special tokens:

```
{base.served_prompt}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=40, help="training chat lines")
    parser.add_argument("--held-out", type=int, default=6, help="MRs never trained on")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the job may take")
    parser.add_argument("--dry-run", action="store_true", help="print the section, write nothing")
    args = parser.parse_args()
    body = run(args)
    if args.dry_run:
        print(body)
    else:
        print(f"wrote {write_section(TITLE, body)}")


if __name__ == "__main__":
    main()
