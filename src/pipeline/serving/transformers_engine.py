"""The transformers engine (CPU, or a GPU without vLLM): concurrent requests are merged into one
`model.generate` call over the whole batch (left padding, batching.py); a stream generates alone,
token by token, in a thread. With LoRA adapters the model is a peft model holding those loaded, and a
batch may mix them: each row gets its own adapter (adapter_rows.py), so batching still pays off.
Adapters come and go while the replica serves (Serve's multiplexing loads them on demand, least recently
used out): a change to the model waits for the generations running on it, and an adapter is unloaded
only when no request waiting or running still uses it."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from pipeline.loading import load_adapter, load_base_for_adapters, load_model, load_tokenizer, model_fingerprints
from pipeline.serving.adapter_rows import AdapterRows
from pipeline.serving.batching import BatchMerger
from pipeline.serving.engine import Engine
from pipeline.serving.types import Completion, Prompt, Sampling, TokenLogprob, truncate_at_stop


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: a generated token's logit loses `presence` once and
    `frequency` per time it was generated (prompt tokens do not count)."""

    def __init__(self, prompt_width: int, presence: float, frequency: float):
        self.prompt_width, self.presence, self.frequency = prompt_width, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def load_with_adapters(model_dir: str, trust_remote_code: bool, adapters: dict[str, Path]):
    """The base model, wrapped in one peft model with every adapter when there are any."""
    model = load_base(model_dir, trust_remote_code, bool(adapters))
    for name, path in adapters.items():
        model = load_adapter(model, path, adapter_name=name)  # refuses one trained on another base
    return model


def load_base(model_dir: str, trust_remote_code: bool, lora: bool):
    """The base model, ready for LoRA adapters when `lora`."""
    if lora:
        model = load_base_for_adapters(model_dir, trust_remote_code)
    else:
        model = load_model(AutoModelForCausalLM, model_dir, trust_remote_code)
    # an MoE model trained before recipe.as_saved was saved asking for its router's logits, which breaks
    # every batched generate; generating never needs them
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    return model


class ModelLock:
    """Many generations at once (a batch, streams), or one change to the model with none running; a
    change that waits goes before generations that arrive after it."""

    def __init__(self):
        self.cond, self.readers, self.writers = threading.Condition(), 0, 0

    @contextmanager
    def generating(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.writers)
            self.readers += 1
        try:
            yield
        finally:
            with self.cond:
                self.readers -= 1
                self.cond.notify_all()

    @contextmanager
    def changing(self):
        with self.cond:
            self.writers += 1
            self.cond.wait_for(lambda: not self.readers)
        try:
            yield
        finally:
            with self.cond:
                self.writers -= 1
                self.cond.notify_all()


