"""What every system is asked to do: the same token ids, the same number of new tokens. Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from gptserve.model.fetch import fetch_default_gguf
from gptserve.model.tokenizer import Tokenizer

# Through the default model's chat template (with its default system prompt) this is 41 tokens.
CHAT_MESSAGE = "Explain why the sky is blue in two short sentences."
PREFILL_TOKENS = 128
# Plain text cut to PREFILL_TOKENS tokens: the prefill prompt.
LONG_TEXT = (
    "The history of bread goes back at least thirty thousand years. Early people ground wild grains between "
    "stones, mixed the flour with water and baked flat cakes on hot rocks. When farming began in the Fertile "
    "Crescent, wheat and barley became staple crops, and bakers learned that dough left to stand would rise, "
    "lifted by wild yeasts from the air. The Egyptians built ovens of clay and brick and baked dozens of kinds "
    "of loaves; workers on the pyramids were paid partly in bread and beer. In Rome, public bakeries fed the "
    "city, and the grain supply was a matter of state. Medieval towns regulated the weight and price of a loaf, "
    "and guilds guarded the secrets of the trade. The industrial age brought roller mills, commercial yeast and "
    "sliced bread, while the last decades have seen a return to sourdough, whole grains and slow fermentation "
    "in small bakeries around the world."
)


@dataclass(frozen=True)
class Workload:
    prefill_ids: list[int]  # timed as one forward pass
    decode_ids: list[int]  # the chat prompt that greedy decoding continues
    new_tokens: int  # greedy, EOS suppressed: every system produces exactly this many
    eos_token_ids: list[int]

    def to_json(self) -> dict:
        return asdict(self)


def default_workload(new_tokens: int) -> Workload:
    tokenizer = Tokenizer.from_gguf(fetch_default_gguf())
    prefill_ids = tokenizer.encode(LONG_TEXT)[:PREFILL_TOKENS]
    assert len(prefill_ids) == PREFILL_TOKENS, f"the prefill text is only {len(prefill_ids)} tokens"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}])
    return Workload(prefill_ids, tokenizer.encode(chat), new_tokens, tokenizer.eos_token_ids)
