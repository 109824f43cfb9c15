"""What cache-aware routing is worth: eight simulated vLLM replicas with prefix caches, the same paced load per policy.

Eight simulators (``inference-core simulate``) each model a vLLM replica's prefix cache (LRU, blocks
of 16 tokens) holding a quarter of the workload's working set, so the fleet holds about twice of
it: enough if each prefix lives on one replica, too little if every replica must hold all of it.
A prompt's uncached tokens cost ``--prefill-per-token`` seconds each, one prefill at a time per
replica in arrival order, then ``--ttft`` more; tokens follow ``--itl`` apart. Without
``--tokenizer`` a token is one UTF-8 byte of the messages' contents (1,000 tokens are 1,000 bytes
of text), as the simulator counts them.

The load is an open loop: requests arrive at ``--rate`` per second as a Poisson process (as vLLM's
``benchmark_serving`` paces them), whether or not earlier ones have been answered, so what is
measured is the replicas' caches and queues, not how fast this machine turns a closed loop
around. The arrival schedule and every prompt come from ``--seed``: each policy gets the same.
Two workloads, shaped as real traffic is:

- ``documents``: 64 groups of users; every prompt is a 1,000-token instruction header common to
  all groups (the system message), then its group's own 2,000-token document and a short
  question (the user message); each request picks a group at random. Working set: 129,000 tokens.
- ``conversations``: 200 conversations of 8 turns, all starting with the same 1,000-token system
  prompt; each turn appends a 200-token user message to the conversation, which already ends
  with the previous answer as the replica returned it. Turns go round: every conversation's
  first turn in a random order, then every second turn, and so on, so a conversation comes back
  every 200 arrivals (2.5 s); a turn whose previous answer has not arrived by its time waits for
  it (counted as ``late``). Working set: about 426,000 tokens (an answer counted as 75).

Every request is a chat completion streamed through the gateway (``stream: true``,
``max_tokens`` 16). TTFT is measured at the client, from sending to the first chunk with
content. For each policy: fresh simulators (cold caches) and a fresh gateway (as shipped but for
``INFERENCE_ACCESS_LOG=false``; under ``cache_aware`` given every replica's KV-event and replay
sockets, tokenizing through a replica's ``/tokenize``). Arrivals of the first ``--warmup``
seconds (5) are sent but not counted (their TTFT p90 is shown apart: that is the cold start),
then ``--seconds`` (15) of arrivals are; the conversations' 1,600 turns take 20 s at 80 a
second. Printed: TTFT p50/p90/p99, requests/s achieved (answers over the time from the first
counted arrival to the last answer), the replicas' prefix-cache hit rate (hit over queried
prompt tokens from the eight simulators' own counts, over the counted part), the fewest and most
requests a replica served, the gateway's CPU in cores (it must stay well below one for the
figures to be the routing's, not the gateway's) and ``noise``, the cores anything but the
benchmark's processes kept busy meanwhile. Then whether cache_aware met its targets: p90 TTFT at
most a third of round_robin's and half of prefix_affinity's, and throughput no lower than the
best other policy's. ``--runs N`` repeats it all N times and prints medians; a run during which
others kept over ``--max-noise`` cores busy is repeated (``--retries``).

The policy ``user_affinity`` (not run by default) is prefix_affinity with each request naming its
group or conversation in ``user``: each prefix on one replica chosen by hashing, a replica busier
than the least busy by four requests passed over. It is what a client that names its sessions
gets, the reference for what cache-aware routing can reach without being told.

Why 50 µs per token at 80 requests/s (the defaults): 50 µs is about an 8B model's prefill on one
current GPU (20,000 tokens/s). A 3,050-token document prompt prefilled whole takes 150 ms, so a
replica prefills 6.6 of them a second and the fleet 53: at 80 requests/s (10 per replica) a
replica doing full prefills queues without bound. One that holds the header and the document
prefills only the question, 3 ms: 3% busy. Round robin finds the header and, as each replica
holds 16 of the 64 documents, a quarter of the documents: about 1,550 tokens, 78 ms a request,
78% busy: it queues but keeps up. A conversation's turn averages 2,200 tokens (110 ms whole,
over 100% busy at 10 a second), of which a replica holding the conversation prefills the last
answer and the new turn, about 280 tokens (14 ms). The gateway's CPU at this rate is about a
fifth of a core.

The routing decision's own cost is measured in-process (``--decision-trials``; 0 skips it):
``PromptTokenizer.tokens`` on a 4,000-token prompt, then ``Balancer.pick`` under cache_aware over
eight replicas whose indexes hold 30,000 blocks each (``--index-blocks``: the header everywhere,
documents and conversations each on one replica, the rest other prompts' blocks) and crediting the
chosen replica, as the gateway does per request, with its garbage-collector settings: p50/p99 of
each part and of the whole, for a prompt the tokenizer has not seen (a held document and a new
question in one message: all of it encoded) and for a conversation's eighth turn (the earlier
turns' pieces cached: only the new turn encoded), medians over ``--runs`` rounds. It uses the test
model's tokenizer (``~/.cache/inference-core/tiny-llama-v1/model``, a byte-level BPE with a ChatML
template) if present, else trains one like it in a temporary directory.

``--tokenizer auto`` (or a directory) counts prompts in that tokenizer's tokens and starts the
simulators with it; the policy ``cache_aware_local`` is then cache_aware with the gateway
tokenizing prompts itself (``INFERENCE_TOKENIZER``) instead of asking a replica's ``/tokenize``.
The simulators then tokenize each prompt on their shared core (twice under ``cache_aware``: for
``/tokenize`` and for the completion), which at 80 a second takes that core whole: compare the
two at ``--rate 40``.

By default the gateway runs on core 0, the simulators and this client on core 1 (``--no-pin``:
the kernel places them). Everything listens on loopback; every process started is stopped. A
workload and policy take about 35 s (eight start-ups, the warm-up, the run), all of them about 5
minutes.

    python bench/cache_routing.py [--rate 80] [--seconds 15] [--runs 1] [--policies round_robin,cache_aware]
    python bench/cache_routing.py --tokenizer auto --policies cache_aware,cache_aware_local --rate 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from processes import CACHE, MODEL, cpu_seconds, free_port, machine_busy_seconds, percentile, start, stop

POLICIES = ("round_robin", "least_outstanding", "prefix_affinity", "cache_aware")
#: cache_aware, the gateway tokenizing prompts itself (``INFERENCE_TOKENIZER``).
LOCAL = "cache_aware_local"
#: prefix_affinity with each request naming its group or conversation in ``user``: every prefix on one replica.
USERS = "user_affinity"
WORKLOADS = ("documents", "conversations")
CHAT = "/v1/chat/completions"
BLOCK_SIZE = 16
#: Each replica's cache holds this share of the workload's working set.
CACHE_SHARE = 0.25
HEADER_TOKENS = 1_000
DOCUMENT_TOKENS = 2_000
QUESTION_TOKENS = 40
USER_TOKENS = 200
#: An answer at 16 ``max_tokens`` as the simulator writes it (about 75 bytes): sizes the caches.
ANSWER = "the quick brown fox jumps over a lazy dog while gentle rain falls on quiet hills"
#: A turn sent this much after its time waited for its conversation's previous answer (or for this client).
LATE_SECONDS = 0.05
#: A run starts once others keep the machine this quiet (cores) for a second, or after ``--quiet-wait``.
QUIET_CORES = 0.1
TEST_MODEL_TOKENIZER = CACHE / "tiny-llama-v1/model"
DECISION_DOCUMENT_TOKENS = 2_900
DECISION_QUESTION_TOKENS = 100
DECISION_USER_TOKENS = 280
DECISION_ANSWER_TOKENS = 100
DECISION_TURNS = 8
#: Held documents in the decision's index: two per replica.
DECISION_DOCUMENTS = 16
#: A ChatML template, as the test model's (without its tools).
CHATML = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYLLABLES = [
    *("ba", "be", "bi", "bo", "bu", "da", "de", "di", "do", "du", "fa", "fe", "fi", "fo", "ka", "ke", "ki", "ko"),
    *("ku", "la", "le", "li", "lo", "lu", "ma", "me", "mi", "mo", "mu", "na", "ne", "ni", "no", "nu", "pa", "pe"),
    *("pi", "po", "ra", "re", "ri", "ro", "ru", "sa", "se", "si", "so", "su", "ta", "te", "ti", "to", "tu", "va"),
]


# Prompts.


def words(rng: random.Random, chars: int) -> str:
    """Pseudo-words, at least ``chars`` characters: text that no two prompts share by chance."""
    out: list[str] = []
    size = 0
    while size < chars:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


class Units:
    """What a token is: a UTF-8 byte, as the simulator counts without a tokenizer, or a tokenizer's token."""

    def __init__(self, directory: Path | None) -> None:
        self.tokenizer = None
        if directory is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.encode())
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def text(self, rng: random.Random, tokens: int) -> str:
        """Text of about ``tokens`` tokens (exactly, in bytes)."""
        if self.tokenizer is None:
            return words(rng, tokens)[:tokens]
        text = words(rng, tokens * 8)
        offsets = self.tokenizer.encode(text, add_special_tokens=False).offsets
        if len(offsets) <= tokens:
            raise ValueError("this tokenizer needs more text per token than expected")
        return text[: offsets[tokens][0]]