class TransformersEngine(Engine):
    def __init__(
        self,
        model_dir: str,
        trust_remote_code: bool,
        lora: bool = False,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.02,
        on_batch: Callable[[int], None] = lambda n: None,
    ):
        """`lora`: adapters may be loaded (the base is then loaded for them)."""
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = load_tokenizer(model_dir, trust_remote_code, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_base(model_dir, trust_remote_code, lora).to(self.device).eval()
        self.fits = model_fingerprints(Path(model_dir)) if lora else set()  # once, for every adapter
        self.rows = AdapterRows()
        self.lock, self.names = ModelLock(), itertools.count()
        self.adapters: dict[str, str] = {}  # model id -> its name inside the peft model (no dots allowed there)
        self.users: Counter[str] = Counter()  # model id -> requests waiting or running with it
        self.retired: set[str] = set()  # unloaded as soon as its last user is done
        self.bookkeeping = threading.Lock()
        self.merger = BatchMerger(self.generate_batch, max_batch_size, batch_wait_timeout_s, on_batch)

    async def complete(self, prompt: Prompt, sampling: Sampling) -> Completion:
        with self._using(sampling.adapter):
            return await self.merger.run(prompt, sampling)

    async def stream(self, prompt: Prompt, sampling: Sampling) -> AsyncIterator[str]:
        with self._using(sampling.adapter):
            pieces, done = self._stream_in_thread(prompt, sampling), object()
            while (piece := await asyncio.to_thread(next, pieces, done)) is not done:  # each wait off the loop
                yield piece

    # ---- adapters loaded and unloaded while serving -----------------------------------------------
    async def add_adapter(self, model_id: str, path: Path) -> None:
        await asyncio.to_thread(self._add, model_id, path)

    def _add(self, model_id: str, path: Path) -> None:
        with self.bookkeeping:
            self.retired.discard(model_id)  # asked for again before its unloading came round
            if model_id in self.adapters:
                return
        name = f"lora{next(self.names)}"
        with self.lock.changing():
            self.rows.uninstall()
            try:
                self.model = load_adapter(self.model, path, adapter_name=name, fits=self.fits).eval()
            finally:
                self.rows.install(self.model)
            with self.bookkeeping:
                self.adapters[model_id] = name

    def remove_adapter(self, model_id: str) -> None:
        with self.bookkeeping:
            self.retired.add(model_id)
        self._unload_if_idle(model_id)

    def _unload_if_idle(self, model_id: str) -> None:
        with self.lock.changing(), self.bookkeeping:
            if model_id not in self.retired or self.users[model_id] or model_id not in self.adapters:
                return
            self.retired.discard(model_id)
            name = self.adapters.pop(model_id)
            self.rows.uninstall()
            if self.adapters:
                self.model.delete_adapter(name)
            else:  # peft cannot hold zero adapters: after the last one, the plain model again
                self.model = self.model.unload()
            self.rows.install(self.model)

    @contextmanager
    def _using(self, model_id: str | None):
        if model_id is None:
            yield
            return
        with self.bookkeeping:
            if model_id not in self.adapters:
                raise RuntimeError(f"adapter {model_id} is not loaded on this replica")
            self.users[model_id] += 1
        try:
            yield
        finally:
            with self.bookkeeping:
                self.users[model_id] -= 1
                done = not self.users[model_id] and model_id in self.retired
            if done:  # off the event loop: the unloading waits for the batch running now
                asyncio.get_running_loop().run_in_executor(None, self._unload_if_idle, model_id)

    def _rows(self, sampling: list[Sampling]):
        """Each row's adapter, for the forward passes of the calling thread."""
        return self.rows.rows([self.adapters[r.adapter] if r.adapter else None for r in sampling])

    def _generate_kwargs(self, sampling: list[Sampling], prompt_width: int) -> dict:
        """For one group (sampling settings alike but for the adapter): the first row's settings."""
        s = sampling[0]
        choice = (
            {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
            if s.temperature > 0
            else {"do_sample": False}
        )
        penalties = s.presence_penalty or s.frequency_penalty
        processors = [OpenAIPenalties(prompt_width, s.presence_penalty, s.frequency_penalty)] if penalties else []
        return {
            "pad_token_id": self.tokenizer.pad_token_id,
            "logits_processor": LogitsProcessorList(processors),
            **choice,
        }

    @torch.no_grad()
    def generate_batch(self, prompts: list[Prompt], sampling: list[Sampling]) -> list[Completion]:
        """One forward pass per token for the whole batch; requests whose sampling settings differ
        from each other are generated in separate groups."""
        results: list[Completion | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(sampling):
            groups.setdefault(s.group(), []).append(i)
        for idx in groups.values():
            for i, c in zip(idx, self._generate_group([prompts[i] for i in idx], [sampling[i] for i in idx])):
                results[i] = c
        return results

    def _encode(self, prompts: list[Prompt]):
        """The batch's input ids, left-padded, and attention mask; a prompt given as ids is taken as it is."""
        ids = [p if isinstance(p, list) else self.tokenizer(p)["input_ids"] for p in prompts]
        return self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)

    def _generate_group(self, prompts: list[Prompt], sampling: list[Sampling]) -> list[Completion]:
        enc = self._encode(prompts)
        width, first = enc["input_ids"].shape[1], sampling[0]
        if first.seed is not None:  # one generate runs at a time on a replica (the merger), so this is its seed
            torch.manual_seed(first.seed)
        with self.lock.generating(), self._rows(sampling):
            out = self.model.generate(
                **enc,
                max_new_tokens=max(s.max_new_tokens for s in sampling),
                return_dict_in_generate=True,
                output_logits=first.logprobs is not None,
                **self._generate_kwargs(sampling, width),
            )
        completions = []
        for row, (tokens, mask, s) in enumerate(zip(out.sequences, enc["attention_mask"], sampling)):
            new = tokens[width : width + s.max_new_tokens].tolist()
            eos = self.tokenizer.eos_token_id
            hit_eos = eos in new
            new = new[: new.index(eos)] if hit_eos else new
            text, stopped = truncate_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), s.stop)
            # the EOS token is generated, and scored, though not in the text: as vLLM and OpenAI give it, and
            # as lm-eval, which drops the last logprob as the generated token's, needs it
            scored = new + [eos] * hit_eos
            logprobs = None if s.logprobs is None else self._logprobs(out.logits, row, scored, s.logprobs)
            finish = "stop" if hit_eos or stopped else "length"
            completions.append(Completion(text, int(mask.sum()), len(new) + hit_eos, finish, logprobs))
        if first.echo and first.logprobs is not None:
            for row, tokens in enumerate(self._prompt_logprobs(enc, sampling)):
                completions[row].prompt_logprobs = tokens
        return completions

    def _prompt_logprobs(self, enc, sampling: list[Sampling]) -> list[list[TokenLogprob]]:
        """Each prompt token's logprob given the tokens before it (one forward pass over the batch; the first
        token has none), as lm-eval's loglikelihood tasks read them from an OpenAI server."""
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt starts at position 0
        with self.lock.generating(), self._rows(sampling):
            logits = self.model(**enc, position_ids=positions).logits
        out = []
        for row, s in enumerate(sampling):
            real = mask[row].bool()
            ids, row_logits = enc["input_ids"][row][real].tolist(), logits[row][real]
            first = TokenLogprob(self.tokenizer.decode(ids[:1]), None, [])
            steps = self._logprobs(tuple(row_logits[:-1].unsqueeze(1)), 0, ids[1:], s.logprobs)
            out.append([first, *steps])
        return out

    def _logprobs(self, logits: tuple[torch.Tensor, ...], row: int, tokens: list[int], top: int) -> list[TokenLogprob]:
        """Each generated token's log-probability under the model (its raw distribution), with the `top` likeliest."""
        out = []
        for step, token in enumerate(tokens):
            logp = torch.log_softmax(logits[step][row].float(), dim=-1)
            alternatives = logp.topk(top) if top else None
            out.append(
                TokenLogprob(
                    self.tokenizer.decode([token]),
                    round(logp[token].item(), 5),
                    []
                    if alternatives is None
                    else [
                        (self.tokenizer.decode([t]), round(v, 5))
                        for v, t in zip(alternatives.values.tolist(), alternatives.indices.tolist())
                    ],
                )
            )
        return out

    def _stream_in_thread(self, prompt: Prompt, sampling: Sampling) -> Iterator[str]:
        """Yield text pieces as they are generated (generation runs in a thread)."""
        from transformers import TextIteratorStreamer

        enc = self._encode([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kwargs = dict(**enc, max_new_tokens=sampling.max_new_tokens, streamer=streamer)

        @torch.no_grad()
        def generate():
            with self.lock.generating(), self._rows([sampling]):
                self.model.generate(**kwargs, **self._generate_kwargs([sampling], enc["input_ids"].shape[1]))

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
