"""The serving rules as pure functions, without Ray: stop strings (also split across streamed pieces),
the OpenAI stream format, the batch merger under concurrent requests, and engine selection."""

import asyncio
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from conftest import lora_adapter
from pipeline.config import ConfigError
from pipeline.digest import path_digest
from pipeline.loading import check_adapter_base, load_tokenizer, write_adapter_record, write_quantized_record
from pipeline.serving.adapter_rows import AdapterRows
from pipeline.serving.adapters import (
    Adapter,
    AdapterCatalog,
    check_lora_rank,
    check_servable,
    find_adapters,
    withdraw,
)
from pipeline.serving.batching import BatchMerger
from pipeline.serving.engines import choose_engine, vllm_engine_args, vllm_lora_args
from pipeline.serving.openai_format import ChunkWriter
from pipeline.serving.transformers_engine import TransformersEngine
from pipeline.serving.types import Completion, Sampling, StopCutter, truncate_at_stop


def test_truncate_at_stop_cuts_at_the_earliest_stop_string():
    assert truncate_at_stop("one END two STOP", ("STOP", "END")) == ("one ", True)
    assert truncate_at_stop("nothing here", ("STOP", "")) == ("nothing here", False)


def stream(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], str, bool]:
    cutter = StopCutter(stop)
    sent = []
    for piece in pieces:
        sent.append(cutter.feed(piece))
        if cutter.stopped:
            break
    sent.append(cutter.flush())
    return [s for s in sent if s], cutter.text, cutter.stopped


def test_a_stop_string_split_across_pieces_never_reaches_the_client():
    sent, text, stopped = stream(["foo E", "ND bar"], ("END",))
    assert sent == ["foo "] and text == "foo " and stopped
    sent, _, stopped = stream(["a<", "|e", "nd|>", "more"], ("<|end|>",))
    assert "".join(sent) == "a" and stopped


def test_a_held_back_tail_that_starts_no_stop_string_is_sent_later():
    sent, text, stopped = stream(["the E", "ast wind", " blows"], ("END",))
    assert sent == ["the ", "East wind", " blows"] and text == "the East wind blows" and not stopped
    sent, text, stopped = stream(["ends with E"], ("END",))
    assert sent == ["ends with ", "E"] and not stopped  # the end of the stream settles it
    assert stream(["no stops at all"], ())[0] == ["no stops at all"]