@dataclass(frozen=True, slots=True)
class Session:
    """One user's requests: each turn's text is sent ``at`` seconds in, once the previous answer is in."""

    system: str
    turns: tuple[tuple[float, str], ...]
    #: What the user is (its group, its conversation): the ``user`` field under ``user_affinity``.
    user: str


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    sessions: list[Session]
    #: Distinct prompt tokens worth caching: what the caches are sized against.
    working_set: int


def arrivals(rng: random.Random, rate: float, count: int) -> list[float]:
    """``count`` arrival times of a Poisson process of ``rate`` per second, from 0."""
    times, at = [], 0.0
    for _ in range(count):
        times.append(at)
        at += rng.expovariate(rate)
    return times


def documents(units: Units, args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    header = units.text(rng, HEADER_TOKENS)
    texts = [units.text(rng, DOCUMENT_TOKENS) for _ in range(args.groups)]
    sessions = []
    for at in arrivals(rng, args.rate, round(args.rate * (args.warmup + args.seconds))):
        group = rng.randrange(args.groups)
        question = units.text(rng, QUESTION_TOKENS)
        sessions.append(Session(header, ((at, f"{texts[group]}\n\nQuestion: {question}"),), f"group-{group}"))
    return Workload("documents", sessions, HEADER_TOKENS + args.groups * DOCUMENT_TOKENS)


def conversations(units: Units, args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    count = args.conversations
    system = units.text(rng, HEADER_TOKENS)
    times = arrivals(rng, args.rate, count * args.turns)
    scheduled: list[list[tuple[float, str]]] = [[] for _ in range(count)]
    for turn in range(args.turns):
        # A new order each round: in a fixed one, round robin would keep each conversation on one replica.
        for position, conversation in enumerate(rng.sample(range(count), count)):
            at = times[turn * count + position]
            if at < args.warmup + args.seconds:
                scheduled[conversation].append((at, units.text(rng, USER_TOKENS)))
    sessions = [
        Session(system, tuple(turns), f"conversation-{number}") for number, turns in enumerate(scheduled) if turns
    ]
    working_set = HEADER_TOKENS + count * args.turns * (USER_TOKENS + units.count(ANSWER))
    return Workload("conversations", sessions, working_set)


# The client.


@dataclass(frozen=True, slots=True)
class Sample:
    #: Seconds after the first arrival it was due.
    at: float
    #: Seconds from sending to the first content; None: the request failed.
    ttft: float | None
    #: Seconds it went out after its time (waiting for the previous answer, or for this client).
    late: float
    #: Seconds after the first arrival its last byte came.
    done: float


async def stream(
    client: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], max_tokens: int, user: str | None
) -> tuple[float | None, str]:
    """Time to the first content chunk, and the answer's text; (None, "") if it failed."""
    request = {"model": MODEL, "messages": messages, "stream": True, "max_tokens": max_tokens}
    body = orjson.dumps(request if user is None else {**request, "user": user})
    started = time.perf_counter()
    first = None
    parts = []
    try:
        async with client.post(url, data=body, headers={"content-type": "application/json"}) as response:
            if response.status != 200:
                await response.read()
                return None, ""
            async for line in response.content:
                if not line.startswith(b"data: {"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return None, ""
                for choice in event["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        first = time.perf_counter() - started if first is None else first
                        parts.append(content)
    except aiohttp.ClientError:
        return None, ""
    return first, "".join(parts)


async def drive(
    url: str, sessions: Sequence[Session], max_tokens: int, *, warmup: float, replicas: Sequence[str], users: bool
) -> tuple[list[Sample], list[dict[str, Any]]]:
    """Send every session's turns on time (an open loop), each conversation's in order; ``users``: naming its user.

    Also returns the replicas' ``/_sim/stats`` as the warm-up ends, to count their caches from there.
    """
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:
        began = time.perf_counter()

        async def user(session: Session) -> None:
            messages = [{"role": "system", "content": session.system}]
            for at, text in session.turns:
                delay = began + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                messages.append({"role": "user", "content": text})
                sent = time.perf_counter()
                ttft, answer = await stream(client, url, messages, max_tokens, session.user if users else None)
                samples.append(Sample(at, ttft, sent - began - at, time.perf_counter() - began))
                if ttft is None:
                    return  # a conversation whose turn failed ends there
                messages.append({"role": "assistant", "content": answer})

        async def stats() -> list[dict[str, Any]]:
            await asyncio.sleep(max(0.0, began + warmup - time.perf_counter()))
            answers = []
            for replica in replicas:
                async with client.get(replica + "/_sim/stats") as response:
                    answers.append(await response.json())
            return answers

        counted = asyncio.create_task(stats())
        await asyncio.gather(*(user(session) for session in sessions))
        return samples, await counted


# The processes.


@dataclass(frozen=True, slots=True)
class Fleet:
    pids: list[int]
    urls: list[str]
    events: list[str]
    replays: list[str]

    def stats(self) -> list[dict[str, Any]]:
        return [httpx.get(f"{url}/_sim/stats").json() for url in self.urls]


def ready(processes: list[subprocess.Popen[bytes]], urls: list[str], logs: list[Path], within: float = 60) -> None:
    """Until every simulator answers ``/health`` (one client: a client per poll would take a core of its own)."""
    deadline = time.monotonic() + within
    waiting = list(zip(processes, urls, logs, strict=True))
    with httpx.Client(timeout=1) as client:
        while waiting:
            process, url, log = waiting[0]
            if process.poll() is not None or time.monotonic() > deadline:
                said = log.read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"the simulator at {url} did not start: " + " / ".join(said))
            try:
                if client.get(url + "/health").is_success:
                    waiting.pop(0)
                    continue
            except httpx.TransportError:
                pass
            time.sleep(0.05)


def pin(pid: int, core: int) -> None:
    """Every thread of ``pid`` to ``core`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {core})


def launch(cache_blocks: int, args: argparse.Namespace, logs: Path, processes: list[subprocess.Popen[bytes]]) -> Fleet:
    """Start the simulators into ``processes``, side by side on every core (one after another on one: 20 s)."""
    ports: list[int] = []
    while len(ports) < 3 * args.replicas:
        port = free_port()
        if port not in ports:
            ports.append(port)
    http, events, replays = ports[0::3], ports[1::3], ports[2::3]
    for port, publish, replay in zip(http, events, replays, strict=True):
        command = [
            sys.executable, "-m", "inference_core", "simulate", "--port", str(port),
            "--ttft", str(args.ttft), "--itl", str(args.itl),
            "--prefix-cache-blocks", str(cache_blocks), "--block-size", str(BLOCK_SIZE),
            "--prefill-per-token", str(args.prefill_per_token), "--enable-prompt-tokens-details",
            "--kv-events", f"tcp://127.0.0.1:{publish}", "--kv-replay", f"tcp://127.0.0.1:{replay}",
            *(["--tokenizer", str(args.tokenizer)] if args.tokenizer is not None else []),
        ]  # fmt: skip
        with (logs / f"simulator-{port}.log").open("wb") as output:
            processes.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT))
    urls = [f"http://127.0.0.1:{port}" for port in http]
    ready(processes, urls, [logs / f"simulator-{port}.log" for port in http])
    if args.backend_core is not None:
        for process in processes:
            pin(process.pid, args.backend_core)
    return Fleet(
        [process.pid for process in processes], urls,
        [f"tcp://127.0.0.1:{port}" for port in events], [f"tcp://127.0.0.1:{port}" for port in replays],
    )  # fmt: skip


@contextlib.contextmanager
def fleet(cache_blocks: int, args: argparse.Namespace, attempts: int = 3) -> Iterator[Fleet]:
    """Fresh simulators, pinned once started; started again on other ports if one was taken meanwhile
    (a free port found here may become another connection's before a simulator binds it)."""
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as logs:
        try:
            for attempt in range(attempts):
                try:
                    replicas = launch(cache_blocks, args, Path(logs), processes)
                    break
                except RuntimeError:
                    for process in processes:
                        stop(process)
                    processes.clear()
                    if attempt == attempts - 1:
                        raise
            yield replicas
        finally:
            for process in processes:
                stop(process)


def start_gateway(policy: str, replicas: Fleet, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], int]:
    """The gateway as shipped but for its access log (under cache_aware, told where the KV events are), and its port.

    Started again on another port if its own was taken meanwhile.
    """
    settings = {
        "INFERENCE_BASE_URL": ",".join(url + "/v1" for url in replicas.urls),
        "INFERENCE_MODEL": MODEL, "INFERENCE_HOST": "127.0.0.1",
        "INFERENCE_LOG_LEVEL": "warning", "INFERENCE_ACCESS_LOG": "false",
        "INFERENCE_LB_POLICY": {LOCAL: "cache_aware", USERS: "prefix_affinity"}.get(policy, policy),
    }  # fmt: skip
    if policy in ("cache_aware", LOCAL):
        settings["INFERENCE_KV_EVENTS"] = ",".join(replicas.events)
        settings["INFERENCE_KV_REPLAY"] = ",".join(replicas.replays)
    if policy == LOCAL:
        settings["INFERENCE_TOKENIZER"] = str(args.tokenizer)

    def on(port: int) -> tuple[subprocess.Popen[bytes], int]:
        ready = f"http://127.0.0.1:{port}/health/live"
        return start([], {**settings, "INFERENCE_PORT": str(port)}, ready, core=args.gateway_core), port

    for _ in range(2):
        with contextlib.suppress(RuntimeError):
            return on(free_port())
    return on(free_port())


def wait_for_events(port: int, within: float = 15) -> None:
    """Until the gateway listens to every replica's KV events (before that, prompts are routed by load)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        feeds = [replica.get("kv_index") for backend in health["backends"] for replica in backend["replicas"]]
        if all(feed is not None and feed["events"] == "up" for feed in feeds):
            return
        time.sleep(0.1)
    raise RuntimeError("the gateway did not connect to every replica's KV events")


# Measuring.


def own_cpu() -> float:
    """CPU seconds of this process (the client)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def noise_while(ours: Sequence[int], work: Callable[[], Any]) -> tuple[Any, float]:
    """``work()``, and the cores busy meanwhile with anything but ``ours`` and this process."""
    began, busy = time.monotonic(), machine_busy_seconds()
    mine = own_cpu() + sum(cpu_seconds(pid) for pid in ours)
    result = work()
    used = own_cpu() + sum(cpu_seconds(pid) for pid in ours) - mine
    return result, max(0.0, (machine_busy_seconds() - busy - used) / (time.monotonic() - began))


def wait_quiet(ours: Sequence[int], within: float) -> None:
    """Wait (up to ``within`` seconds) for a second in which others kept under ``QUIET_CORES`` busy."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and noise_while(ours, lambda: time.sleep(1))[1] >= QUIET_CORES:
        pass


def hit_rate(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> float:
    """Prompt tokens found cached over prompt tokens looked up between two readings, over all replicas."""
    pairs = list(zip(before, after, strict=True))
    hits: int = sum(a["prefix_cache"]["hit_tokens"] - b["prefix_cache"]["hit_tokens"] for b, a in pairs)
    queries: int = sum(a["prefix_cache"]["query_tokens"] - b["prefix_cache"]["query_tokens"] for b, a in pairs)
    return hits / max(1, queries)


def served(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[int]:
    """Chat completions each replica answered between two readings."""
    return [a["requests"].get(CHAT, 0) - b["requests"].get(CHAT, 0) for b, a in zip(before, after, strict=True)]


@dataclass(frozen=True, slots=True)
class Result:
    workload: str
    policy: str
    #: Requests due after the warm-up: what every figure but ``warmup_p90`` counts.
    requests: int
    failed: int
    late: int
    rps: float
    #: p50, p90, p99, in ms.
    ttft: tuple[float, float, float]
    #: TTFT p90 (ms) of the requests due during the warm-up, from cold caches.
    warmup_p90: float
    hit_rate: float
    #: Chat completions per replica, fewest and most.
    split: tuple[int, int]
    gateway_cores: float
    noise: float


def measure(policy: str, workload: Workload, args: argparse.Namespace) -> Result:
    cache_blocks = round(CACHE_SHARE * workload.working_set / BLOCK_SIZE)
    with fleet(cache_blocks, args) as replicas:
        gateway, port = start_gateway(policy, replicas, args)
        try:
            if policy in ("cache_aware", LOCAL):
                wait_for_events(port)
            ours = [gateway.pid, *replicas.pids]
            wait_quiet(ours, args.quiet_wait)
            used, began = cpu_seconds(gateway.pid), time.monotonic()
            run = drive(f"http://127.0.0.1:{port}{CHAT}", workload.sessions, args.max_tokens,
                        warmup=args.warmup, replicas=replicas.urls, users=policy == USERS)  # fmt: skip
            (samples, warm), noise = noise_while(ours, lambda: asyncio.run(run))
            cores = (cpu_seconds(gateway.pid) - used) / (time.monotonic() - began)
        finally:
            stop(gateway)
        end = replicas.stats()
    counted = [sample for sample in samples if sample.at >= args.warmup]
    answered = [sample.ttft for sample in counted if sample.ttft is not None]
    cold = [sample.ttft for sample in samples if sample.at < args.warmup and sample.ttft is not None]
    p50, p90, p99 = (percentile(answered, q) * 1000 if answered else 0.0 for q in (0.5, 0.9, 0.99))
    split = served(warm, end)
    return Result(
        workload=workload.name, policy=policy, requests=len(counted), failed=len(counted) - len(answered),
        late=sum(sample.late > LATE_SECONDS for sample in counted),
        rps=len(answered) / max(1e-9, max((sample.done for sample in counted), default=0) - args.warmup),
        ttft=(p50, p90, p99), warmup_p90=percentile(cold, 0.9) * 1000 if cold else 0.0,
        hit_rate=hit_rate(warm, end), split=(min(split), max(split)), gateway_cores=cores, noise=noise,
    )  # fmt: skip


def median(results: Sequence[Result]) -> Result:
    """Each figure's median over runs of one workload and policy."""

    def mid(figure: Callable[[Result], float]) -> float:
        return statistics.median(figure(result) for result in results)

    return Result(
        workload=results[0].workload, policy=results[0].policy, requests=round(mid(lambda r: r.requests)),
        failed=round(mid(lambda r: r.failed)), late=round(mid(lambda r: r.late)), rps=mid(lambda r: r.rps),
        ttft=(mid(lambda r: r.ttft[0]), mid(lambda r: r.ttft[1]), mid(lambda r: r.ttft[2])),
        warmup_p90=mid(lambda r: r.warmup_p90), hit_rate=mid(lambda r: r.hit_rate),
        split=(round(mid(lambda r: r.split[0])), round(mid(lambda r: r.split[1]))),
        gateway_cores=mid(lambda r: r.gateway_cores), noise=mid(lambda r: r.noise),
    )  # fmt: skip


def progress(run: int, r: Result) -> str:
    return (
        f"  run {run}, {r.workload}, {r.policy}: TTFT p50 {r.ttft[0]:.0f} ms, p90 {r.ttft[1]:.0f} ms, "
        f"{r.rps:.1f} req/s, hit rate {100 * r.hit_rate:.1f}%, requests per replica {r.split[0]}-{r.split[1]}, "
        f"gateway {r.gateway_cores:.2f} cores, noise {r.noise:.2f}"
    )


def report(results: list[Result]) -> None:
    print("| workload | policy | requests | req/s | TTFT p50 ms | p90 ms | p99 ms | warm-up p90 ms | cache hit rate "
          "| requests per replica | gateway cores | noise | failed | late |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p50, p90, p99 = r.ttft
        print(f"| {r.workload} | {r.policy} | {r.requests} | {r.rps:.1f} | {p50:.0f} | {p90:.0f} | {p99:.0f} "
              f"| {r.warmup_p90:.0f} | {100 * r.hit_rate:.1f}% | {r.split[0]}-{r.split[1]} | {r.gateway_cores:.2f} "
              f"| {r.noise:.2f} | {r.failed} | {r.late} |")  # fmt: skip


def verdicts(results: list[Result]) -> None:
    """cache_aware against its targets, on each workload where the policies it is held against ran."""
    for workload in dict.fromkeys(r.workload for r in results):
        by = {r.policy: r for r in results if r.workload == workload}
        ours = by.get("cache_aware")
        if ours is None:
            continue
        checks = []
        for other, share in (("round_robin", 1 / 3), ("prefix_affinity", 1 / 2)):
            if other in by:
                ratio = ours.ttft[1] / max(by[other].ttft[1], 1e-9)
                met = "met" if ratio <= share else "NOT met"
                checks.append(f"p90 TTFT {ratio:.2f} x {other}'s (target <= {share:.2f}): {met}")
        others = [r.rps for policy, r in by.items() if policy not in ("cache_aware", LOCAL, USERS)]
        if others:
            # The same arrivals for all: within 1%, figures differ only by when the last answer came.
            met = "met" if ours.rps >= 0.99 * max(others) else "NOT met"
            checks.append(f"{ours.rps:.1f} req/s against the best other's {max(others):.1f}: {met}")
        if checks:
            print(f"{workload}: cache_aware " + "; ".join(checks))


# The routing decision's cost, in-process.


def build_tokenizer(directory: Path) -> Path:
    """A byte-level BPE trained on the standard library's sources with a ChatML template, as the test model's."""
    from tokenizers import ByteLevelBPETokenizer

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:400]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        (path.read_text(errors="replace") for path in sources), vocab_size=4096, min_frequency=2,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
    )  # fmt: skip
    bpe.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def tokenizer_directory(given: str, scratch: Path) -> Path:
    if given != "auto":
        return Path(given).expanduser()
    if (TEST_MODEL_TOKENIZER / "tokenizer.json").is_file():
        return TEST_MODEL_TOKENIZER
    return build_tokenizer(scratch)


@dataclass(frozen=True, slots=True)
class Decision:
    case: str
    #: Prompt tokens, on average, and of them the ones the tokenizer had not seen.
    tokens: int
    encoded: int
    #: Seconds, per trial.
    tokenize: list[float]
    pick: list[float]

    @property
    def total(self) -> list[float]:
        return [t + p for t, p in zip(self.tokenize, self.pick, strict=True)]


def chat(system: str, *turns: str) -> dict[str, Any]:
    """A chat completions body: the system message, then user and assistant turns alternating."""
    roles = ("user", "assistant")
    messages = [{"role": "system", "content": system}]
    messages += [{"role": roles[number % 2], "content": text} for number, text in enumerate(turns)]
    return {"model": MODEL, "messages": messages, "max_tokens": 16}


def decision_cost(directory: Path, args: argparse.Namespace) -> list[Decision]:
    """Tokenize, pick and credit, as the gateway's cache_aware does for each request, over filled indexes."""
    import zmq.asyncio

    from inference_core.config import LBPolicy
    from inference_core.engine.replicas import Balancer, Replica
    from inference_core.kvcache.events import BlockHash, BlockStored
    from inference_core.kvcache.feed import Feed
    from inference_core.kvcache.index import Prompt, chain
    from inference_core.kvcache.tokenizer import PromptTokenizer
    from inference_core.providers.vllm import VLLMProvider
    from inference_core.upstream import create_transport

    rng = random.Random(args.seed)
    units = Units(directory)
    tokenizer = PromptTokenizer.load(directory)
    context = zmq.asyncio.Context()
    replicas = []
    for number in range(args.replicas):
        root = f"http://127.0.0.1:{9000 + number}/v1"  # never connected to
        replica = Replica(number, root, create_transport(root, idle_connections=1, timeout=5), VLLMProvider())
        replica.kv = Feed(context, endpoint="tcp://127.0.0.1:1", replay=None, capacity=200_000, silence=60, fields={})
        replica.kv.connected = True
        replicas.append(replica)
    balancer = Balancer(replicas, LBPolicy.CACHE_AWARE, eject_after=3, stale_after=15)

    def hold(replica: Replica, tokens: list[int]) -> None:
        """The replica stored these tokens' full blocks (named by the gateway's keys: any unique names do)."""
        keys: list[BlockHash] = list(chain(tokens, BLOCK_SIZE, None))
        assert replica.kv is not None
        replica.kv.index.stored(BlockStored(keys, None, tokens[: len(keys) * BLOCK_SIZE], BLOCK_SIZE, None, "GPU"))

    header = units.text(rng, HEADER_TOKENS)
    held = [units.text(rng, DECISION_DOCUMENT_TOKENS) for _ in range(DECISION_DOCUMENTS)]
    for number, text in enumerate(held):
        hold(replicas[number % len(replicas)], tokenizer.tokens(chat(header, f"{text}\n\nQuestion: ")))
    start_of_others = tokenizer.tokens(chat(header))
    for replica in replicas:  # other prompts' blocks after the same header, up to the index's size
        assert replica.kv is not None
        while len(replica.kv.index) < args.index_blocks:
            hold(replica, start_of_others + rng.choices(range(4096), k=4_000))
    gc.collect()
    gc.freeze()  # as the gateway, after start-up: what is built so far stays out of the collector's way
    thresholds = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)

    def decide(payload: dict[str, Any]) -> tuple[float, float, int]:
        started = time.perf_counter()
        tokens = tokenizer.tokens(payload)
        tokenized = time.perf_counter()
        prompt = Prompt(tokens, MODEL)
        chosen = balancer.pick(payload, (), prompt)
        assert chosen.kv is not None
        chosen.kv.routed(prompt)
        return tokenized - started, time.perf_counter() - tokenized, len(tokens)

    def document() -> tuple[float, float, int]:
        question = units.text(rng, DECISION_QUESTION_TOKENS)
        return decide(chat(header, f"{rng.choice(held)}\n\nQuestion: {question}"))

    def turn() -> tuple[float, float, int]:
        """The last turn of a conversation whose earlier turns were tokenized and sent (to one replica) before."""
        earlier = []
        for _ in range(DECISION_TURNS - 1):
            earlier += [units.text(rng, DECISION_USER_TOKENS), units.text(rng, DECISION_ANSWER_TOKENS)]
        hold(rng.choice(replicas), tokenizer.tokens(chat(header, *earlier)))
        return decide(chat(header, *earlier, units.text(rng, DECISION_USER_TOKENS)))

    cases: list[tuple[str, Callable[[], tuple[float, float, int]], int]] = [
        ("a held document and a new question", document, DECISION_DOCUMENT_TOKENS + DECISION_QUESTION_TOKENS),
        (f"a conversation's turn {DECISION_TURNS}", turn, DECISION_USER_TOKENS),
    ]
    decisions = []
    try:
        for case, trial, encoded in cases:
            samples = [trial() for _ in range(args.decision_trials)]
            decisions.append(
                Decision(case, round(sum(n for _, _, n in samples) / len(samples)), encoded,
                         [t for t, _, _ in samples], [p for _, p, _ in samples])
            )  # fmt: skip
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        context.term()
    return decisions


