"""Run FlexGen 0.1.8's ``flexgen.flex_opt`` offline: ``python -m pipo.bench.flexgen_shim ARGS``.

FlexGen's benchmark needs the network for exactly one thing: ``AutoTokenizer.from_pretrained(
"facebook/opt-30b")``, used to build the (identical) test prompts. With ``--path _DUMMY_`` weights
nothing is ever decoded, so a stub that returns left-padded ids of the requested ``max_length``
(pad id 1, as OPT's tokenizer) changes no timing. The stub replaces that one call, then the module
runs unchanged through ``runpy`` with ``ARGS`` as its command line.
"""

from __future__ import annotations

import runpy
import sys
from types import SimpleNamespace

OPT_PAD_ID = 1
# OPT's tokenizer on FlexGen's prompt "Paris is the capital city of" (bos first).
PROMPT_IDS = (2, 32826, 16, 5, 812, 343, 9)


class StubTokenizer:
    """Just enough of a tokenizer for ``flex_opt.get_test_inputs`` (left padding, pad id 1)."""

    pad_token_id = OPT_PAD_ID

    def __call__(self, prompts, padding="max_length", max_length=None, **_):
        ids = list(PROMPT_IDS)[-max_length:] if max_length else list(PROMPT_IDS)
        padded = [OPT_PAD_ID] * (max_length - len(ids)) + ids if max_length else ids
        return SimpleNamespace(input_ids=[list(padded) for _ in prompts])

    def batch_decode(self, ids, **_):
        """Placeholder text (only called for real weights, never with ``_DUMMY_``)."""
        return ["" for _ in ids]


def install_stub() -> None:
    """Make ``transformers.AutoTokenizer.from_pretrained`` return a :class:`StubTokenizer`."""
    import transformers

    transformers.AutoTokenizer.from_pretrained = lambda *args, **kwargs: StubTokenizer()


def main(argv: list[str]) -> None:
    """Run ``flexgen.flex_opt`` with ``argv`` as its arguments and the stub tokenizer."""
    install_stub()
    sys.argv = ["flexgen.flex_opt", *argv]
    runpy.run_module("flexgen.flex_opt", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