def test_chunks_follow_the_openai_stream_format():
    chat = ChunkWriter("m", chat=True)
    first, second = (json.loads(chat.piece(t, first=f)[6:]) for t, f in (("Hel", True), ("lo", False)))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hel"}
    assert second["choices"][0]["delta"] == {"content": "lo"} and first["id"] == second["id"]
    end = json.loads(chat.piece("", finish_reason="stop")[6:])
    assert end["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert json.loads(chat.usage(3, 2)[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = json.loads(ChunkWriter("m", chat=False).piece("x")[6:])
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "x"
    assert ChunkWriter.done() == "data: [DONE]\n\n"


class SlowModel:
    """Stands in for model.generate: records each call's batch, answers each prompt with its own text."""

    def __init__(self, seconds: float = 0.05):
        self.calls, self.seconds, self.threads = [], seconds, set()

    def __call__(self, prompts: list[str], sampling: list[Sampling]) -> list[Completion]:
        self.calls.append(list(prompts))
        self.threads.add(threading.get_ident())
        time.sleep(self.seconds)
        return [Completion(f"answer to {p}", len(p), s.max_new_tokens, "length") for p, s in zip(prompts, sampling)]


async def run_concurrently(merger: BatchMerger, prompts: list[str]) -> list[Completion]:
    return await asyncio.gather(*(merger.run(p, Sampling(max_new_tokens=i + 1)) for i, p in enumerate(prompts)))


def test_concurrent_requests_share_generate_calls_and_each_gets_its_own_answer():
    model, sizes = SlowModel(), []
    merger = BatchMerger(model, max_batch_size=4, fill_wait_s=0.02, on_batch=sizes.append)
    prompts = [f"p{i}" for i in range(10)]
    answers = asyncio.run(run_concurrently(merger, prompts))
    assert [a.text for a in answers] == [f"answer to {p}" for p in prompts]
    assert [a.completion_tokens for a in answers] == list(range(1, 11))
    assert sizes == [4, 4, 2] and sorted(p for call in model.calls for p in call) == sorted(prompts)
    assert threading.get_ident() not in model.threads, "generate runs off the event loop"


def test_requests_arriving_while_the_model_is_busy_join_the_next_batch():
    model = SlowModel(seconds=0.2)
    merger = BatchMerger(model, max_batch_size=8, fill_wait_s=0.0)

    async def scenario():
        first = asyncio.ensure_future(merger.run("first", Sampling()))
        await asyncio.sleep(0.05)  # the model is busy with "first" now
        late = [asyncio.ensure_future(merger.run(f"late{i}", Sampling())) for i in range(5)]
        await asyncio.gather(first, *late)

    asyncio.run(scenario())
    assert model.calls == [["first"], [f"late{i}" for i in range(5)]]


def test_an_engine_error_reaches_every_request_of_its_batch():
    def broken(prompts, sampling):
        raise RuntimeError("CUDA error: device-side assert")

    merger = BatchMerger(broken, max_batch_size=8, fill_wait_s=0.02)

    async def scenario():
        return await asyncio.gather(*(merger.run(f"p{i}", Sampling()) for i in range(3)), return_exceptions=True)

    errors = asyncio.run(scenario())
    assert [str(e) for e in errors] == ["CUDA error: device-side assert"] * 3


def test_engine_selection_and_vllm_arguments():
    assert choose_engine("auto", vllm_present=False) == "transformers"
    assert choose_engine("auto", vllm_present=True) == "vllm"
    assert choose_engine("transformers", vllm_present=True) == "transformers"
    with pytest.raises(RuntimeError, match="requirements-vllm.txt"):
        choose_engine("vllm", vllm_present=False)
    args = vllm_engine_args("/models/awq", max_model_len=2048, max_num_seqs=64, trust_remote_code=False)
    assert args == {
        "model": "/models/awq",
        "tokenizer": "/models/awq",
        "max_model_len": 2048,
        "max_num_seqs": 64,
        "dtype": "auto",
        "gpu_memory_utilization": 0.85,
        "trust_remote_code": False,
    }
    assert vllm_engine_args("/m", 2048, 64, trust_remote_code=True)["trust_remote_code"] is True
    lora = {"max_loras": 2, "max_lora_rank": 16}
    assert vllm_engine_args("/m", 2048, 64, False, lora) == {
        **args,
        "model": "/m",
        "tokenizer": "/m",
        "enable_lora": True,
        **lora,
    }


def fake_adapter(folder: Path, rank: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return folder


def test_adapters_are_the_folders_holding_one_and_vllm_is_sized_for_them(tmp_path):
    assert find_adapters(None) == {} and find_adapters(str(tmp_path / "none yet")) == {}
    a, b = fake_adapter(tmp_path / "b-legal", 8), fake_adapter(tmp_path / "a-support", 32)
    (tmp_path / "notes").mkdir()  # a folder without adapter_config.json is not an adapter
    assert find_adapters(str(tmp_path)) == {"a-support": b, "b-legal": a}
    assert vllm_lora_args(None, 8, 64) is None  # LoRA is on whenever adapters may arrive, before any has
    assert vllm_lora_args(str(tmp_path / "none yet"), 8, 64) == {"max_loras": 8, "max_lora_rank": 64}
    check_lora_rank(b, 32)
    with pytest.raises(ConfigError, match=r"a-support has LoRA rank 32, over serve.max_lora_rank=16"):
        check_lora_rank(b, 16)
    for clash in ("base", "__base__"):
        with pytest.raises(ConfigError, match="named like the base model"):
            check_servable(clash, fake_adapter(tmp_path / clash, 8), "base", tmp_path, set())


def test_a_quantized_model_stands_for_its_16_bit_source(tmp_path):
    """An adapter trained on the 16-bit model fits its 4-bit export, and nothing else."""
    merged, awq, other = (tmp_path / n for n in ("merged", "awq", "other"))
    for folder, weights in ((merged, b"16-bit"), (awq, b"4-bit"), (other, b"another")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
    adapter = fake_adapter(tmp_path / "adapter", 8)
    write_adapter_record(adapter, merged, path_digest(merged))
    write_quantized_record(awq, merged)
    assert json.loads((awq / "pipeline.json").read_text())["quantized_from"] == "../merged"
    check_adapter_base(adapter, merged)
    check_adapter_base(adapter, awq)
    with pytest.raises(ConfigError, match=f"trained on the base model in {merged}"):
        check_adapter_base(adapter, other)


def test_openai_requests_refuse_what_the_server_does_not_implement():
    from pydantic import ValidationError

    from pipeline.serving.schemas import ChatRequest, CompletionRequest

    chat = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}],
    }
    request = ChatRequest(
        **chat,
        n=3,
        seed=7,
        logprobs=True,
        top_logprobs=2,
        presence_penalty=0.5,
        response_format={"type": "text"},
        user="someone",
    )
    assert request.messages[0].plain() == {"role": "user", "content": "hi"} and request.logprob_alternatives() == 2
    assert ChatRequest(**chat).logprob_alternatives() is None
    assert CompletionRequest(model="m", prompt="x", logprobs=0, best_of=1).logprob_alternatives() == 0
    for extra, param in [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"top_p": 0}, "top_p"),
        ({"n": 2, "stream": True}, None),
    ]:
        with pytest.raises(ValidationError) as error:
            ChatRequest(**chat, **extra)
        loc = error.value.errors()[0]["loc"]
        assert (loc[0] if loc else None) == param, (extra, error.value.errors())
    with pytest.raises(ValidationError, match="only text content parts"):
        ChatRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}])
    for odd in ({}, [], None, 3):  # any JSON as a part's type is refused as a 4xx (a dict one was a 500 in fuzzing)
        with pytest.raises(ValidationError, match="only text content parts"):
            ChatRequest(model="m", messages=[{"role": "user", "content": [{"type": odd, "text": "x"}]}])
    # a prompt is text or token ids, one of either (as lm-eval sends a scored window: a batch of one)
    for given, prompt in (("hi", "hi"), (["hi"], "hi"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6])):
        assert CompletionRequest(model="m", prompt=given).prompt == prompt
    for refused in ("", [], [[]], ["a", "b"], [[5], [6]], [5, "a"]):
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt=refused)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    from pipeline.serving.transformers_engine import OpenAIPenalties

    ids = torch.tensor([[5, 5, 1, 2, 2, 2]])  # a prompt of 2 tokens (both 5), then 1 once and 2 three times
    scores = OpenAIPenalties(prompt_width=2, presence=0.5, frequency=0.25)(ids, torch.zeros(1, 6))
    assert scores.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0, 0.0]]


