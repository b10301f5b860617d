"""Token counting for the context budget: the server's tokenizer when it has one, else an estimate.

The estimate is the one the original DO-era bot used (doc 228): characters / 4, rounded up. It errs
high for English and low for dense scripts (CJK, emoji), which is why a server tokenizer wins when a
backend offers one (llama.cpp `/tokenize`). Each message also costs a fixed overhead for the chat
template's role markers, so a hundred tiny turns cannot sneak past the budget.

Pure but for the tokenizer function a caller passes in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # template tokens per message (e.g. "<start_of_turn>user\n" ... "<end_of_turn>\n")

TokenCounter = Callable[[str], "int | None"]


def estimate_tokens(text: str) -> int:
    """ceil(len(text) / 4); 0 for the empty string."""
    return -(-len(text) // CHARS_PER_TOKEN)


def reply_tokens(text: str, server_count: int | None) -> int:
    """A generated reply's size in tokens, as adaptive concurrency measures throughput in (the worker
    stores it as `reply.tokens`): the server's own count when it reported one, else the estimate."""
    return server_count if server_count is not None else estimate_tokens(text)


class FallbackCounter:
    """`count_tokens`, with the estimate for a text it has no answer for (None) or when it fails.

    A failing tokenizer must not fail the generation: the estimate is good enough to stay in budget.
    `degraded` says whether any count was the estimate's; from then on the server is not asked again
    for this counter's lifetime. A trim decided by one counter and checked by the other disagrees with
    itself (the server's counts are lower for English), so a caller redoes the fit with the estimate
    alone (`aibot.generation.prompt.fit`), and further server counts would be thrown away.
    """

    def __init__(self, count_tokens: TokenCounter):
        self.count_tokens = count_tokens
        self.degraded = False

    def __call__(self, text: str) -> int:
        if not self.degraded:
            try:
                n = self.count_tokens(text)
            except Exception as exc:  # any tokenizer failure degrades to the estimate
                log.warning("token counter failed (%s: %s); using the chars/4 estimate", type(exc).__name__, exc)
            else:
                if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
                    return n
        self.degraded = True
        return estimate_tokens(text)


def make_counter(count_tokens: TokenCounter | None) -> Callable[[str], int]:
    """The estimate, or a `FallbackCounter` around `count_tokens` (a counter passes through as it is)."""
    if count_tokens is None:
        return estimate_tokens
    if isinstance(count_tokens, FallbackCounter):
        return count_tokens
    return FallbackCounter(count_tokens)


def message_tokens(content: str, count: Callable[[str], int]) -> int:
    return count(content) + MESSAGE_OVERHEAD
