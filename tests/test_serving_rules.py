"""The serving rules as pure functions, without Ray: stop strings (also split across streamed pieces),
the OpenAI stream format, the batch merger under concurrent requests, and engine selection."""

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.digest import path_digest
from pipeline.loading import check_adapter_base, write_adapter_record, write_quantized_record
from pipeline.serving.adapters import find_adapters
from pipeline.serving.batching import BatchMerger
from pipeline.serving.engines import choose_engine, vllm_engine_args, vllm_lora_args
from pipeline.serving.openai_format import ChunkWriter
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
    assert find_adapters(None, "base") == {} and find_adapters(str(tmp_path / "none yet"), "base") == {}
    a, b = fake_adapter(tmp_path / "b-legal", 8), fake_adapter(tmp_path / "a-support", 32)
    (tmp_path / "notes").mkdir()  # a folder without adapter_config.json is not an adapter
    assert find_adapters(str(tmp_path), "base") == {"a-support": b, "b-legal": a}
    assert vllm_lora_args({}, 8, 64) is None
    assert vllm_lora_args(find_adapters(str(tmp_path), "base"), 8, 64) == {"max_loras": 2, "max_lora_rank": 64}
    with pytest.raises(ConfigError, match=r"over serve.max_lora_rank=16 \(a-support has rank 32\)"):
        vllm_lora_args(find_adapters(str(tmp_path), "base"), 8, 16)
    fake_adapter(tmp_path / "base", 8)
    with pytest.raises(ConfigError, match="named like the base model"):
        find_adapters(str(tmp_path), "base")


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
    from pipeline.serving.vllm_engine import sampling_params

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
    }