def test_logprobs_take_the_shape_each_openai_api_uses():
    from pipeline.serving.openai_format import chat_logprobs, completion_logprobs
    from pipeline.serving.types import TokenLogprob

    tokens = [TokenLogprob("He", -0.1, [("He", -0.1), ("Hi", -2.5)]), TokenLogprob("llo", -0.2, [("llo", -0.2)])]
    chat = chat_logprobs(tokens)["content"]
    assert chat[0] == {
        "token": "He",
        "logprob": -0.1,
        "bytes": [72, 101],
        "top_logprobs": [
            {"token": "He", "logprob": -0.1, "bytes": [72, 101]},
            {"token": "Hi", "logprob": -2.5, "bytes": [72, 105]},
        ],
    }
    assert completion_logprobs(tokens) == {
        "tokens": ["He", "llo"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"He": -0.1, "Hi": -2.5}, {"llo": -0.2}],
        "text_offset": [0, 2],
    }


def test_vllm_gets_every_sampling_setting():
    from pipeline.serving.vllm_engine import sampling_params, vllm_prompt

    assert vllm_prompt("hi") == "hi" and vllm_prompt([5, 6]) == {"prompt_token_ids": [5, 6]}

    params = sampling_params(
        Sampling(
            max_new_tokens=9,
            temperature=0.7,
            top_p=0.9,
            stop=("x",),
            seed=3,
            presence_penalty=0.5,
            frequency_penalty=0.1,
            logprobs=2,
        )
    )
    assert params == {
        "max_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["x"],
        "seed": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "logprobs": 2,
        "prompt_logprobs": None,
    }
    assert sampling_params(Sampling(logprobs=1, echo=True))["prompt_logprobs"] == 1  # echo: the prompt's too


def catalog_on(folder: Path, base: Path, refuse: set[str] = frozenset()) -> tuple[AdapterCatalog, list[str]]:
    """A catalog whose loading succeeds except for adapters named in `refuse`; `loads` records each."""
    loads = []

    async def load(adapter: Adapter) -> None:
        if adapter.name in refuse:
            raise ValueError(f"cannot load {adapter.name}")
        loads.append(adapter.model_id)

    return AdapterCatalog(str(folder), "base", base, {path_digest(base)}, load, every_s=0), loads


