"""Build a tiny, deterministic Llama model that a CPU vLLM can serve in seconds, and a LoRA for it.

Runs in the vLLM virtualenv (it needs torch, transformers, tokenizers and peft):

    python tests/vllm/build_model.py OUT_DIR [--seed 0]

Writes OUT_DIR/model (weights, a byte-level BPE tokenizer trained on the Python standard
library's sources, a ChatML chat template that renders tools Hermes-style) and OUT_DIR/lora.
The weights are random, except one hidden dimension held constant so that a column of
``lm_head`` acts as a per-token bias: whitespace-only and control-character tokens are pushed
down (a random model would otherwise write whitespace forever inside JSON), and the tokens that
close JSON strings and objects, and the end of turn, are pushed up (so output ends soon).
"""

from __future__ import annotations

import argparse
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these functions:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    'Answer a call as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n{% endif %}'
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string %}{{ message.content }}"
    "{%- elif message.content %}{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}"
    "{%- if message.tool_calls %}{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The hidden dimension kept constant: its lm_head column is each token's bias.
BIAS_DIM = 0


def corpus(limit: int = 400) -> Iterator[str]:
    """Text to train the tokenizer on: the standard library's own sources, in a fixed order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    for path in files:
        yield path.read_text(errors="replace")


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus(), vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<tool_call>", "</tool_call>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def token_bias(tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    bias = torch.zeros(len(tokenizer))
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if not text.strip() or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            bias[token_id] = -20.0
        elif text.strip() in {'"', '",', '"}', '"]', "}", "]", ",", '":'}:
            bias[token_id] = 6.0
    for special in SPECIAL:
        bias[tokenizer.convert_tokens_to_ids(special)] = -20.0
    # End of turn is likely but not certain: free text runs a few dozen tokens, and a tool
    # call or JSON document ends the answer once its grammar lets it.
    bias[tokenizer.eos_token_id] = 3.0
    return bias


def build_model(out: Path, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Hold BIAS_DIM constant through the residual stream: every token embeds 1.0 there, and no
        # layer writes to it. After the final RMSNorm it is a positive constant, so lm_head's
        # column BIAS_DIM adds a fixed bias to each token's logit.
        model.model.embed_tokens.weight[:, BIAS_DIM] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[BIAS_DIM, :] = 0.0
            layer.mlp.down_proj.weight[BIAS_DIM, :] = 0.0
        model.lm_head.weight.normal_(0.0, 0.25)
        model.lm_head.weight[:, BIAS_DIM] = token_bias(tokenizer) / 10
    model.save_pretrained(out, safe_serialization=True)
    return model


def build_lora(out: Path, model: LlamaForCausalLM, seed: int) -> None:
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.out / "model")
    model = build_model(args.out / "model", tokenizer, args.seed)
    build_lora(args.out / "lora", model, args.seed)


if __name__ == "__main__":
    main()