def report_decisions(rounds: list[list[Decision]], directory: Path, args: argparse.Namespace, noise: float) -> None:
    """Each case's p50 and p99 of each part, the median over rounds (each on indexes built afresh)."""
    medians = f", medians of {len(rounds)} rounds" if len(rounds) > 1 else ""
    print(f"\nThe routing decision, in-process: {args.replicas} replicas indexing {args.index_blocks:,} blocks each; "
          f"{args.decision_trials} decisions a prompt{medians}; tokenizer {directory}; noise {noise:.2f}")  # fmt: skip
    print("| prompt | tokens | new tokens encoded | tokenize p50 / p99 µs | pick and credit p50 / p99 µs "
          "| decision p50 / p99 µs |")  # fmt: skip
    print("|---|---|---|---|---|---|")

    def mid(case: int, part: Callable[[Decision], list[float]], q: float) -> float:
        return statistics.median(percentile(part(decisions[case]), q) for decisions in rounds)

    parts: list[Callable[[Decision], list[float]]] = [lambda d: d.tokenize, lambda d: d.pick, lambda d: d.total]
    for case, d in enumerate(rounds[0]):
        figures = " | ".join(f"{mid(case, part, 0.5) * 1e6:.0f} / {mid(case, part, 0.99) * 1e6:.0f}" for part in parts)
        print(f"| {d.case} | {d.tokens:,} | about {d.encoded:,} | {figures} |")
    for case, d in enumerate(rounds[0]):
        p99 = mid(case, parts[2], 0.99)
        print(f"{d.case}: decision p99 {p99 * 1e3:.2f} ms (target < 1 ms): {'met' if p99 < 1e-3 else 'NOT met'}")