def test_the_catalog_serves_an_adapter_version_only_once_it_has_loaded(tmp_path):
    base, other = tmp_path / "base-model", tmp_path / "other-model"
    for model in (base, other):
        model.mkdir()
        (model / "model.safetensors").write_bytes(model.name.encode())
    folder = tmp_path / "adapters"
    for name in ("alpha", "beta"):
        write_adapter_record(fake_adapter(folder / name, 8), base, path_digest(base))
    write_adapter_record(fake_adapter(folder / "stranger", 8), other, path_digest(other))
    fake_adapter(folder / "base", 8)
    catalog, loads = catalog_on(folder, base)

    async def scenario():
        first = await catalog.sync()
        assert first["added"] == ["alpha", "beta"] and first["served"] == ["alpha", "beta"]
        assert "trained on the base model in" in first["refused"]["stranger"]
        assert "named like the base model" in first["refused"]["base"]
        assert loads == [catalog.served["alpha"].model_id, catalog.served["beta"].model_id]
        alpha_v1 = catalog.served["alpha"].model_id

        (folder / "alpha" / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
        shutil.rmtree(folder / "beta")
        changed = await catalog.sync()
        assert changed["replaced"] == ["alpha"] and changed["removed"] == ["beta"] and changed["served"] == ["alpha"]
        assert catalog.served["alpha"].model_id != alpha_v1 and loads[-1] == catalog.served["alpha"].model_id
        assert await catalog.sync() == {**changed, "added": [], "replaced": [], "removed": []}  # nothing new: no load
        assert len(loads) == 3

        # a rewrite that fails to load leaves the old version answering; a new one that fails is not served
        catalog.load = catalog_on(folder, base, refuse={"alpha", "gamma"})[0].load
        before = catalog.served["alpha"]
        (folder / "alpha" / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
        write_adapter_record(fake_adapter(folder / "gamma", 8), base, path_digest(base))
        failed = await catalog.sync()
        assert failed["replaced"] == [] and failed["added"] == [] and catalog.served == {"alpha": before}
        assert failed["refused"]["gamma"] == "cannot load gamma" and failed["refused"]["alpha"] == "cannot load alpha"
        assert await catalog.model_id("alpha") == before.model_id
        catalog.scanned_at = 0  # a name not served looks at the folder again (at most once a second)
        assert await catalog.model_id("nobody") is None

    asyncio.run(scenario())


def test_delete_moves_an_adapter_out_of_the_served_folder_and_keeps_it(tmp_path):
    fake_adapter(tmp_path / "alpha", 8)
    moved = withdraw(str(tmp_path), "alpha")
    assert not (tmp_path / "alpha").exists() and (moved / "adapter_config.json").is_file()
    assert find_adapters(str(tmp_path)) == {}  # .withdrawn/ holds no adapter of its own
    fake_adapter(tmp_path / "alpha", 8)
    assert withdraw(str(tmp_path), "alpha") != moved  # withdrawn twice: two folders


def test_the_engine_loads_and_unloads_adapters_while_it_serves(tiny_model_dir, tmp_path):
    """Real peft on the tiny model: an adapter loaded while serving answers as peft does alone, a batch
    mixes it with the base, an adapter removed while a request uses it is unloaded when that request is
    done, and after the last one the engine holds the plain model again."""
    alpha, beta = (lora_adapter(tiny_model_dir, tmp_path / n, seed) for seed, n in enumerate(("alpha", "beta")))
    engine = TransformersEngine(str(tiny_model_dir), False, lora=True, max_batch_size=4, batch_wait_timeout_s=0.05)
    greedy = Sampling(max_new_tokens=8)

    async def answers(*adapters):
        done = await asyncio.gather(*(engine.complete("Permission is", replace(greedy, adapter=a)) for a in adapters))
        return [c.text for c in done]

    async def scenario():
        base_alone = (await answers(None))[0]
        await engine.add_adapter("alpha@1", alpha)
        await engine.add_adapter("beta@1", beta)
        alone = {a: (await answers(a))[0] for a in ("alpha@1", "beta@1")}
        assert len({base_alone, *alone.values()}) == 3
        assert await answers(None, "alpha@1", "beta@1", "alpha@1") == [base_alone, *alone.values(), alone["alpha@1"]]

        running = asyncio.ensure_future(answers("alpha@1"))
        while not engine.users["alpha@1"]:  # the request is counted as alpha's user before alpha is removed
            await asyncio.sleep(0)
        await asyncio.to_thread(engine.remove_adapter, "alpha@1")
        assert "alpha@1" in engine.adapters  # still in use
        assert await running == [alone["alpha@1"]]
        for _ in range(100):
            if "alpha@1" not in engine.adapters:
                break
            await asyncio.sleep(0.01)
        assert list(engine.adapters) == ["beta@1"] and isinstance(engine.model, PeftModel)
        with pytest.raises(RuntimeError, match="adapter alpha@1 is not loaded"):
            await answers("alpha@1")
        await asyncio.to_thread(engine.remove_adapter, "beta@1")
        assert not isinstance(engine.model, PeftModel) and await answers(None) == [base_alone]

    asyncio.run(scenario())


def test_echo_gives_each_prompt_tokens_logprob_as_the_model_alone_does_in_a_padded_batch(tiny_model_dir):
    """lm-eval scores an endpoint's loglikelihood from the prompt's own logprobs (echo): in a batch whose
    shorter prompt is left-padded, each token's logprob is the one a plain forward pass of its prompt gives."""
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_model, load_tokenizer

    engine = TransformersEngine(str(tiny_model_dir), False, max_batch_size=4, batch_wait_timeout_s=0.05)
    model, tokenizer = load_model(AutoModelForCausalLM, tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    prompts, echo = ["Permission is hereby granted, free of charge", "Copyright"], Sampling(1, logprobs=1, echo=True)

    async def both():
        return await asyncio.gather(*(engine.complete(p, echo) for p in prompts))

    for prompt, completion in zip(prompts, asyncio.run(both()), strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        got = completion.prompt_logprobs
        assert [t.token for t in got] == [tokenizer.decode([i]) for i in ids[0].tolist()]
        assert got[0].logprob is None and all(len(t.top) == 1 for t in got[1:])
        assert [t.logprob for t in got[1:]] == pytest.approx(expected.tolist(), abs=2e-4)
        assert len(completion.logprobs) == 1  # and the one token generated
    plain = asyncio.run(engine.complete(prompts[0], Sampling(1, logprobs=1)))
    assert plain.prompt_logprobs is None


def test_a_prompt_given_as_token_ids_is_read_as_given_in_a_batch_with_text(tiny_model_dir):
    """Ids that tokenizing their text again would not give back (as a window cut inside a word, here a word's
    letters one by one) are scored as those ids, beside a text prompt in the same padded batch."""
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_model, load_tokenizer

    engine = TransformersEngine(str(tiny_model_dir), False, max_batch_size=4, batch_wait_timeout_s=0.05)
    model, tokenizer = load_model(AutoModelForCausalLM, tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    ids = tokenizer.convert_tokens_to_ids(list("Permission"))  # letter by letter: no merges
    assert tokenizer(tokenizer.decode(ids))["input_ids"] != ids
    echo = Sampling(2, logprobs=0, echo=True)

    async def both():
        return await asyncio.gather(engine.complete(ids, echo), engine.complete("Copyright", echo))

    by_ids, by_text = asyncio.run(both())
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert [t.token for t in by_ids.prompt_logprobs] == [tokenizer.decode([i]) for i in ids]
    assert [t.logprob for t in by_ids.prompt_logprobs[1:]] == pytest.approx(expected.tolist(), abs=2e-4)
    assert by_ids.prompt_tokens == len(ids)
    assert by_text.prompt_tokens == len(tokenizer("Copyright")["input_ids"]) == len(by_text.prompt_logprobs)
    greedy = tokenizer.decode([int(logits[-1].argmax())], skip_special_tokens=True)
    assert by_ids.text.startswith(greedy)


def test_a_generated_eos_is_scored_though_not_in_the_text(tiny_model_dir):
    """lm-eval reads a window's loglikelihood as every logprob but the last, the generated token's: when that
    token is EOS it must be there too, or the window's own last token is dropped instead."""
    engine = TransformersEngine(str(tiny_model_dir), False, max_batch_size=1)
    head, eos = engine.model.get_output_embeddings(), engine.tokenizer.eos_token_id
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos] = 1e4  # the model now always ends here
    engine.model.set_output_embeddings(biased)
    done = asyncio.run(engine.complete("Permission is hereby", Sampling(1, logprobs=1, echo=True)))
    assert (done.text, done.finish_reason, done.completion_tokens) == ("", "stop", 1)
    assert [t.token for t in done.logprobs] == [engine.tokenizer.eos_token] and done.logprobs[0].logprob == 0


PAD = {"return_tensors": "pt", "padding": True}


def peft_with_adapters(base: Path, tmp_path: Path) -> PeftModel:
    """The tiny model holding three adapters unlike each other: rank 8 on q/v; rank 4 on q/k/v/o; and one
    that also trains lm_head in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_model

    shapes = {
        "alpha": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "beta": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        "gamma": LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
    }
    model = None
    for seed, (name, lora) in enumerate(shapes.items()):
        torch.manual_seed(seed)
        built = get_peft_model(load_model(AutoModelForCausalLM, base), lora)
        if name == "beta":  # LoRA's B starts at zero: give it weights so that it changes the answers
            for p in (p for n, p in built.named_parameters() if "lora_B" in n):
                torch.nn.init.normal_(p, std=0.2)
        if name == "gamma":
            torch.nn.init.normal_(built.base_model.model.lm_head.modules_to_save["default"].weight, std=0.1)
        built.save_pretrained(tmp_path / name)
        if model is None:
            plain = load_model(AutoModelForCausalLM, base)
            model = PeftModel.from_pretrained(plain, tmp_path / name, adapter_name=name)
        else:
            model.load_adapter(str(tmp_path / name), adapter_name=name)
    return model.eval()


def test_a_mixed_batch_gets_each_rows_adapter_as_peft_gives_it_alone(tiny_model_dir, tmp_path):
    """Stacked adapters (two batched matmuls per layer) against peft with one adapter active at a time:
    the same logits for every row, base rows included, and a module trained in full (gamma's lm_head)
    follows its row too (peft's own mixed batches give every row its active adapter's copy, or none);
    taking the hooks off gives peft its model back unchanged."""
    model = peft_with_adapters(tiny_model_dir, tmp_path)
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    rows = ["alpha", None, "beta", "gamma", "beta", None]
    enc = tokenizer(["Permission is hereby granted"] * 3 + ["Copyright", "free of charge", "the Software"], **PAD)
    with torch.no_grad():
        alone = {}
        for name in ("alpha", "beta", "gamma"):
            model.set_adapter(name)
            alone[name] = model(**enc).logits
        with model.disable_adapter():
            alone[None] = model(**enc).logits
        before = model(**enc).logits  # peft's own: its active adapter (gamma, the last set) on every row
        stacked = AdapterRows()
        stacked.install(model)
        assert stacked.stacked_bytes() > 0 and len(stacked.stacks) == 2 * 4  # q/k/v/o of both layers
        with stacked.rows(rows):
            got = model(**enc).logits
        stacked.uninstall()
        after = model(**enc).logits
    for i, name in enumerate(rows):
        torch.testing.assert_close(got[i], alone[name][i], atol=1e-5, rtol=1e-5)
    assert len({tuple(got[i, -1].topk(3).indices.tolist()) for i in (0, 1, 2, 3)}) == 4  # the adapters differ
    torch.testing.assert_close(after, before)


def test_generations_running_at_once_keep_their_own_rows(tiny_model_dir, tmp_path):
    """A stream beside a batch on one replica: each thread's rows reach its own forward passes only
    (peft's `adapter_names` hooks are the whole model's while a generate runs, so they would mix)."""
    model = peft_with_adapters(tiny_model_dir, tmp_path)
    tokenizer = load_tokenizer(tiny_model_dir, padding_side="left")
    stacked = AdapterRows()
    stacked.install(model)
    jobs = {
        "batch": (["alpha", None, "gamma"], ["Permission is", "Copyright", "free of charge"]),
        "stream": (["beta"], ["the Software is provided"]),
        "base": ([None], ["the Software is provided"]),
    }

    @torch.no_grad()
    def greedy(job: str) -> list[list[int]]:
        names, prompts = jobs[job]
        with stacked.rows(names):
            out = model.generate(**tokenizer(prompts, **PAD), max_new_tokens=12, do_sample=False, pad_token_id=0)
        return out.tolist()

    alone = {job: greedy(job) for job in jobs}
    assert alone["stream"] != alone["base"]
    with ThreadPoolExecutor(3) as pool:
        together = [pool.submit(greedy, job) for job in list(jobs) * 4]
    assert [f.result() for f in together] == [alone[job] for job in list(jobs) * 4]


def test_a_model_saved_asking_for_its_routers_logits_still_generates_in_batches(tiny_model_dir, tmp_path):
    """MoE models trained before the recipe stopped saving its training flag ask for the router's logits,
    with which transformers fails any batched generate (its balancing loss against the whole mask)."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "output_router_logits": True}))
    engine = TransformersEngine(str(model_dir), False)
    done = engine.generate_batch(["Permission is hereby granted", "Copyright"], [Sampling(max_new_tokens=3)] * 2)
    assert len(done) == 2 and all(0 < c.completion_tokens <= 3 for c in done)
