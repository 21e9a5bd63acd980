"""Tiny models and tokenizers built locally (nothing is downloaded), for tests, benchmarks and the demo.

A character-level tokenizer (every printable ASCII character is a token) and a randomly initialized Qwen2 or
Llama model, saved as a Hugging Face folder that transformers and vLLM both load.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<think>", "</think>"]
# Tools (JSON schemas, as transformers' get_json_schema writes them) are shown before the conversation as one short
# line, names and parameter names only: the model reads characters, so every character of a description costs a
# token of every prompt. A tool call is the Hermes / Qwen2.5 format, <tool_call>{"name", "arguments"}</tool_call>,
# closing the assistant turn with </s>; a tool's result comes back as a user turn in <tool_response> tags. Rendering
# is prefix-consistent (a conversation's rendering starts with the rendering of each of its prefixes), so a
# multi-turn rollout can append each observation's tokens to the sampled ids. Without tools, tool calls and tool
# messages the rendering is exactly the original template's, on which the published tiny models were trained.
CHAT_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    " {{ f['name'] }}({{ f['parameters']['properties'] | join(',') if f['parameters'] is defined else '' }})"
    "{% endfor %}{{ '\\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'tool' %}<|user|><tool_response>{{ m['content'] }}</tool_response>"
    "{% elif m['tool_calls'] %}<|assistant|>{{ m['content'] or '' }}{% for c in m['tool_calls'] %}"
    "{% set f = c['function'] if c['function'] is defined else c %}"
    "<tool_call>{\"name\": {{ f['name'] | tojson }}, \"arguments\": "
    "{{ f['arguments'] if f['arguments'] is string else f['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}</s>"
    "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    """A PreTrainedTokenizerFast over single characters: special tokens, then printable ASCII.

    Characters are stored in GPT-2's byte-level alphabet (" " is "Ġ", "\n" is "Ċ") with a byte-level pre-tokenizer
    and decoder: transformers 5 loads any qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which rebuilds a
    byte-level pipeline around the saved vocabulary, and a plain " " entry would silently drop every space.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    chars = [byte_char[ord(c)] for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE without merges splits text into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(arch="qwen2", vocab_size=128, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256,
                max_positions=1024, tie_embeddings=False):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
               tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_tiny_model(path, arch="qwen2", dtype=torch.float32, seed=0, **config_kwargs):
    """Write tokenizer + randomly initialized model to `path`; returns the path. Vocab = the tokenizer's."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = char_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tok))
    config = tiny_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Build a tiny random model + character tokenizer in PATH.")
    parser.add_argument("path")
    parser.add_argument("--arch", default="qwen2", choices=["qwen2", "llama"])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_model(args.path, args.arch, hidden=args.hidden, layers=args.layers, seed=args.seed,
                           intermediate=2 * args.hidden))


if __name__ == "__main__":
    main()