def quiet_run(policy: str, workload: Workload, run: int, args: argparse.Namespace) -> Result:
    """One measurement, repeated (up to ``--retries`` times) while others kept over ``--max-noise`` cores busy.

    The simulators share a core at 80% or more of its capacity: another process taking it for a
    while leaves them a backlog they take long to clear, and the figures measure that instead.
    """
    tries = []
    for _ in range(1 + args.retries):
        result = measure(policy, workload, args)
        print(progress(run, result) + ("" if result.noise <= args.max_noise else " (noisy)"), flush=True)
        tries.append(result)
        if result.noise <= args.max_noise:
            break
    return min(tries, key=lambda result: result.noise)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=80, help="requests per second (Poisson arrivals)")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of arrivals counted, after the warm-up")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of arrivals sent from cold, not counted")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated; also {LOCAL}, {USERS}")
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated: documents, conversations ('': none)"
    )
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--groups", type=int, default=64, help="documents: groups, each with its own document")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--turns", type=int, default=8, help="conversations: turns of each")
    parser.add_argument("--prefill-per-token", type=float, default=50e-6, help="the simulators' seconds per token")
    parser.add_argument("--ttft", type=float, default=0.02, help="the simulators' seconds before the first token")
    parser.add_argument("--itl", type=float, default=0.005, help="the simulators' seconds between tokens")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1, help="runs of every workload and policy; figures: medians")
    parser.add_argument("--tokenizer", help="a tokenizer directory, or auto: prompts counted in its tokens")
    parser.add_argument("--decision-trials", type=int, default=1000, help="decisions timed per prompt (0: none)")
    parser.add_argument("--index-blocks", type=int, default=30_000, help="blocks each replica's index holds then")
    parser.add_argument("--quiet-wait", type=float, default=5, help="most seconds to wait for a quiet machine")
    parser.add_argument("--max-noise", type=float, default=0.25, help="a run with more noise (cores) is repeated")
    parser.add_argument("--retries", type=int, default=2, help="most repeats of a noisy run (the quietest counts)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="let the kernel place every process")
    args = parser.parse_args()
    policies = [name for name in args.policies.split(",") if name]
    workloads = [name for name in args.workloads.split(",") if name]
    unknown = set(policies) - {*POLICIES, LOCAL, USERS} or set(workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    pin_cores = args.pin and (os.cpu_count() or 1) >= 2
    args.gateway_core, args.backend_core = (0, 1) if pin_cores else (None, None)
    if pin_cores:
        os.sched_setaffinity(0, {1})  # this client beside the simulators: the gateway's core is its own
    with tempfile.TemporaryDirectory() as scratch:
        if args.tokenizer is not None:
            args.tokenizer = tokenizer_directory(args.tokenizer, Path(scratch))
        elif LOCAL in policies:
            parser.error(f"{LOCAL} needs --tokenizer")
        units = Units(args.tokenizer)
        build = {"documents": documents, "conversations": conversations}
        chosen = [build[name](units, args) for name in workloads]
        print(f"{args.replicas} replicas, each caching a quarter of the working set in {BLOCK_SIZE}-token blocks; "
              f"prefill {args.prefill_per_token * 1e6:g} µs an uncached token, one prompt at a time, then "
              f"{args.ttft * 1000:g} ms; {args.rate:g} requests/s (Poisson), streamed, max_tokens {args.max_tokens}; "
              f"a token: {'a byte' if args.tokenizer is None else args.tokenizer}", flush=True)  # fmt: skip
        runs: dict[tuple[str, str], list[Result]] = {}
        for run in range(args.runs):
            for workload in chosen:
                for policy in policies:
                    runs.setdefault((workload.name, policy), []).append(quiet_run(policy, workload, run + 1, args))
        if runs:
            medians = [median(results) for results in runs.values()]
            print(f"\n{'Medians of ' + str(args.runs) + ' runs' if args.runs > 1 else 'One run'}:")
            report(medians)
            verdicts(medians)
        if args.decision_trials:
            directory = args.tokenizer or tokenizer_directory("auto", Path(scratch))
            rounds, noise = noise_while([], lambda: [decision_cost(directory, args) for _ in range(args.runs)])
            report_decisions(rounds, directory, args, noise)


if __name__ == "__main__":
    main()
